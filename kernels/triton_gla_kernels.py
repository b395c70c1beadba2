"""Triton kernels for chunked gated linear attention with a key-side gate (the CUDA fast path).

Layout: q, k, do: [B, T, H, K]; v, o: [B, T, H, V]; every tensor contiguous. The sequence is cut
into chunks of C = 64 positions; chunk c covers rows [c*C, c*C + C). `gc` holds the cumulative
log gate *within* each chunk, in fp32 and in log2 units (so every decay is one `exp2`), on a
time axis padded to a whole number of chunks with zero log gates: padded rows then carry the
last real row's value, so every "to the chunk end" exponent is still a difference of a later
and an earlier cumulative gate, i.e. <= 0, and padded rows need no special case.

Exponents are only ever formed as b_later - b_earlier (<= 0) or masked to -inf before `exp2`,
so no gate value can overflow. Inside a chunk the pairwise decays exp2(b_t - b_s) are exact:
rows are handled in sub-chunks of S = 16; earlier sub-chunks are reached through one reference
row of cumulative gates (two factors, each <= 1, around a tensor-core product), the 16 x 16
diagonal block through a [16, 16, features] tensor of pairwise decays in fp32, a few feature
columns at a time so that the tensor stays within registers.

Matrix products take their operands in DOT, the input dtype on GPUs (bf16 on tensor cores); the
launcher passes fp32 under Triton's CPU interpreter, which evaluates bf16 products wrongly.

States between chunks are kept in fp32: [B, H, NT, K, V], written by one sequential pass over the
chunks (forward) and one in reverse (backward); everything else is parallel over chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl

CHUNK = 64
SUB_CHUNK = 16
# Feature columns per [SUB_CHUNK, SUB_CHUNK, features] fp32 decay tensor of a diagonal block: 32
# keeps one such tensor at 64 registers a thread over 4 warps; 64 columns would double that.
DIAG_FEATURES = 32


@triton.jit
def _load_rows(ptr, row0, n_rows, row_stride, col0, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """A [BR, BC] tile of rows row0.. and columns col0.. as fp32-ready values; zeros outside."""
    rows = row0 + tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, row0, n_rows, row_stride, col0, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    rows = row0 + tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_row(ptr, row, n_rows, col0, n_cols, BC: tl.constexpr):
    """Columns col0.. of the row that `ptr` points at (a [BC] vector); zeros past n_cols, or
    everywhere when that row's index `row` is past n_rows."""
    cols = col0 + tl.arange(0, BC)
    return tl.load(ptr + cols, mask=(cols < n_cols) & (cols * 0 + row < n_rows), other=0.0)


@triton.jit
def _load_features(
    ptr,
    shift,
    row0,
    n_rows,
    row_stride,
    col0,
    n_cols,
    shift_stride,
    BR: tl.constexpr,
    BC: tl.constexpr,
    EXP: tl.constexpr,
):
    """A [BR, BC] tile of q or k in fp32 (as `_load_rows`); with EXP, the safe-exp features
    exp(x − shift_row) instead, zero outside. `shift` points at this (batch, head)'s per-row
    shifts, `shift_stride` apart. Features are formed here, on load, so they never exist in memory."""
    rows = row0 + tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if EXP:
        m = tl.load(shift + rows * shift_stride, mask=rows < n_rows, other=0.0)
        x = tl.where(mask, tl.exp(x - m[:, None]), 0.0)
    return x


@triton.jit
def _diagonal_decay(g_sub, S: tl.constexpr):
    """[S(t), S(s), BC] pairwise decays exp2(b_t − b_s) inside one sub-chunk from its cumulative
    gates g_sub [S, BC]; zero above the diagonal (t < s), where the exponent would be positive."""
    sub = tl.arange(0, S)
    causal = (sub[:, None] >= sub[None, :])[:, :, None]
    return tl.exp2(tl.where(causal, g_sub[:, None, :] - g_sub[None, :, :], float("-inf")))


