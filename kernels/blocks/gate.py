"""Gate building block: the within-chunk cumulative log gates `gc` that every other kernel reads,
from a given key-side log gate, and the closed-form gradient of the log gate.

Used by `kernels.triton_gla` (both) and `kernels.triton_regla` (the cumulative gates of a given
log gate); `add_row_decay` is shared with `kernels.blocks.refined_gate`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import CHUNK, LOG2E, Dims, empty, head_offset, launch_options, load_rows, store_rows
from .varlen import SequenceChunks

Tensor = torch.Tensor


@triton.jit
def add_row_decay(log_gate, row_decay, b, h, rows, T, H, ROW_DECAY: tl.constexpr):
    """log_gate [C, BK] plus row_decay[b, rows, h] on every column when ROW_DECAY (else unchanged)."""
    if ROW_DECAY:
        decay = tl.load(row_decay + (b.to(tl.int64) * T + rows) * H + h, mask=rows < T, other=0.0)
        log_gate = log_gate + decay[:, None]
    return log_gate


@triton.jit
def gate_cumsum_kernel(
    g,
    row_decay,
    gc,
    T,
    Tp,
    H,
    K,
    G_DIM,
    log2e,
    C: tl.constexpr,
    BK: tl.constexpr,
    SCALAR: tl.constexpr,
    ROW_DECAY: tl.constexpr,
):
    """gc = within-chunk cumulative sum of the log gate, fp32, in log2 units, on the padded time axis.

    g is [B, T, H, G_DIM] with G_DIM = K, or 1 for a per-head scalar gate (then broadcast over K).
    With ROW_DECAY, row_decay [B, T, H] (fp32, <= 0) adds one more log decay per row, on every
    feature: safe_exp's key-max rescaling. Rows past T read as zero gates, so padded rows repeat
    the last real cumulative value.
    """
    ik, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rows = c * C + tl.arange(0, C)
    cols = ik * BK + tl.arange(0, BK)
    if SCALAR:
        src = g + head_offset(bh, H, T, G_DIM) + rows[:, None] * H * G_DIM + cols[None, :] * 0
    else:
        src = g + head_offset(bh, H, T, G_DIM) + rows[:, None] * H * G_DIM + cols[None, :]
    gate = tl.load(src, mask=(rows[:, None] < T) & (cols[None, :] < K), other=0.0).to(tl.float32)
    gate = add_row_decay(gate, row_decay, b, h, rows, T, H, ROW_DECAY)
    cumulative = tl.cumsum(gate, axis=0) * log2e
    store_rows(gc + head_offset(bh, H, Tp, K), cumulative, c * C, Tp, H * K, ik * BK, K, C, BK)


@triton.jit
def gate_grad_kernel(
    dG,
    states,
    final,
    dstates,
    dg,
    seq_chunks,
    chunk_seq,
    T,
    H,
    K,
    V,
    NT,
    N,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_FINAL: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """dg_t = Σ_{u >= t, u in t's chunk} dG_u + rowsum(S_end ⊙ dS_end), S_end the state leaving the chunk.

    The cumulative log gates inside a chunk feed the outputs and the state update; the state
    leaving the chunk carries everything later positions see, so its term, rowsum(S ⊙ dS), closes
    the sum. Summing dG only within a chunk keeps the rounding of the q ⊙ dq − k ⊙ dk
    cancellation local instead of accumulating it over the whole sequence.

    With VARLEN (packed sequences, `blocks.varlen`), the state leaving a sequence's last chunk is that
    sequence's final state final[n], not the state entering the next chunk (the next sequence's start).
    """
    ik, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    base = head_offset(bh, H, T, K)
    k_idx = ik * BK + tl.arange(0, BK)
    if VARLEN:
        n = tl.load(chunk_seq + c)
        c_end = tl.load(seq_chunks + n + 1)
    else:
        n = 0
        c_end = NT
    final_base = ((b.to(tl.int64) * N + n) * H + h) * K * V
    chunk = k_idx[:, None] * 0 + c  # [BK, 1]: the chunk index as a tensor, to combine with masks
    carry = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        v_idx = v0 + tl.arange(0, BV)
        inside = (k_idx[:, None] < K) & (v_idx[None, :] < V)
        offsets = k_idx[:, None] * V + v_idx[None, :]
        grad_end = tl.load(dstates + (bh.to(tl.int64) * NT + c) * K * V + offsets, mask=inside, other=0.0)
        state_end = tl.load(
            states + (bh.to(tl.int64) * NT + c + 1) * K * V + offsets, mask=inside & (chunk + 1 < c_end), other=0.0
        )
        if HAS_FINAL:
            state_end += tl.load(final + final_base + offsets, mask=inside & (chunk + 1 == c_end), other=0.0)
        carry += tl.sum(state_end * grad_end, axis=1)
    x = load_rows(dG + base, c * C, T, H * K, ik * BK, K, C, BK)  # [C, BK] fp32
    # Reverse inclusive sum within the chunk: total - (inclusive prefix) + x.
    suffix = tl.sum(x, axis=0)[None, :] - tl.cumsum(x, axis=0) + x + carry[None, :]
    store_rows(dg + base, suffix, c * C, T, H * K, ik * BK, K, C, BK)


def gate_cumsum(gk: Tensor, dims: Dims, row_decay: Tensor | None = None) -> Tensor:
    """Within-chunk cumulative log gates, the input of every other kernel.

    Args:
        gk: [B, T, H, K] key-side log gate, or [B, T, H, 1] one per head (broadcast over K); any float dtype.
        dims: the call's `Dims`.
        row_decay: optional [B, T, H] fp32 log decay (<= 0) added to every feature of its row
            (safe_exp's key-max rescaling).

    Returns:
        gc: [B, Tp, H, K] fp32, in log2 units, Tp = NT * CHUNK; padded rows repeat the last real row.
    """
    B, T, H, K, V, NT, BK, BV, dot = dims
    gc = empty((B, NT * CHUNK, H, K), torch.float32, gk.device)
    gate_cumsum_kernel[(triton.cdiv(K, BK), NT, B * H)](
        gk,
        row_decay if row_decay is not None else gk,
        gc,
        T,
        NT * CHUNK,
        H,
        K,
        gk.shape[-1],
        LOG2E,
        C=CHUNK,
        BK=BK,
        SCALAR=gk.shape[-1] == 1,
        ROW_DECAY=row_decay is not None,
        **launch_options("gate_cumsum_kernel"),
    )
    return gc


def gate_grad(
    dG: Tensor,
    states: Tensor,
    final: Tensor | None,
    dstates: Tensor,
    dims: Dims,
    dtype: torch.dtype,
    sequences: SequenceChunks | None = None,
) -> Tensor:
    """The log gate's gradient in closed form: within-chunk reverse sums of dG plus the term of the
    state leaving each chunk (see `gate_grad_kernel`).

    Args:
        dG: [B, T, H, K] fp32, q ⊙ dq − k ⊙ dk (from `qkv_grad.query_key_grads`).
        states: [B, H, NT, K, V] fp32, the states entering each chunk.
        final: [B, H, K, V] fp32 ([N, H, K, V] with `sequences`), the state leaving the last chunk
            (of each sequence), or None when its gradient is zero.
        dstates: [B, H, NT, K, V] fp32, the gradients of the states leaving each chunk.
        dims: the call's `Dims`.
        dtype: the result's dtype.
        sequences: packed sequences in the chunk-aligned layout (`blocks.varlen`), or None.

    Returns:
        dg: [B, T, H, K] in `dtype`, the gradient of the per-feature log gate.
    """
    B, T, H, K, V, NT, BK, BV, dot = dims
    dg = empty((B, T, H, K), dtype, dG.device)
    gate_grad_kernel[(triton.cdiv(K, BK), NT, B * H)](
        dG,
        states,
        final if final is not None else states,
        dstates,
        dg,
        sequences.offsets if sequences is not None else dG,
        sequences.sequence_of_chunk if sequences is not None else dG,
        T,
        H,
        K,
        V,
        NT,
        sequences.count if sequences is not None else 1,
        C=CHUNK,
        BK=BK,
        BV=BV,
        HAS_FINAL=final is not None,
        VARLEN=sequences is not None,
        **launch_options("gate_grad_kernel"),
    )
    return dg
