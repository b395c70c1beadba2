"""Gradient building block: the gradients of q, k and v given the chunk states, their gradients and
the within-chunk scores, and the local terms of the gate gradient (q ⊙ dq − k ⊙ dk_intra, k ⊙ dk_inter).

Used by the backward pass of `kernels.triton_gla` (and so by every Triton GLA op), after
`kernels.blocks.chunk_state`; the gate gradient itself is `kernels.blocks.gate.gate_grad`.
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
    load_rows_transposed,
    reuse,
    store_rows,
)

Tensor = torch.Tensor

#: Operands of `query_key_grad_kernel`'s within-chunk products, whatever the input dtype: fp32 in
#: three tf32 passes (close to fp32). The gate gradient takes q ⊙ dq − k ⊙ dk_intra from them, and
#: the pairs of rows at or after a position cancel in that difference; with bf16 operands (dA and
#: the decayed q, k rounded to 8 bits) the rounding of the cancelled parts dominated what is left:
#: the refining gate's logit gradients reached 5e-2 relative (ReGLA, T = 256, under the interpreter's
#: bf16 emulation; tests/test_gate_grad_accuracy.py), 4e-3 with these operands. The products are
#: small ([16, 64] x [64, 32] per program), so they should cost little next to the kernel's loads
#: (not yet timed on a GPU). None: the input dtype's operands, as every other product.
GATE_GRADIENT_PRODUCTS: dict | None = dict(DOT=tl.float32, PREC="tf32x3")

#: Key columns per program of `query_key_grad_kernel`: it holds three [CHUNK, columns] fp32 tiles
#: of the chunk over 2 warps, which 64 columns would spill.
QUERY_KEY_GRAD_COLUMNS = 32


@triton.jit
def intra_score_grad_kernel(
    do, v, dA, scale, T, Tp, H, V, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr
):
    """dA = scale * do @ vᵀ within each chunk, zero above the diagonal: [B, Tp, H, C] fp32."""
    c, bh = tl.program_id(0), tl.program_id(1)
    do_base = do + head_offset(bh, H, T, V)
    v_base = v + head_offset(bh, H, T, V)
    t0 = c * C
    acc = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        do_tile = load_rows(do_base, t0, T, H * V, v0, V, C, BV)
        v_tile = load_rows(v_base, t0, T, H * V, v0, V, C, BV)
        acc += tl.dot(do_tile.to(DOT), tl.trans(v_tile.to(DOT)), input_precision=PREC)
    idx = tl.arange(0, C)
    acc = tl.where(idx[:, None] >= idx[None, :], acc * scale, 0.0)
    store_rows(dA + head_offset(bh, H, Tp, C), acc, t0, Tp, H * C, 0, C, C, C)


@triton.jit
def value_grad_kernel(
    k,
    ks,
    gc,
    A,
    do,
    dstates,
    dv,
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
    """dv = scale * Aᵀ @ do + (k * exp2(b_last - b)) @ dstates[c]."""
    iv, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_base = k + head_offset(bh, H, T, K)
    ks_base = ks + head_offset(bh, H, T, 1)
    g_base = gc + head_offset(bh, H, Tp, K)
    s_base = dstates + (bh.to(tl.int64) * NT + c) * K * V
    t0 = c * C
    dt = DOT
    a_tile = load_rows(A + head_offset(bh, H, Tp, C), t0, Tp, H * C, 0, C, C, C)
    do_tile = load_rows(do + head_offset(bh, H, T, V), t0, T, H * V, iv * BV, V, C, BV)
    acc = tl.dot(tl.trans(a_tile.to(dt)), do_tile.to(dt), input_precision=PREC) * scale
    for k0 in range(0, K, BK):
        k_tile = load_features(k_base, ks_base, t0, T, H * K, k0, K, H, C, BK, EXP)
        g_tile = load_rows(g_base, t0, Tp, H * K, k0, K, C, BK)
        g_last = load_row(g_base + (t0 + C - 1) * H * K, 0, 1, k0, K, BK)
        grad_state = load_rows(s_base, k0, K, V, iv * BV, V, BK, BV)
        k_to_end = (k_tile * tl.exp2(g_last[None, :] - g_tile)).to(dt)
        acc += tl.dot(k_to_end, grad_state.to(dt), input_precision=PREC)
    store_rows(dv + head_offset(bh, H, T, V), acc, t0, T, H * V, iv * BV, V, C, BV)


@triton.jit
def query_key_inter_kernel(
    v,
    gc,
    do,
    states,
    dstates,
    dq,
    dk,
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
):
    """The parts of dq, dk that flow through the chunk-boundary states (fp32), one whole chunk at a time:

    dq_t = scale (do_t statesᵀ) ⊙ e^{b_t},  dk_s = (v_s dstatesᵀ) ⊙ e^{b_last - b_s}.
    Kept apart from the sub-chunk kernel so that each state tile is read once per chunk, not per sub-chunk.
    """
    ik, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    qk_off = head_offset(bh, H, T, K)
    vo_off = head_offset(bh, H, T, V)
    g_base = gc + head_offset(bh, H, Tp, K)
    s_off = (bh.to(tl.int64) * NT + c) * K * V
    t0, k0 = c * C, ik * BK
    dq_acc = tl.zeros([C, BK], dtype=tl.float32)
    dk_acc = tl.zeros([C, BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        do_tile = load_rows(do + vo_off, t0, T, H * V, v0, V, C, BV).to(DOT)
        v_tile = load_rows(v + vo_off, t0, T, H * V, v0, V, C, BV).to(DOT)
        state = load_rows(states + s_off, k0, K, V, v0, V, BK, BV).to(DOT)  # [BK, BV]
        grad_state = load_rows(dstates + s_off, k0, K, V, v0, V, BK, BV).to(DOT)
        dq_acc += tl.dot(do_tile, tl.trans(state), input_precision=PREC)
        dk_acc += tl.dot(v_tile, tl.trans(grad_state), input_precision=PREC)
    g_tile = load_rows(g_base, t0, Tp, H * K, k0, K, C, BK)  # [C, BK]
    g_last = load_row(g_base + (t0 + C - 1) * H * K, 0, 1, k0, K, BK)
    store_rows(dq + qk_off, dq_acc * scale * tl.exp2(g_tile), t0, T, H * K, k0, K, C, BK)
    store_rows(dk + qk_off, dk_acc * tl.exp2(g_last[None, :] - g_tile), t0, T, H * K, k0, K, C, BK)


@triton.jit
def query_key_grad_kernel(
    q,
    k,
    qs,
    ks,
    gc,
    dA,
    dq_inter,
    dk_inter,
    dq,
    dk,
    dG,
    q_rowsum,
    k_rowsum,
    T,
    Tp,
    H,
    K,
    NB,
    C: tl.constexpr,
    S: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
    EXP: tl.constexpr,
):
    """dq, dk and the gate gradient's local terms (fp32) for one sub-chunk of S rows and one block of key
    columns: the within-chunk parts added to the state parts from `query_key_inter_kernel`.

    dG = q ⊙ dq − k ⊙ dk_intra (the keys' within-chunk part only), and dk_inter is overwritten with
    k ⊙ dk_inter (each program owns its tile): `gate.gate_grad_kernel` sums the latter over the
    *earlier* rows of the chunk instead of subtracting it from the state term (see there).

    dq_t += Σ_{s<=t} dA[t,s] k_s ⊙ e^{b_t - b_s},   dk_s += Σ_{t>=s} dA[t,s] q_t ⊙ e^{b_t - b_s}

    With EXP, q and k above are the features φ = exp(x − shift): the stored dq, dk are then the
    gradients of the raw inputs at fixed shifts, φ ⊙ dφ, and q_rowsum / k_rowsum [NB, B, T, H]
    get this key block's row sums of them (the shifts' gradients are minus their totals over blocks).
    """
    ik, pid, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, i = pid // (C // S), pid % (C // S)
    b, h = bh // H, bh % H
    qk_off = head_offset(bh, H, T, K)
    qs_base = qs + head_offset(bh, H, T, 1)
    ks_base = ks + head_offset(bh, H, T, 1)
    g_base = gc + head_offset(bh, H, Tp, K)
    a_base = dA + head_offset(bh, H, Tp, C)
    t0, r0, k0 = c * C, c * C + i * S, ik * BK
    dt = DOT
    dq_acc = load_rows(dq_inter + qk_off, r0, T, H * K, k0, K, S, BK)  # [S, BK] fp32
    dk_through_state = load_rows(dk_inter + qk_off, r0, T, H * K, k0, K, S, BK)
    dk_acc = tl.zeros([S, BK], dtype=tl.float32)  # the within-chunk part, kept apart for the gate gradient
    g_sub = load_rows(g_base, r0, Tp, H * K, k0, K, S, BK)  # [S, BK]

    # Earlier and later sub-chunks of the same chunk, one [S, S] block of the score gradient each
    # (only their rows are loaded and exponentiated), through reference rows: the sub-chunk's first
    # row for the earlier ones, its last for the later ones (exponents <= 0). The later blocks'
    # score-gradient columns are loaded as [S, S] tiles in the product's layout, not transposed in
    # registers. Against one product over the whole chunk with the other rows masked: the kernel
    # 4.79 -> 3.21 ms at 1x8192x96x128, 2.40 -> 1.61 at 16x4096x12x64 (results/kernels/run22).
    g_first = load_row(g_base + r0 * H * K, 0, 1, k0, K, BK)  # first row of the sub-chunk
    g_final = load_row(g_base + (r0 + S - 1) * H * K, 0, 1, k0, K, BK)  # its last row
    dq_part = tl.zeros([S, BK], dtype=tl.float32)
    for j in range(i):
        s0 = t0 + j * S
        k_earlier = load_features(k + qk_off, ks_base, s0, T, H * K, k0, K, H, S, BK, EXP)  # [S, BK]
        g_earlier = load_rows(g_base, s0, Tp, H * K, k0, K, S, BK)
        k_ref = (k_earlier * tl.exp2(g_first[None, :] - g_earlier)).to(dt)
        dA_block = load_rows(a_base, r0, Tp, H * C, j * S, C, S, S)  # dA[t in this sub-chunk, s in j]
        dq_part += tl.dot(dA_block.to(dt), k_ref, input_precision=PREC)
    dq_acc += tl.exp2(g_sub - g_first[None, :]) * dq_part
    dk_part = tl.zeros([S, BK], dtype=tl.float32)
    for j in range(i + 1, C // S):
        s0 = t0 + j * S
        q_later = load_features(q + qk_off, qs_base, s0, T, H * K, k0, K, H, S, BK, EXP)
        g_later = load_rows(g_base, s0, Tp, H * K, k0, K, S, BK)
        q_ref = (q_later * tl.exp2(g_later - g_final[None, :])).to(dt)
        dA_block = load_rows_transposed(a_base, s0, Tp, H * C, i * S, C, S, S)  # [s in this sub-chunk, t in j]
        dk_part += tl.dot(dA_block.to(dt), q_ref, input_precision=PREC)
    dk_acc += tl.exp2(g_final[None, :] - g_sub) * dk_part

    # Diagonal S x S block, exact and in fp32, one row of the sub-chunk (j) at a time, as rank-1
    # updates without reductions: dq_t += dA[t, j] k_j e^{b_t − b_j} for t >= j, and
    # dk_s += dA[j, s] q_j e^{b_j − b_s} for s <= j. One exp2 serves both: of b − b_j on the rows
    # from j on, of b_j − b on the rows up to j (each <= 0 for log gates <= 0).
    # The loop loads its rows through pointers formed once, with plain tl ops (as in
    # `output.intra_scores_kernel`: jit helpers called inside it multiplied the CPU interpreter's time).
    q_sub = load_features(q + qk_off, qs_base, r0, T, H * K, k0, K, H, S, BK, EXP)
    k_sub = load_features(k + qk_off, ks_base, r0, T, H * K, k0, K, H, S, BK, EXP)
    sub = tl.arange(0, S)
    features = k0 + tl.arange(0, BK)
    feature_ok = features < K
    rows_left = T - r0 + features * 0  # per column, so that the row's check is a vector mask
    q_row = q + qk_off + r0 * H * K + features  # pointers to row r0 + j, advanced each step
    k_row = k + qk_off + r0 * H * K + features
    g_row = g_base + r0 * H * K + features
    dA_tj = a_base + (r0 + sub) * H * C + i * S  # dA[t, i·S + j] for the sub-chunk's rows t
    dA_js = a_base + r0 * H * C + i * S + sub  # dA[r0 + j, i·S + s] for its columns s
    for j in range(S):
        in_row = feature_ok & (j < rows_left)
        q_j = tl.load(q_row, mask=in_row, other=0.0).to(tl.float32)
        k_j = tl.load(k_row, mask=in_row, other=0.0).to(tl.float32)
        if EXP:  # rows past T read row T - 1's shifts, and are zeroed
            row = tl.minimum(r0 + j, T - 1) * H
            q_j = tl.where(in_row, tl.exp(q_j - tl.load(qs_base + row)), 0.0)
            k_j = tl.where(in_row, tl.exp(k_j - tl.load(ks_base + row)), 0.0)
        q_j, k_j = q_j[None, :], k_j[None, :]  # [1, BK]
        g_j = tl.load(g_row, mask=feature_ok, other=0.0)[None, :]  # rows and columns < Tp, C always
        dA_col = tl.load(dA_tj)[:, None]  # [S, 1]: dA[t, j]
        dA_row = tl.load(dA_js)[:, None]  # [S, 1]: dA[j, s]
        q_row += H * K
        k_row += H * K
        g_row += H * K
        dA_tj += 1
        dA_js += H * C
        after = sub[:, None] >= j  # [S, 1]
        exponent = g_sub - g_j
        decay = tl.exp2(tl.where(after, exponent, -exponent))
        # The masks select on the [S, 1] score-gradient columns, not on the [S, BK] products: fewer
        # per-element operations (2% faster with safe-exp features, none on plain inputs,
        # results/kernels/run26; the loop waits on its loads, run 27), and the unselected products
        # are 0 · k_j · decay with decay <= 1, the same zeros.
        dq_acc += tl.where(after, dA_col, 0.0) * k_j * decay
        dk_acc += tl.where(sub[:, None] <= j, dA_row, 0.0) * q_j * decay
    # The gate gradient needs q ⊙ dq − k ⊙ dk from the fp32 accumulators, not the rounded outputs.
    dq_local = q_sub * dq_acc
    store_rows(dG + qk_off, dq_local - k_sub * dk_acc, r0, T, H * K, k0, K, S, BK)
    store_rows(dk_inter + qk_off, k_sub * dk_through_state, r0, T, H * K, k0, K, S, BK)
    dk_acc += dk_through_state
    dk_local = k_sub * dk_acc
    if EXP:  # d exp(x − m) / dx = φ: the raw inputs' gradients are φ ⊙ dφ, already formed for dG
        dq_acc = dq_local
        dk_acc = dk_local
        rows_t = r0 + tl.arange(0, S)
        sums_off = ((ik.to(tl.int64) * NB + b) * T + rows_t) * H + h
        tl.store(q_rowsum + sums_off, tl.sum(dq_local, axis=1), mask=rows_t < T)
        tl.store(k_rowsum + sums_off, tl.sum(dk_local, axis=1), mask=rows_t < T)
    store_rows(dq + qk_off, dq_acc, r0, T, H * K, k0, K, S, BK)
    store_rows(dk + qk_off, dk_acc, r0, T, H * K, k0, K, S, BK)


def intra_score_grads(do: Tensor, v: Tensor, scale: float, dims: Dims) -> Tensor:
    """The within-chunk scores' gradient.

    Args:
        do: [B, T, H, V] the output's gradient, contiguous.
        v: [B, T, H, V].
        scale: the output's scale.
        dims: the call's `Dims`.

    Returns:
        score_grad: [B, Tp, H, CHUNK] fp32, laid out as the scores of `output.intra_scores`.
    """
    B, T, H, K, V, NT, BK, BV, dot = dims
    Tp = NT * CHUNK
    score_grad = empty((B, Tp, H, CHUNK), torch.float32, do.device)  # [B, Tp, H, C]
    intra_score_grad_kernel[(NT, B * H)](
        do, v, score_grad, scale, T, Tp, H, V, C=CHUNK, BV=BV, **dot, **launch_options("intra_score_grad_kernel")
    )
    return score_grad


def value_grads(
    k: Tensor,
    gc: Tensor,
    scores: Tensor,
    do: Tensor,
    dstates: Tensor,
    scale: float,
    dims: Dims,
    dtype: torch.dtype,
    shifts: SafeExpShifts | None = None,
) -> Tensor:
    """v's gradient.

    Args:
        k: [B, T, H, K] (raw inputs of the safe-exp features when `shifts` is given).
        gc: [B, Tp, H, K] fp32 within-chunk cumulative log2 gates.
        scores: [B, Tp, H, CHUNK] fp32 within-chunk scores from the forward.
        do: [B, T, H, V] the output's gradient, contiguous.
        dstates: [B, H, NT, K, V] fp32 from `chunk_state.chunk_state_grads`.
        scale: the output's scale.
        dims: the call's `Dims`.
        dtype: the result's dtype (v's).
        shifts: safe-exp shifts, or None to read k as it is.

    Returns:
        dv: [B, T, H, V] in `dtype`.
    """
    B, T, H, K, V, NT, BK, BV, dot = dims
    features = feature_args(shifts, k)
    dv = empty((B, T, H, V), dtype, k.device)
    value_grad_kernel[(cdiv(V, BV), NT, B * H)](
        k,
        features["ks"],
        gc,
        scores,
        do,
        dstates,
        dv,
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
        **launch_options("value_grad_kernel"),
    )
    return dv


def query_key_inter_grads(
    v: Tensor, gc: Tensor, do: Tensor, states: Tensor, dstates: Tensor, scale: float, dims: Dims
) -> tuple[Tensor, Tensor]:
    """The parts of q's and k's gradients that flow through the chunk states (see `query_key_inter_kernel`).

    Args:
        v: [B, T, H, V].
        gc: [B, Tp, H, K] fp32 within-chunk cumulative log2 gates.
        do: [B, T, H, V] the output's gradient, contiguous.
        states: [B, H, NT, K, V] fp32 from `chunk_state.chunk_states`.
        dstates: [B, H, NT, K, V] fp32 from `chunk_state.chunk_state_grads`.
        scale: the output's scale.
        dims: the call's `Dims`.

    Returns:
        dq_inter, dk_inter: [B, T, H, K] fp32 each, gradients of the features (φ(q), φ(k) with safe-exp).
    """
    B, T, H, K, V, NT, BK, BV, dot = dims
    dq_inter = empty((B, T, H, K), torch.float32, v.device)  # through the chunk states
    dk_inter = empty((B, T, H, K), torch.float32, v.device)
    query_key_inter_kernel[(cdiv(K, BK), NT, B * H)](
        v,
        gc,
        do,
        states,
        dstates,
        dq_inter,
        dk_inter,
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
        **dot,
        **launch_options("query_key_inter_kernel"),
    )
    return dq_inter, dk_inter


def query_key_grads(
    q: Tensor,
    k: Tensor,
    gc: Tensor,
    score_grad: Tensor,
    dq_inter: Tensor,
    dk_inter: Tensor,
    dims: Dims,
    shifts: SafeExpShifts | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """q's and k's gradients (the within-chunk parts added to the state parts), and the gate's local terms.

    Args:
        q, k: [B, T, H, K] (raw inputs of the safe-exp features when `shifts` is given).
        gc: [B, Tp, H, K] fp32 within-chunk cumulative log2 gates.
        score_grad: [B, Tp, H, CHUNK] fp32 from `intra_score_grads`.
        dq_inter, dk_inter: [B, T, H, K] fp32 from `query_key_inter_grads`; both are overwritten
            (returned as `dG` and `key_state_term`).
        dims: the call's `Dims`.
        shifts: safe-exp shifts, or None to read q and k as they are.

    Returns:
        dq, dk: [B, T, H, K]; in q's and k's dtypes without `shifts`. With `shifts`, the raw inputs'
            gradients at fixed shifts, in fp32 (the max shifts' terms, which nearly cancel them at the
            maxima, are still to be added: `max_shift.add_max_gradient`).
        dG: [B, T, H, K] fp32, q ⊙ dq − k ⊙ dk_intra of the features, a local term of the gate
            gradient (dq_inter's buffer, overwritten).
        key_state_term: [B, T, H, K] fp32, k ⊙ dk_inter, the other one (dk_inter's buffer, overwritten).
        rowsums: with `shifts`, the per-key-block row sums of dq and of dk, [NB, B, T, H] fp32 each
            (NB key blocks; the shifts' gradients are minus their sums over blocks); None without.
    """
    B, T, H, K, V, NT, BK, BV, dot = dims
    features = feature_args(shifts, q)
    dq = empty((B, T, H, K), q.dtype if shifts is None else torch.float32, q.device)
    dk = empty((B, T, H, K), k.dtype if shifts is None else torch.float32, q.device)
    # q ⊙ dq − k ⊙ dk, the gate's local term, goes where dq_inter was (as k ⊙ dk_inter where
    # dk_inter was): each program stores into the tile it read first, and the stores depend on
    # those loads. One [B, T, H, K] fp32 buffer less at the backward's peak.
    dG = reuse(dq_inter)
    BKD = min(BK, QUERY_KEY_GRAD_COLUMNS)
    # Per key block row sums of the raw dq, dk (safe-exp only): summed by the caller, deterministically.
    rowsums = [empty((cdiv(K, BKD), B, T, H), torch.float32, q.device) if shifts is not None else dG for _ in range(2)]
    query_key_grad_kernel[(cdiv(K, BKD), NT * (CHUNK // SUB_CHUNK), B * H)](
        q,
        k,
        features["qs"],
        features["ks"],
        gc,
        score_grad,
        dq_inter,
        dk_inter,
        dq,
        dk,
        dG,
        *rowsums,
        T,
        gc.shape[1],
        H,
        K,
        B,
        C=CHUNK,
        S=SUB_CHUNK,
        BK=BKD,
        EXP=features["EXP"],
        **(GATE_GRADIENT_PRODUCTS or dot),
        **launch_options("query_key_grad_kernel" if shifts is None else "query_key_grad_kernel_safe_exp"),
    )
    return dq, dk, dG, dk_inter, (tuple(rowsums) if shifts is not None else None)