@triton.jit
def state_forward_kernel(
    k,
    ks,
    v,
    gc,
    h0,
    states,
    ht,
    T,
    Tp,
    H,
    K,
    V,
    NT,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
    EXP: tl.constexpr,
):
    """Sequential pass over chunks: states[c] is the state entering chunk c; ht the final one."""
    ik, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    k_base = k + (b.to(tl.int64) * T * H + h) * K  # row stride H*K
    ks_base = ks + b.to(tl.int64) * T * H + h  # per-row key shifts, row stride H
    v_base = v + (b.to(tl.int64) * T * H + h) * V
    g_base = gc + (b.to(tl.int64) * Tp * H + h) * K
    kv_base = bh.to(tl.int64) * NT * K * V
    if HAS_H0:
        state = _load_rows(h0 + bh.to(tl.int64) * K * V, ik * BK, K, V, iv * BV, V, BK, BV).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    dt = DOT
    for c in range(NT):
        _store_rows(states + kv_base + c * K * V, state, ik * BK, K, V, iv * BV, V, BK, BV)
        t0 = c * C
        k_tile = _load_features(k_base, ks_base, t0, T, H * K, ik * BK, K, H, C, BK, EXP)  # [C, BK]
        v_tile = _load_rows(v_base, t0, T, H * V, iv * BV, V, C, BV).to(dt)  # [C, BV]
        g_tile = _load_rows(g_base, t0, Tp, H * K, ik * BK, K, C, BK)  # [C, BK]
        g_last = _load_row(g_base + (t0 + C - 1) * H * K, 0, 1, ik * BK, K, BK)  # [BK]
        k_to_end = (k_tile * tl.exp2(g_last[None, :] - g_tile)).to(dt)
        state = state * tl.exp2(g_last)[:, None] + tl.dot(tl.trans(k_to_end), v_tile, input_precision=PREC)
    if STORE_HT:
        _store_rows(ht + bh.to(tl.int64) * K * V, state, ik * BK, K, V, iv * BV, V, BK, BV)


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

    One program per (sub-chunk of S rows, batch*head); A is [B, Tp, H, C] in fp32. Earlier
    sub-chunks go through tensor-core products over BK key columns at a time, the diagonal block
    through [S, S, BD] decay tensors over BD (<= BK) columns at a time.
    """
    pid, bh = tl.program_id(0), tl.program_id(1)
    c, i = pid // (C // S), pid % (C // S)
    b, h = bh // H, bh % H
    q_base = q + (b.to(tl.int64) * T * H + h) * K
    k_base = k + (b.to(tl.int64) * T * H + h) * K
    qs_base = qs + b.to(tl.int64) * T * H + h
    ks_base = ks + b.to(tl.int64) * T * H + h
    g_base = gc + (b.to(tl.int64) * Tp * H + h) * K
    t0, r0 = c * C, c * C + i * S
    cols = tl.arange(0, C)  # chunk-relative columns
    dt = DOT
    acc = tl.zeros([S, C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        q_sub = _load_features(q_base, qs_base, r0, T, H * K, k0, K, H, S, BK, EXP)  # [S, BK]
        g_sub = _load_rows(g_base, r0, Tp, H * K, k0, K, S, BK)  # [S, BK]
        k_chunk = _load_features(k_base, ks_base, t0, T, H * K, k0, K, H, C, BK, EXP)  # [C, BK]
        g_chunk = _load_rows(g_base, t0, Tp, H * K, k0, K, C, BK)  # [C, BK]
        g_ref = _load_row(g_base + r0 * H * K, 0, 1, k0, K, BK)  # [BK], first row of the sub-chunk
        # Earlier sub-chunks: b_t - b_s = (b_t - b_ref) + (b_ref - b_s), both parts <= 0.
        q_ref = (q_sub * tl.exp2(g_sub - g_ref[None, :])).to(dt)
        earlier = cols[:, None] < i * S
        k_ref = (k_chunk * tl.exp2(tl.where(earlier, g_ref[None, :] - g_chunk, float("-inf")))).to(dt)
        acc += tl.dot(q_ref, tl.trans(k_ref), input_precision=PREC)
    # Diagonal S x S block: exact pairwise decays in fp32. Its own feature loop, over narrower
    # pieces than BK, keeps the [S, S, BD] tensors within registers.
    diag = tl.zeros([S, S], dtype=tl.float32)
    for d0 in range(0, K, BD):
        q_d = _load_features(q_base, qs_base, r0, T, H * K, d0, K, H, S, BD, EXP)  # [S, BD]
        k_d = _load_features(k_base, ks_base, r0, T, H * K, d0, K, H, S, BD, EXP)
        g_d = _load_rows(g_base, r0, Tp, H * K, d0, K, S, BD)
        diag += tl.sum(q_d[:, None, :] * k_d[None, :, :] * _diagonal_decay(g_d, S), axis=2)
    # acc holds the earlier sub-chunks and zeros from the diagonal block on; the two stores cover
    # disjoint columns, as nothing orders the stores of one program's threads to the same address.
    a_base = A + (b.to(tl.int64) * Tp * H + h) * C
    off_diagonal = (cols[None, :] < i * S) | (cols[None, :] >= i * S + S)
    rows_t = r0 + tl.arange(0, S)
    tl.store(a_base + rows_t[:, None] * H * C + cols[None, :], acc, mask=off_diagonal & (rows_t[:, None] < Tp))
    _store_rows(a_base, diag, r0, Tp, H * C, i * S, C, S, S)


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
    b, h = bh // H, bh % H
    q_base = q + (b.to(tl.int64) * T * H + h) * K
    v_base = v + (b.to(tl.int64) * T * H + h) * V
    g_base = gc + (b.to(tl.int64) * Tp * H + h) * K
    qs_base = qs + b.to(tl.int64) * T * H + h
    s_base = states + (bh.to(tl.int64) * NT + c) * K * V
    t0 = c * C
    dt = DOT
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        q_tile = _load_features(q_base, qs_base, t0, T, H * K, k0, K, H, C, BK, EXP)
        g_tile = _load_rows(g_base, t0, Tp, H * K, k0, K, C, BK)
        state = _load_rows(s_base, k0, K, V, iv * BV, V, BK, BV)  # [BK, BV] fp32
        q_from_start = (q_tile * tl.exp2(g_tile)).to(dt)
        acc += tl.dot(q_from_start, state.to(dt), input_precision=PREC)
    a_tile = _load_rows(A + (b.to(tl.int64) * Tp * H + h) * C, t0, Tp, H * C, 0, C, C, C)
    v_tile = _load_rows(v_base, t0, T, H * V, iv * BV, V, C, BV).to(dt)
    acc += tl.dot(a_tile.to(dt), v_tile, input_precision=PREC)
    _store_rows(o + (b.to(tl.int64) * T * H + h) * V, acc * scale, t0, T, H * V, iv * BV, V, C, BV)


@triton.jit
def state_backward_kernel(
    q,
    qs,
    do,
    gc,
    dht,
    dstates,
    dh0,
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
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
    EXP: tl.constexpr,
):
    """Reverse pass: dstates[c] is the gradient of the state leaving chunk c; dh0 of the initial one."""
    ik, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    q_base = q + (b.to(tl.int64) * T * H + h) * K
    qs_base = qs + b.to(tl.int64) * T * H + h
    do_base = do + (b.to(tl.int64) * T * H + h) * V
    g_base = gc + (b.to(tl.int64) * Tp * H + h) * K
    kv_base = bh.to(tl.int64) * NT * K * V
    if HAS_DHT:
        grad = _load_rows(dht + bh.to(tl.int64) * K * V, ik * BK, K, V, iv * BV, V, BK, BV).to(tl.float32)
    else:
        grad = tl.zeros([BK, BV], dtype=tl.float32)
    dt = DOT
    for step in range(NT):
        c = NT - 1 - step
        _store_rows(dstates + kv_base + c * K * V, grad, ik * BK, K, V, iv * BV, V, BK, BV)
        t0 = c * C
        q_tile = _load_features(q_base, qs_base, t0, T, H * K, ik * BK, K, H, C, BK, EXP)
        do_tile = _load_rows(do_base, t0, T, H * V, iv * BV, V, C, BV)
        g_tile = _load_rows(g_base, t0, Tp, H * K, ik * BK, K, C, BK)
        g_last = _load_row(g_base + (t0 + C - 1) * H * K, 0, 1, ik * BK, K, BK)
        q_from_start = (q_tile * tl.exp2(g_tile) * scale).to(dt)
        grad = grad * tl.exp2(g_last)[:, None] + tl.dot(tl.trans(q_from_start), do_tile.to(dt), input_precision=PREC)
    if STORE_DH0:
        _store_rows(dh0 + bh.to(tl.int64) * K * V, grad, ik * BK, K, V, iv * BV, V, BK, BV)


@triton.jit
def intra_score_grad_kernel(
    do, v, dA, scale, T, Tp, H, V, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr
):
    """dA = scale * do @ vᵀ within each chunk, zero above the diagonal: [B, Tp, H, C] fp32."""
    c, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    do_base = do + (b.to(tl.int64) * T * H + h) * V
    v_base = v + (b.to(tl.int64) * T * H + h) * V
    t0 = c * C
    acc = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        do_tile = _load_rows(do_base, t0, T, H * V, v0, V, C, BV)
        v_tile = _load_rows(v_base, t0, T, H * V, v0, V, C, BV)
        acc += tl.dot(do_tile.to(DOT), tl.trans(v_tile.to(DOT)), input_precision=PREC)
    idx = tl.arange(0, C)
    acc = tl.where(idx[:, None] >= idx[None, :], acc * scale, 0.0)
    _store_rows(dA + (b.to(tl.int64) * Tp * H + h) * C, acc, t0, Tp, H * C, 0, C, C, C)


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
    b, h = bh // H, bh % H
    k_base = k + (b.to(tl.int64) * T * H + h) * K
    ks_base = ks + b.to(tl.int64) * T * H + h
    g_base = gc + (b.to(tl.int64) * Tp * H + h) * K
    s_base = dstates + (bh.to(tl.int64) * NT + c) * K * V
    t0 = c * C
    dt = DOT
    a_tile = _load_rows(A + (b.to(tl.int64) * Tp * H + h) * C, t0, Tp, H * C, 0, C, C, C)
    do_tile = _load_rows(do + (b.to(tl.int64) * T * H + h) * V, t0, T, H * V, iv * BV, V, C, BV)
    acc = tl.dot(tl.trans(a_tile.to(dt)), do_tile.to(dt), input_precision=PREC) * scale
    for k0 in range(0, K, BK):
        k_tile = _load_features(k_base, ks_base, t0, T, H * K, k0, K, H, C, BK, EXP)
        g_tile = _load_rows(g_base, t0, Tp, H * K, k0, K, C, BK)
        g_last = _load_row(g_base + (t0 + C - 1) * H * K, 0, 1, k0, K, BK)
        grad_state = _load_rows(s_base, k0, K, V, iv * BV, V, BK, BV)
        k_to_end = (k_tile * tl.exp2(g_last[None, :] - g_tile)).to(dt)
        acc += tl.dot(k_to_end, grad_state.to(dt), input_precision=PREC)
    _store_rows(dv + (b.to(tl.int64) * T * H + h) * V, acc, t0, T, H * V, iv * BV, V, C, BV)


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
    b, h = bh // H, bh % H
    qk_off = (b.to(tl.int64) * T * H + h) * K
    vo_off = (b.to(tl.int64) * T * H + h) * V
    g_base = gc + (b.to(tl.int64) * Tp * H + h) * K
    s_off = (bh.to(tl.int64) * NT + c) * K * V
    t0, k0 = c * C, ik * BK
    dq_acc = tl.zeros([C, BK], dtype=tl.float32)
    dk_acc = tl.zeros([C, BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        do_tile = _load_rows(do + vo_off, t0, T, H * V, v0, V, C, BV).to(DOT)
        v_tile = _load_rows(v + vo_off, t0, T, H * V, v0, V, C, BV).to(DOT)
        state = _load_rows(states + s_off, k0, K, V, v0, V, BK, BV).to(DOT)  # [BK, BV]
        grad_state = _load_rows(dstates + s_off, k0, K, V, v0, V, BK, BV).to(DOT)
        dq_acc += tl.dot(do_tile, tl.trans(state), input_precision=PREC)
        dk_acc += tl.dot(v_tile, tl.trans(grad_state), input_precision=PREC)
    g_tile = _load_rows(g_base, t0, Tp, H * K, k0, K, C, BK)  # [C, BK]
    g_last = _load_row(g_base + (t0 + C - 1) * H * K, 0, 1, k0, K, BK)
    _store_rows(dq + qk_off, dq_acc * scale * tl.exp2(g_tile), t0, T, H * K, k0, K, C, BK)
    _store_rows(dk + qk_off, dk_acc * tl.exp2(g_last[None, :] - g_tile), t0, T, H * K, k0, K, C, BK)


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
    """dq, dk and dG = q ⊙ dq − k ⊙ dk (fp32) for one sub-chunk of S rows and one block of key columns:
    the within-chunk parts added to the state parts from `query_key_inter_kernel`.

    dq_t += Σ_{s<=t} dA[t,s] k_s ⊙ e^{b_t - b_s},   dk_s += Σ_{t>=s} dA[t,s] q_t ⊙ e^{b_t - b_s}

    With EXP, q and k above are the features φ = exp(x − shift): the stored dq, dk are then the
    gradients of the raw inputs at fixed shifts, φ ⊙ dφ, and q_rowsum / k_rowsum [NB, B, T, H]
    get this key block's row sums of them (the shifts' gradients are minus their totals over blocks).
    """
    ik, pid, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, i = pid // (C // S), pid % (C // S)
    b, h = bh // H, bh % H
    qk_off = (b.to(tl.int64) * T * H + h) * K
    qs_base = qs + b.to(tl.int64) * T * H + h
    ks_base = ks + b.to(tl.int64) * T * H + h
    g_base = gc + (b.to(tl.int64) * Tp * H + h) * K
    a_base = dA + (b.to(tl.int64) * Tp * H + h) * C
    t0, r0, k0 = c * C, c * C + i * S, ik * BK
    dt = DOT
    dq_acc = _load_rows(dq_inter + qk_off, r0, T, H * K, k0, K, S, BK)  # [S, BK] fp32
    dk_acc = _load_rows(dk_inter + qk_off, r0, T, H * K, k0, K, S, BK)
    g_sub = _load_rows(g_base, r0, Tp, H * K, k0, K, S, BK)  # [S, BK]

    # Earlier / later sub-chunks of the same chunk, through reference rows (exponents <= 0).
    cols = tl.arange(0, C)
    q_chunk = _load_features(q + qk_off, qs_base, t0, T, H * K, k0, K, H, C, BK, EXP)  # [C, BK]
    k_chunk = _load_features(k + qk_off, ks_base, t0, T, H * K, k0, K, H, C, BK, EXP)
    g_chunk = _load_rows(g_base, t0, Tp, H * K, k0, K, C, BK)
    g_first = _load_row(g_base + r0 * H * K, 0, 1, k0, K, BK)  # first row of the sub-chunk
    g_final = _load_row(g_base + (r0 + S - 1) * H * K, 0, 1, k0, K, BK)  # its last row
    earlier = cols[:, None] < i * S
    later = cols[:, None] >= i * S + S
    k_ref = (k_chunk * tl.exp2(tl.where(earlier, g_first[None, :] - g_chunk, float("-inf")))).to(dt)
    q_ref = (q_chunk * tl.exp2(tl.where(later, g_chunk - g_final[None, :], float("-inf")))).to(dt)
    dA_rows = _load_rows(a_base, r0, Tp, H * C, 0, C, S, C)  # [S, C]: dA[t in sub-chunk, s]
    dA_cols = _load_rows(a_base, t0, Tp, H * C, i * S, C, C, S)  # [C, S]: dA[t, s in sub-chunk]
    dq_acc += tl.exp2(g_sub - g_first[None, :]) * tl.dot(dA_rows.to(dt), k_ref, input_precision=PREC)
    dk_acc += tl.exp2(g_final[None, :] - g_sub) * tl.dot(tl.trans(dA_cols.to(dt)), q_ref, input_precision=PREC)

    # Diagonal S x S block, exact and in fp32: one [S(t), S(s), BK] tensor of pairwise decays serves
    # both directions (BK is kept narrow by the launcher so that it stays within registers).
    q_sub = _load_features(q + qk_off, qs_base, r0, T, H * K, k0, K, H, S, BK, EXP)
    k_sub = _load_features(k + qk_off, ks_base, r0, T, H * K, k0, K, H, S, BK, EXP)
    dA_diag = _load_rows(a_base, r0, Tp, H * C, i * S, C, S, S)[:, :, None]  # dA[t, s], both in the sub-chunk
    decay = _diagonal_decay(g_sub, S)
    dq_acc += tl.sum(dA_diag * k_sub[None, :, :] * decay, axis=1)
    dk_acc += tl.sum(dA_diag * q_sub[:, None, :] * decay, axis=0)
    # The gate gradient needs q ⊙ dq − k ⊙ dk from the fp32 accumulators, not the rounded outputs.
    dq_local = q_sub * dq_acc
    dk_local = k_sub * dk_acc
    _store_rows(dG + qk_off, dq_local - dk_local, r0, T, H * K, k0, K, S, BK)
    if EXP:  # d exp(x − m) / dx = φ: the raw inputs' gradients are φ ⊙ dφ, already formed for dG
        dq_acc = dq_local
        dk_acc = dk_local
        rows_t = r0 + tl.arange(0, S)
        sums_off = ((ik.to(tl.int64) * NB + b) * T + rows_t) * H + h
        tl.store(q_rowsum + sums_off, tl.sum(dq_local, axis=1), mask=rows_t < T)
        tl.store(k_rowsum + sums_off, tl.sum(dk_local, axis=1), mask=rows_t < T)
    _store_rows(dq + qk_off, dq_acc, r0, T, H * K, k0, K, S, BK)
    _store_rows(dk + qk_off, dk_acc, r0, T, H * K, k0, K, S, BK)


@triton.jit
def _add_row_decay(log_gate, row_decay, b, h, rows, T, H, ROW_DECAY: tl.constexpr):
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
        src = g + (b.to(tl.int64) * T * H + h) * G_DIM + rows[:, None] * H * G_DIM + cols[None, :] * 0
    else:
        src = g + (b.to(tl.int64) * T * H + h) * G_DIM + rows[:, None] * H * G_DIM + cols[None, :]
    gate = tl.load(src, mask=(rows[:, None] < T) & (cols[None, :] < K), other=0.0).to(tl.float32)
    gate = _add_row_decay(gate, row_decay, b, h, rows, T, H, ROW_DECAY)
    cumulative = tl.cumsum(gate, axis=0) * log2e
    _store_rows(gc + (b.to(tl.int64) * Tp * H + h) * K, cumulative, c * C, Tp, H * K, ik * BK, K, C, BK)


@triton.jit
def gate_grad_kernel(
    dG,
    states,
    final,
    dstates,
    dg,
    T,
    H,
    K,
    V,
    NT,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_FINAL: tl.constexpr,
):
    """dg_t = Σ_{u >= t, u in t's chunk} dG_u + rowsum(S_end ⊙ dS_end), S_end the state leaving the chunk.

    The cumulative log gates inside a chunk feed the outputs and the state update; the state
    leaving the chunk carries everything later positions see, so its term, rowsum(S ⊙ dS), closes
    the sum. Summing dG only within a chunk keeps the rounding of the q ⊙ dq − k ⊙ dk
    cancellation local instead of accumulating it over the whole sequence.
    """
    ik, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    base = (b.to(tl.int64) * T * H + h) * K
    k_idx = ik * BK + tl.arange(0, BK)
    chunk = k_idx[:, None] * 0 + c  # [BK, 1]: the chunk index as a tensor, to combine with masks
    carry = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        v_idx = v0 + tl.arange(0, BV)
        inside = (k_idx[:, None] < K) & (v_idx[None, :] < V)
        offsets = k_idx[:, None] * V + v_idx[None, :]
        grad_end = tl.load(dstates + (bh.to(tl.int64) * NT + c) * K * V + offsets, mask=inside, other=0.0)
        state_end = tl.load(
            states + (bh.to(tl.int64) * NT + c + 1) * K * V + offsets, mask=inside & (chunk + 1 < NT), other=0.0
        )
        if HAS_FINAL:
            state_end += tl.load(final + bh.to(tl.int64) * K * V + offsets, mask=inside & (chunk == NT - 1), other=0.0)
        carry += tl.sum(state_end * grad_end, axis=1)
    x = _load_rows(dG + base, c * C, T, H * K, ik * BK, K, C, BK)  # [C, BK] fp32
    # Reverse inclusive sum within the chunk: total - (inclusive prefix) + x.
    suffix = tl.sum(x, axis=0)[None, :] - tl.cumsum(x, axis=0) + x + carry[None, :]
    _store_rows(dg + base, suffix, c * C, T, H * K, ik * BK, K, C, BK)
