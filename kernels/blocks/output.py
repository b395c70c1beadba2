"""Output building block: the within-chunk attention scores A [B, Tp, H, C] and the output
o = scale · ((q ⊙ e^b) states[c] + A v), one chunk at a time.

Used by the forward pass of `kernels.triton_gla` (and so by every Triton GLA op); the scores are
kept for the backward (`kernels.blocks.qkv_grad`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    CHUNK,
    SUB_CHUNK,
    Dims,
    SafeExpShifts,
    cdiv,
    empty,
    feature_args,
    head_offset,
    launch_options,
    load_features,
    load_row,
    load_rows,
    next_power_of_2,
    store_rows,
)

Tensor = torch.Tensor

#: Widest feature block of `intra_scores_kernel`'s diagonal loop, and widest value block of
#: `output_kernel` (whole rows up to this: each chunk's scores are then read once, not once per block).
MAX_DIAG_FEATURES = 128
MAX_OUTPUT_COLUMNS = 128


@triton.jit
def intra_scores_kernel(
    q,
    k,
    qs,
    ks,
    gc,
    A,
    T,
    Tp,
    H,
    K,
    C: tl.constexpr,
    S: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
    EXP: tl.constexpr,
):
    """A[t, s] = sum_j q_tj k_sj exp2(b_tj - b_sj) for s <= t in the same chunk (zero above).

    One program per (sub-chunk of S rows, batch*head); A is [B, Tp, H, C] in fp32. Each earlier
    sub-chunk is one [S, S] block of tensor-core products over BK key columns at a time (only the
    earlier ones: rows of later sub-chunks are neither loaded nor exponentiated); the diagonal
    block in halves (without EXP): its lower-left quadrant one more product (fp32 operands), its
    two diagonal quadrants with exact fp32 decays, one column at a time over BD columns of
    features; with EXP the whole diagonal block exact so.
    (`benchmarks/intra_scores_variants.py` times the alternatives: a [S, C] product against the
    whole chunk with the later columns masked, the whole diagonal block exact, a [S, S, BD]
    tensor of decays.)
    """
    pid, bh = tl.program_id(0), tl.program_id(1)
    c, i = pid // (C // S), pid % (C // S)
    q_base = q + head_offset(bh, H, T, K)
    k_base = k + head_offset(bh, H, T, K)
    qs_base = qs + head_offset(bh, H, T, 1)
    ks_base = ks + head_offset(bh, H, T, 1)
    g_base = gc + head_offset(bh, H, Tp, K)
    t0, r0 = c * C, c * C + i * S
    sub = tl.arange(0, S)
    rows_t = r0 + sub
    a_rows = A + head_offset(bh, H, Tp, C) + rows_t[:, None] * H * C  # [S, 1]: this sub-chunk's rows
    inside = rows_t[:, None] < Tp
    # Earlier sub-chunks: b_t - b_s = (b_t - b_ref) + (b_ref - b_s), both parts <= 0, with this
    # sub-chunk's first row as the reference.
    for j in range(i):
        s0 = t0 + j * S
        block = tl.zeros([S, S], dtype=tl.float32)
        for k0 in range(0, K, BK):
            q_sub = load_features(q_base, qs_base, r0, T, H * K, k0, K, H, S, BK, EXP)  # [S, BK]
            g_sub = load_rows(g_base, r0, Tp, H * K, k0, K, S, BK)
            g_ref = load_row(g_base + r0 * H * K, 0, 1, k0, K, BK)  # [BK]
            k_j = load_features(k_base, ks_base, s0, T, H * K, k0, K, H, S, BK, EXP)  # [S, BK]
            g_j = load_rows(g_base, s0, Tp, H * K, k0, K, S, BK)
            q_ref = (q_sub * tl.exp2(g_sub - g_ref[None, :])).to(DOT)
            k_ref = (k_j * tl.exp2(g_ref[None, :] - g_j)).to(DOT)
            block += tl.dot(q_ref, tl.trans(k_ref), input_precision=PREC)
        tl.store(a_rows + (j * S + sub)[None, :], block, mask=inside)
    # Later sub-chunks: zeros.
    cols = tl.arange(0, C)
    tl.store(a_rows + cols[None, :], tl.zeros([S, C], dtype=tl.float32), mask=inside & (cols[None, :] >= i * S + S))
    # Diagonal S x S block. With the safe-exp features (EXP), exact as one tile: the features are
    # exponentials formed on load, and the halves below form each of them twice more, which cost
    # more than the exact work they save (the fused ReGLA forward 3.90 -> 4.56 ms at
    # 1x8192x96x128, results/kernels/run22).
    if EXP:
        diag = exact_diagonal(q_base, k_base, qs_base, ks_base, g_base, r0, T, H, K, S, BD, EXP)
        tl.store(a_rows + (i * S + sub)[None, :], diag, mask=inside)
    else:
        # In halves. The lower-left quadrant (rows of the second half, columns of the first) is one
        # tensor-core product about the middle row, both factors <= 1, with fp32 operands: tf32
        # beside bf16 inputs (a finer rounding than the earlier sub-chunks' bf16 products), tf32x3
        # beside fp32 ones. The two diagonal quadrants are exact. Half the exact work of the whole
        # block: the kernel 1.37 -> 1.27 ms at 1x8192x96x128 and 0.84 -> 0.68 at 16x4096x12x64
        # (results/kernels/run21).
        HALF: tl.constexpr = S // 2
        quadrant = tl.zeros([S, S], dtype=tl.float32)
        for k0 in range(0, K, BK):
            q_sub = load_rows(q_base, r0, T, H * K, k0, K, S, BK).to(tl.float32)
            k_sub = load_rows(k_base, r0, T, H * K, k0, K, S, BK).to(tl.float32)
            g_sub = load_rows(g_base, r0, Tp, H * K, k0, K, S, BK)
            g_mid = load_row(g_base + (r0 + HALF) * H * K, 0, 1, k0, K, BK)  # r0 + HALF < Tp always
            q_mid = q_sub * tl.exp2(tl.where(sub[:, None] >= HALF, g_sub - g_mid[None, :], float("-inf")))
            k_mid = k_sub * tl.exp2(tl.where(sub[:, None] < HALF, g_mid[None, :] - g_sub, float("-inf")))
            quadrant += tl.dot(q_mid, tl.trans(k_mid), input_precision=PREC)
        # zero in the upper-right quadrant: q_mid has no rows above the middle, k_mid none below
        off_quadrants = (sub[:, None] >= HALF) != (sub[None, :] >= HALF)
        tl.store(a_rows + (i * S + sub)[None, :], quadrant, mask=inside & off_quadrants)
        half = tl.arange(0, HALF)
        for h in tl.static_range(2):
            h0 = r0 + h * HALF
            tile = exact_diagonal(q_base, k_base, qs_base, ks_base, g_base, h0, T, H, K, HALF, BD, EXP)
            rows_h = h0 + half
            a_half = A + head_offset(bh, H, Tp, C) + rows_h[:, None] * H * C + (i * S + h * HALF + half)[None, :]
            tl.store(a_half, tile, mask=rows_h[:, None] < Tp)


@triton.jit
def exact_diagonal(
    q_base, k_base, qs_base, ks_base, g_base, r0, T, H, K, N: tl.constexpr, BD: tl.constexpr, EXP: tl.constexpr
):
    """The [N, N] diagonal tile of rows r0..r0+N: A[t, s] for s <= t (zero above), with exact
    pairwise decays in fp32, one column s = r0 + j at a time, each an [N, BD] product reduced over
    features, over BD features at a time. The bases point at this (batch, head)'s row 0.

    The loop loads its rows through pointers formed once, with plain tl ops: each call of a jit
    helper inside it multiplied the CPU interpreter's time (the tests'), not the GPU's."""
    sub = tl.arange(0, N)
    diag = tl.zeros([N, N], dtype=tl.float32)
    for d0 in range(0, K, BD):
        q_d = load_features(q_base, qs_base, r0, T, H * K, d0, K, H, N, BD, EXP)  # [N, BD]
        g_d = load_rows(g_base, r0, r0 + N, H * K, d0, K, N, BD)  # rows < Tp always
        features = d0 + tl.arange(0, BD)
        feature_ok = features < K
        rows_left = T - r0 + features * 0  # per column, so that the row's check is a vector mask
        k_row = k_base + r0 * H * K + features  # pointers to row r0 + j, advanced each step
        g_row = g_base + r0 * H * K + features
        for j in range(N):
            in_row = feature_ok & (j < rows_left)
            k_j = tl.load(k_row, mask=in_row, other=0.0).to(tl.float32)
            if EXP:  # rows past T read row T - 1's shift, and are zeroed
                k_j = tl.where(in_row, tl.exp(k_j - tl.load(ks_base + tl.minimum(r0 + j, T - 1) * H)), 0.0)
            k_j = k_j[None, :]  # [1, BD]
            g_j = tl.load(g_row, mask=feature_ok, other=0.0)[None, :]
            k_row += H * K
            g_row += H * K
            decay = tl.exp2(tl.where(sub[:, None] >= j, g_d - g_j, float("-inf")))  # rows t >= s only
            column = tl.sum(q_d * k_j * decay, axis=1)  # [N]: A[t, s] over this block of features
            diag += tl.where(sub[None, :] == j, column[:, None], 0.0)
    return diag


