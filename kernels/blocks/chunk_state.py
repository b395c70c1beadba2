"""Chunk-state building block: the states between chunks, [B, H, NT, K, V], from one sequential
pass over the chunks in fp32 (forward), and their gradients from one pass in reverse (backward).

Used by the forward and backward passes of `kernels.triton_gla` (and so by every Triton GLA op).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    CHUNK,
    Dims,
    SafeExpShifts,
    cdiv,
    empty,
    feature_args,
    head_offset,
    launch_options,
    load_features,
    load_features_transposed,
    load_row,
    load_rows,
    load_rows_transposed,
    store_rows,
)
from .varlen import SequenceChunks

Tensor = torch.Tensor


@triton.jit
def state_forward_kernel(
    k,
    ks,
    v,
    gc,
    h0,
    states,
    ht,
    seq_chunks,
    T,
    Tp,
    H,
    K,
    V,
    NT,
    N,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    VARLEN: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
    EXP: tl.constexpr,
):
    """Sequential pass over chunks: states[c] is the state entering chunk c; ht the final one.

    With VARLEN, the row holds N sequences, sequence n on chunks seq_chunks[n] .. seq_chunks[n + 1] − 1
    (`blocks.varlen`): the state restarts from h0[n] (or zero) at each and ht[n] is its last.
    Without, N = 1 and the sequence covers all NT chunks. h0, ht: [B·N, H, K, V].
    """
    ik, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    k_base = k + head_offset(bh, H, T, K)  # row stride H*K
    ks_base = ks + head_offset(bh, H, T, 1)  # per-row key shifts, row stride H
    v_base = v + head_offset(bh, H, T, V)
    g_base = gc + head_offset(bh, H, Tp, K)
    kv_base = bh.to(tl.int64) * NT * K * V
    dt = DOT
    for n in range(N):
        if VARLEN:
            c_begin = tl.load(seq_chunks + n)
            c_end = tl.load(seq_chunks + n + 1)
        else:
            c_begin = 0
            c_end = NT
        seq_base = ((b.to(tl.int64) * N + n) * H + h) * K * V  # this sequence's h0 / ht
        if HAS_H0:
            state = load_rows(h0 + seq_base, ik * BK, K, V, iv * BV, V, BK, BV).to(tl.float32)
        else:
            state = tl.zeros([BK, BV], dtype=tl.float32)
        for c in range(c_begin, c_end):
            store_rows(states + kv_base + c * K * V, state, ik * BK, K, V, iv * BV, V, BK, BV)
            t0 = c * C
            # Keys and gates as [BK, C] tiles: the product takes them as they are loaded.
            k_tile = load_features_transposed(k_base, ks_base, t0, T, H * K, ik * BK, K, H, C, BK, EXP)
            v_tile = load_rows(v_base, t0, T, H * V, iv * BV, V, C, BV).to(dt)  # [C, BV]
            g_tile = load_rows_transposed(g_base, t0, Tp, H * K, ik * BK, K, C, BK)  # [BK, C]
            g_last = load_row(g_base + (t0 + C - 1) * H * K, 0, 1, ik * BK, K, BK)  # [BK]
            k_to_end = (k_tile * tl.exp2(g_last[:, None] - g_tile)).to(dt)
            state = state * tl.exp2(g_last)[:, None] + tl.dot(k_to_end, v_tile, input_precision=PREC)
        if STORE_HT:
            store_rows(ht + seq_base, state, ik * BK, K, V, iv * BV, V, BK, BV)


@triton.jit
def state_backward_kernel(
    q,
    qs,
    do,
    gc,
    dht,
    dstates,
    dh0,
    seq_chunks,
    scale,
    T,
    Tp,
    H,
    K,
    V,
    NT,
    N,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    VARLEN: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
    EXP: tl.constexpr,
):
    """Reverse pass: dstates[c] is the gradient of the state leaving chunk c; dh0 of the initial one.
    Sequences as in `state_forward_kernel`: the gradient restarts from dht[n] (or zero) at each end."""
    ik, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    q_base = q + head_offset(bh, H, T, K)
    qs_base = qs + head_offset(bh, H, T, 1)
    do_base = do + head_offset(bh, H, T, V)
    g_base = gc + head_offset(bh, H, Tp, K)
    kv_base = bh.to(tl.int64) * NT * K * V
    dt = DOT
    for n_step in range(N):
        n = N - 1 - n_step
        if VARLEN:
            c_begin = tl.load(seq_chunks + n)
            c_end = tl.load(seq_chunks + n + 1)
        else:
            c_begin = 0
            c_end = NT
        seq_base = ((b.to(tl.int64) * N + n) * H + h) * K * V  # this sequence's dht / dh0
        if HAS_DHT:
            grad = load_rows(dht + seq_base, ik * BK, K, V, iv * BV, V, BK, BV).to(tl.float32)
        else:
            grad = tl.zeros([BK, BV], dtype=tl.float32)
        for step in range(c_end - c_begin):
            c = c_end - 1 - step
            store_rows(dstates + kv_base + c * K * V, grad, ik * BK, K, V, iv * BV, V, BK, BV)
            t0 = c * C
            q_tile = load_features(q_base, qs_base, t0, T, H * K, ik * BK, K, H, C, BK, EXP)
            do_tile = load_rows(do_base, t0, T, H * V, iv * BV, V, C, BV)
            g_tile = load_rows(g_base, t0, Tp, H * K, ik * BK, K, C, BK)
            g_last = load_row(g_base + (t0 + C - 1) * H * K, 0, 1, ik * BK, K, BK)
            q_from_start = (q_tile * tl.exp2(g_tile) * scale).to(dt)
            grad = grad * tl.exp2(g_last)[:, None] + tl.dot(
                tl.trans(q_from_start), do_tile.to(dt), input_precision=PREC
            )
        if STORE_DH0:
            store_rows(dh0 + seq_base, grad, ik * BK, K, V, iv * BV, V, BK, BV)


def chunk_states(
    k: Tensor,
    v: Tensor,
    gc: Tensor,
    initial_state: Tensor | None,
    output_final_state: bool,
    dims: Dims,
    shifts: SafeExpShifts | None = None,
    sequences: SequenceChunks | None = None,
    states_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor | None]:
    """The states entering each chunk, and optionally the final state.

    Args:
        k: [B, T, H, K] keys (raw inputs of the safe-exp features when `shifts` is given).
        v: [B, T, H, V], k's dtype.
        gc: [B, Tp, H, K] fp32 within-chunk cumulative log2 gates (`gate.gate_cumsum`).
        initial_state: [B, H, K, V] (any float dtype), or None for zeros.
        output_final_state: whether to return the state after the last position.
        dims: the call's `Dims`.
        shifts: safe-exp shifts, or None to read k as it is.
        sequences: packed sequences in the chunk-aligned layout (`blocks.varlen`, B = 1), or None
            for one sequence per batch row; initial and final states are then [N, H, K, V].
        states_dtype: the stored states' dtype. The pass itself keeps the state in fp32; the
            forward stores them in the products' operand dtype (`common.operand_dtype`), which is
            all its output product reads (half the traffic and memory of fp32 in bf16), the
            backward in fp32 (its gate gradient takes them elementwise).

    Returns:
        states: [B, H, NT, K, V] in `states_dtype`, states[:, :, c] the state entering chunk c.
        final: [B, H, K, V] ([N, H, K, V] with `sequences`) fp32, or None unless `output_final_state`.
    """
    B, T, H, K, V, NT, BK, BV, dot = dims
    N = sequences.count if sequences is not None else 1
    states = empty((B, H, NT, K, V), states_dtype, k.device)  # [B, H, NT, K, V]
    final = empty((B * N, H, K, V), torch.float32, k.device) if output_final_state else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    features = feature_args(shifts, k)
    grid = (cdiv(K, BK), cdiv(V, BV), B * H)
    state_forward_kernel[grid](
        k,
        features["ks"],
        v,
        gc,
        h0 if h0 is not None else states,
        states,
        final if final is not None else states,
        sequences.offsets if sequences is not None else states,
        T,
        gc.shape[1],
        H,
        K,
        V,
        NT,
        N,
        C=CHUNK,
        BK=BK,
        BV=BV,
        HAS_H0=h0 is not None,
        STORE_HT=final is not None,
        VARLEN=sequences is not None,
        EXP=features["EXP"],
        **dot,
        **launch_options("state_forward_kernel"),
    )
    return states, final


def chunk_state_grads(
    q: Tensor,
    do: Tensor,
    gc: Tensor,
    dht: Tensor | None,
    initial_state_grad: bool,
    scale: float,
    dims: Dims,
    shifts: SafeExpShifts | None = None,
    sequences: SequenceChunks | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The gradients of the states leaving each chunk, and optionally of the initial state.

    Args:
        q: [B, T, H, K] queries (raw inputs of the safe-exp features when `shifts` is given).
        do: [B, T, H, V] the output's gradient, contiguous.
        gc: [B, Tp, H, K] fp32 within-chunk cumulative log2 gates.
        dht: [B, H, K, V] gradient of the final state (contiguous), or None for zero.
        initial_state_grad: whether to return the initial state's gradient.
        scale: the output's scale.
        dims: the call's `Dims`.
        shifts: safe-exp shifts, or None to read q as it is.
        sequences: packed sequences as in `chunk_states` (dht and dh0 then [N, H, K, V]), or None.

    Returns:
        dstates: [B, H, NT, K, V] fp32, dstates[:, :, c] the gradient of the state leaving chunk c.
        dh0: [B, H, K, V] ([N, H, K, V] with `sequences`) fp32, or None unless `initial_state_grad`.
    """
    B, T, H, K, V, NT, BK, BV, dot = dims
    N = sequences.count if sequences is not None else 1
    features = feature_args(shifts, q)
    dstates = empty((B, H, NT, K, V), torch.float32, q.device)
    dh0 = empty((B * N, H, K, V), torch.float32, q.device) if initial_state_grad else None
    state_backward_kernel[(cdiv(K, BK), cdiv(V, BV), B * H)](
        q,
        features["qs"],
        do,
        gc,
        dht if dht is not None else dstates,
        dstates,
        dh0 if dh0 is not None else dstates,
        sequences.offsets if sequences is not None else dstates,
        scale,
        T,
        gc.shape[1],
        H,
        K,
        V,
        NT,
        N,
        C=CHUNK,
        BK=BK,
        BV=BV,
        HAS_DHT=dht is not None,
        STORE_DH0=dh0 is not None,
        VARLEN=sequences is not None,
        EXP=features["EXP"],
        **dot,
        **launch_options("state_backward_kernel"),
    )
    return dstates, dh0
