"""Gate building block: the within-chunk cumulative log gates `gc` that every other kernel reads,
from a given key-side log gate, and the closed-form gradient of the log gate.

Used by `kernels.triton_gla` (both) and `kernels.triton_regla` (the cumulative gates of a given
log gate); `add_row_decay` is shared with `kernels.blocks.refined_gate`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import CHUNK, LOG2E, Dims, cdiv, empty, head_offset, launch_options, load_row, load_rows, reuse, store_rows

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
    key_state_term,
    gc,
    states,
    dstates,
    dg,
    T,
    Tp,
    H,
    K,
    V,
    NT,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """The log gate's gradient for one chunk, as a sum of terms that do not cancel each other:

        dg_t = Σ_{u >= t} (q_u ⊙ dq_u − k_u ⊙ dk_intra_u) + Σ_{u < t} k_u ⊙ dk_inter_u + e^{b_last} ⊙ rowsum(S_0 ⊙ dS)

    over the rows u of t's chunk, with S_0 the state entering the chunk, dS the gradient of the one
    leaving it, b_last the chunk's last cumulative gate (dG and key_state_term hold the first two
    summands). The textbook form, Σ_{u >= t} (q_u ⊙ dq_u − k_u ⊙ dk_u) + rowsum(S_end ⊙ dS), has
    the same value: S_end = e^{b_last} S_0 + Σ_u e^{b_last − b_u} k_u v_uᵀ, so rowsum(S_end ⊙ dS)
    holds every k_u ⊙ dk_inter_u, and those with u >= t cancel against the first sum. Computed
    as written there, that cancellation leaves a small difference of two large sums, each carrying
    the rounding of bf16 matrix products (the whole history of the state, for gates near 1); here
    the cancelling parts are never formed. Sequence boundaries need nothing: S_0 is the state
    entering the chunk in its own sequence, and dS = dht (or zero) for a sequence's last chunk.
    """
    ik, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    base = head_offset(bh, H, T, K)
    k_idx = ik * BK + tl.arange(0, BK)
    state_term = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        v_idx = v0 + tl.arange(0, BV)
        inside = (k_idx[:, None] < K) & (v_idx[None, :] < V)
        offsets = (bh.to(tl.int64) * NT + c) * K * V + k_idx[:, None] * V + v_idx[None, :]
        state_in = tl.load(states + offsets, mask=inside, other=0.0)
        grad_out = tl.load(dstates + offsets, mask=inside, other=0.0)
        state_term += tl.sum(state_in * grad_out, axis=1)
    g_last = load_row(gc + head_offset(bh, H, Tp, K) + (c * C + C - 1) * H * K, 0, 1, ik * BK, K, BK)
    state_term *= tl.exp2(g_last)
    local = load_rows(dG + base, c * C, T, H * K, ik * BK, K, C, BK)  # [C, BK] fp32
    through_state = load_rows(key_state_term + base, c * C, T, H * K, ik * BK, K, C, BK)
    # Reverse inclusive sum of `local` (total − inclusive prefix + self), exclusive prefix sum of `through_state`.
    later = tl.sum(local, axis=0)[None, :] - tl.cumsum(local, axis=0) + local
    earlier = tl.cumsum(through_state, axis=0) - through_state
    store_rows(dg + base, later + earlier + state_term[None, :], c * C, T, H * K, ik * BK, K, C, BK)


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
    gate_cumsum_kernel[(cdiv(K, BK), NT, B * H)](
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
    key_state_term: Tensor,
    gc: Tensor,
    states: Tensor,
    dstates: Tensor,
    dims: Dims,
    dtype: torch.dtype,
) -> Tensor:
    """The log gate's gradient in a form without cancellation (see `gate_grad_kernel`).

    Args:
        dG: [B, T, H, K] fp32, q ⊙ dq − k ⊙ dk_intra (from `qkv_grad.query_key_grads`).
        key_state_term: [B, T, H, K] fp32, k ⊙ dk_inter (from the same).
        gc: [B, Tp, H, K] fp32 within-chunk cumulative log2 gates.
        states: [B, H, NT, K, V] fp32, the states entering each chunk.
        dstates: [B, H, NT, K, V] fp32, the gradients of the states leaving each chunk.
        dims: the call's `Dims`.
        dtype: the result's dtype.

    Returns:
        dg: [B, T, H, K] in `dtype`, the gradient of the per-feature log gate; in fp32, dG's buffer,
            overwritten.
    """
    B, T, H, K, V, NT, BK, BV, dot = dims
    # In fp32, dg goes where dG was: each program stores into the [C, BK] tile it read, every
    # store after the column sums over the whole tile. One fp32 buffer less at the peak.
    dg = reuse(dG) if dtype == dG.dtype else empty((B, T, H, K), dtype, dG.device)
    gate_grad_kernel[(cdiv(K, BK), NT, B * H)](
        dG,
        key_state_term,
        gc,
        states,
        dstates,
        dg,
        T,
        gc.shape[1],
        H,
        K,
        V,
        NT,
        C=CHUNK,
        BK=BK,
        BV=BV,
        **launch_options("gate_grad_kernel"),
    )
    return dg