@triton.jit
def output_tile(
    q_base,
    qs_base,
    v_base,
    g_base,
    a_base,
    s_base,
    t0,
    v0,
    T,
    Tp,
    H,
    K,
    V,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
    EXP: tl.constexpr,
):
    """(q * exp2(b)) @ state + A @ v for chunk rows t0.. and value columns v0.., unscaled, fp32 [C, BV].

    The bases point at one (batch, head): q, qs, v, gc, A at row 0, the state at this chunk's entry
    state. Shared by `output_kernel` and the norm epilogue (`kernels.blocks.norm_epilogue`), which
    recomputes the output in its backward rather than keeping it."""
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        q_tile = load_features(q_base, qs_base, t0, T, H * K, k0, K, H, C, BK, EXP)
        g_tile = load_rows(g_base, t0, Tp, H * K, k0, K, C, BK)
        state = load_rows(s_base, k0, K, V, v0, V, BK, BV)  # [BK, BV] fp32
        q_from_start = (q_tile * tl.exp2(g_tile)).to(DOT)
        acc += tl.dot(q_from_start, state.to(DOT), input_precision=PREC)
    a_tile = load_rows(a_base, t0, Tp, H * C, 0, C, C, C)
    v_tile = load_rows(v_base, t0, T, H * V, v0, V, C, BV).to(DOT)
    acc += tl.dot(a_tile.to(DOT), v_tile, input_precision=PREC)
    return acc


@triton.jit
def output_kernel(
    q,
    qs,
    v,
    gc,
    A,
    states,
    o,
    scale,
    T,
    Tp,
    H,
    K,
    V,
    NT,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
    EXP: tl.constexpr,
):
    """o = scale * ((q * exp2(b)) @ states[c] + A @ v) for one chunk and one block of value columns."""
    iv, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    acc = output_tile(
        q + head_offset(bh, H, T, K),
        qs + head_offset(bh, H, T, 1),
        v + head_offset(bh, H, T, V),
        gc + head_offset(bh, H, Tp, K),
        A + head_offset(bh, H, Tp, C),
        states + (bh.to(tl.int64) * NT + c) * K * V,
        c * C,
        iv * BV,
        T,
        Tp,
        H,
        K,
        V,
        C,
        BK,
        BV,
        PREC,
        DOT,
        EXP,
    )
    store_rows(o + head_offset(bh, H, T, V), acc * scale, c * C, T, H * V, iv * BV, V, C, BV)


def intra_scores(q: Tensor, k: Tensor, gc: Tensor, dims: Dims, shifts: SafeExpShifts | None = None) -> Tensor:
    """The decayed q·k scores within each chunk.

    Args:
        q, k: [B, T, H, K] (raw inputs of the safe-exp features when `shifts` is given).
        gc: [B, Tp, H, K] fp32 within-chunk cumulative log2 gates.
        dims: the call's `Dims`.
        shifts: safe-exp shifts, or None to read q and k as they are.

    Returns:
        scores: [B, Tp, H, CHUNK] fp32; row t holds A[t, s] for the s of t's chunk (zero for s > t).
    """
    B, T, H, K, V, NT, BK, BV, dot = dims
    scores = empty((B, gc.shape[1], H, CHUNK), torch.float32, q.device)  # [B, Tp, H, C]
    grid = (NT * (CHUNK // SUB_CHUNK), B * H)
    intra_scores_kernel[grid](
        q,
        k,
        gc=gc,
        A=scores,
        T=T,
        Tp=gc.shape[1],
        H=H,
        K=K,
        C=CHUNK,
        S=SUB_CHUNK,
        BK=BK,
        BD=max(16, min(next_power_of_2(K), MAX_DIAG_FEATURES)),
        **feature_args(shifts, q),
        **dot,
        **launch_options("intra_scores_kernel"),
    )
    return scores


def chunk_output(
    q: Tensor,
    v: Tensor,
    gc: Tensor,
    scores: Tensor,
    states: Tensor,
    scale: float,
    dims: Dims,
    shifts: SafeExpShifts | None = None,
) -> Tensor:
    """The output, from the chunk states and the within-chunk scores.

    Args:
        q: [B, T, H, K] (raw inputs of the safe-exp features when `shifts` is given).
        v: [B, T, H, V].
        gc: [B, Tp, H, K] fp32 within-chunk cumulative log2 gates.
        scores: [B, Tp, H, CHUNK] fp32 from `intra_scores`.
        states: [B, H, NT, K, V] from `chunk_state.chunk_states` (fp32, or the operand dtype).
        scale: the output's scale.
        dims: the call's `Dims`.
        shifts: safe-exp shifts, or None to read q as it is.

    Returns:
        o: [B, T, H, V] in q's dtype.
    """
    B, T, H, K, V, NT, BK, _, dot = dims
    BV = max(16, min(next_power_of_2(V), MAX_OUTPUT_COLUMNS))
    o = empty((B, T, H, V), q.dtype, q.device)
    features = feature_args(shifts, q)
    output_kernel[(cdiv(V, BV), NT, B * H)](
        q,
        features["qs"],
        v,
        gc,
        scores,
        states,
        o,
        scale,
        T,
        gc.shape[1],
        H,
        K,
        V,
        NT,
        C=CHUNK,
        BK=BK,
        BV=BV,
        EXP=features["EXP"],
        **dot,
        **launch_options("output_kernel"),
    )
    return o
