"""Output building block with an epilogue: the per-head RMSNorm of the output and the swish output
gate, applied to each output tile before it is stored, and their backward.

    o = scale · ((q ⊙ e^b) states[c] + A v)              (as `kernels.blocks.output`)
    y = o / sqrt(mean(o²) + eps_t) ⊙ w ⊙ silu(g),    eps_t = eps, or eps · exp(−2 (qs_t + ks_t))

The second eps is the norm's eps in the frame without safe-exp's shifts (eps · exp(2 log_scale),
with the layer's `log_scale` = −(query shift + key shift)). As the composed norm does
(`variants.norms.unit_rows`), each row is divided by its largest magnitude, or by sqrt(eps_t) where
that is larger, and eps_t by the square of that, formed in log space: the norm is unchanged, but
neither o nor eps_t is squared as it is. In safe-exp's shifted frame under a closed gate o can be
~1e-20 and below, and its square (and eps_t in the unshifted frame) underflows fp32.

One program holds a chunk's rows over all V columns (V <= 256), so each row's mean square is
complete in registers: o itself is never written. The backward recomputes o the same way from what
the forward keeps anyway (q, v, the cumulative gates, the scores, and the chunk states, which the
backward recomputes regardless), and writes the gradient of o for the attention's own backward, the
gate's gradient, per-chunk partial sums of the weight's gradient, and the gradient of the eps
frame's log scale, which the caller routes to the shifts. Everything is in fp32 until the store.

A row whose mean square and eps are both zero (the padding rows of packed sequences, where φ = 0 and
the shifts are +inf) gets a zero output and zero gradients rather than 0 · inf.

Used by the forward and backward passes of `kernels.triton_gla` when the op (`kernels.triton_regla`)
is given a norm.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import (
    CHUNK,
    Dims,
    SafeExpShifts,
    empty,
    feature_args,
    head_offset,
    launch_options,
    load_row,
    load_rows,
    next_power_of_2,
    store_rows,
)
from .output import output_tile

Tensor = torch.Tensor

# A [CHUNK, BK] q tile and a [BK, V] state tile next to the [CHUNK, V] output: narrower key tiles
# for wide values keep the three within registers (8192 elements per tile).
_TILE_ELEMENTS = 8192
_FP32_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)


class NormEpilogue(NamedTuple):
    """What the epilogue applies to the output: a per-head RMSNorm, and optionally the swish gate."""

    eps: float  # >= 0
    weight: Tensor | None  # [V] shared by the heads, or None for no affine weight
    gate: Tensor | None  # [B, T, H, V] contiguous, in the kernels' time layout, or None for no gate
    unshifted: bool  # eps · exp(−2 (query shift + key shift)) per row (needs safe-exp shifts)


class EpilogueGrads(NamedTuple):
    do: Tensor  # [B, T, H, V] in q's dtype: the gradient of the unnormalised output
    d_gate: Tensor | None  # [B, T, H, V] in the gate's dtype
    d_weight: Tensor | None  # [V] fp32
    d_log_scale: Tensor | None  # [B, T, H] fp32, with `unshifted`: ∂L/∂log_scale, log_scale = −(qs + ks)


@triton.jit
def row_log_eps(log_eps, qs_base, ks_base, rows, T, H, C: tl.constexpr, UNSHIFTED: tl.constexpr):
    """log eps_t for each of C rows: log eps, or log eps − 2 (qs + ks) in the unshifted frame
    (−inf for padding rows, whose shifts are +inf, and for eps = 0)."""
    if UNSHIFTED:
        inside = rows < T
        shift = tl.load(qs_base + rows * H, mask=inside, other=0.0) + tl.load(
            ks_base + rows * H, mask=inside, other=0.0
        )
        return log_eps - 2.0 * shift
    return tl.zeros([C], dtype=tl.float32) + log_eps


@triton.jit
def unit_rows(o, log_eps):
    """x = o [C, BV] / s, eps_t / s² (from log eps_t) and s per row, s the row's largest magnitude
    or sqrt(eps_t) where that is larger: the norm of x with eps_t / s² equals the norm of o with
    eps_t. Either mean(x²) >= 1 / V or eps_t / s² = 1, so mean(x²) + eps_t / s² lies in [1 / V, 2]
    however small or large o and eps_t are, and it needs no cap (as `variants.norms.unit_rows`).
    s cancels in the norm: it takes no gradient."""
    magnitude = tl.maximum(tl.max(tl.abs(o), axis=1), tl.exp(0.5 * log_eps))
    magnitude = tl.maximum(magnitude, _FP32_TINY)
    return o / magnitude[:, None], tl.exp(log_eps - 2.0 * tl.log(magnitude)), magnitude


@triton.jit
def inverse_rms(o, row_eps, V):
    """1 / sqrt(mean(o²) + eps) per row of o [C, BV] (zero past V); 0 where both terms are 0."""
    denominator = tl.sum(o * o, axis=1) / V + row_eps
    positive = denominator > 0
    return tl.where(positive, 1.0 / tl.sqrt(tl.where(positive, denominator, 1.0)), 0.0)


@triton.jit
def normalised_tile(
    q,
    qs,
    ks,
    v,
    gc,
    A,
    states,
    scale,
    log_eps,
    c,
    bh,
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
    UNSHIFTED: tl.constexpr,
):
    """Chunk c of (batch, head) bh: o recomputed (`output_tile`) and normalised, as the forward
    and the backward both need it. Returns n = o / sqrt(mean(o²) + eps_t) [C, BV], and from
    `unit_rows` r = 1 / sqrt(mean(x²) + eps_t / s²), eps_t / s² and s per row (x = o / s)."""
    t0 = c * C
    qs_base = qs + head_offset(bh, H, T, 1)
    o = output_tile(
        q + head_offset(bh, H, T, K),
        qs_base,
        v + head_offset(bh, H, T, V),
        gc + head_offset(bh, H, Tp, K),
        A + head_offset(bh, H, Tp, C),
        states + (bh.to(tl.int64) * NT + c) * K * V,
        t0,
        0,
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
    rows = t0 + tl.arange(0, C)
    log_eps_t = row_log_eps(log_eps, qs_base, ks + head_offset(bh, H, T, 1), rows, T, H, C, UNSHIFTED)
    x, eps_x, s = unit_rows(o * scale, log_eps_t)
    r = inverse_rms(x, eps_x, V)
    return x * r[:, None], r, eps_x, s


@triton.jit
def normed_output_kernel(
    q,
    qs,
    ks,
    v,
    gc,
    A,
    states,
    gate,
    weight,
    y,
    scale,
    log_eps,
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
    UNSHIFTED: tl.constexpr,
    AFFINE: tl.constexpr,
    GATED: tl.constexpr,
):
    """y = norm(o) ⊙ w ⊙ silu(g) for one chunk of one (batch, head), all V columns at once."""
    c, bh = tl.program_id(0), tl.program_id(1)
    t0 = c * C
    out, _, _, _ = normalised_tile(
        q, qs, ks, v, gc, A, states, scale, log_eps, c, bh, T, Tp, H, K, V, NT, C, BK, BV, PREC, DOT, EXP, UNSHIFTED
    )
    if AFFINE:
        out = out * load_row(weight, 0, 1, 0, V, BV).to(tl.float32)[None, :]
    if GATED:
        g = load_rows(gate + head_offset(bh, H, T, V), t0, T, H * V, 0, V, C, BV).to(tl.float32)
        out = out * g * tl.sigmoid(g)
    store_rows(y + head_offset(bh, H, T, V), out, t0, T, H * V, 0, V, C, BV)


@triton.jit
def normed_output_grad_kernel(
    q,
    qs,
    ks,
    v,
    gc,
    A,
    states,
    gate,
    weight,
    dy,
    do,
    d_gate,
    d_weight,
    d_log_scale,
    scale,
    log_eps,
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
    UNSHIFTED: tl.constexpr,
    AFFINE: tl.constexpr,
    GATED: tl.constexpr,
):
    """The backward of `normed_output_kernel` for one chunk of one (batch, head), o recomputed:

    with x = o / s and eps_t / s² from `unit_rows`, n = x · r, r = 1 / sqrt(mean(x²) + eps_t / s²)
    (so n = o / sqrt(mean(o²) + eps_t)) and dn the gradient reaching n ⊙ w (after the gate),
    do = r / s (dn ⊙ w − n · mean(dn ⊙ w ⊙ n)), dw = Σ_rows dn ⊙ n, dg = dy ⊙ n ⊙ w ⊙ silu'(g), and
    ∂L/∂log_scale = −r² (eps_t / s²) Σ dn ⊙ w ⊙ n (eps_t = eps · exp(2 log_scale) in the unshifted frame).
    """
    c, bh = tl.program_id(0), tl.program_id(1)
    t0 = c * C
    rows = t0 + tl.arange(0, C)
    n, r, eps_x, s = normalised_tile(
        q, qs, ks, v, gc, A, states, scale, log_eps, c, bh, T, Tp, H, K, V, NT, C, BK, BV, PREC, DOT, EXP, UNSHIFTED
    )
    grad = load_rows(dy + head_offset(bh, H, T, V), t0, T, H * V, 0, V, C, BV).to(tl.float32)
    if AFFINE:
        w = load_row(weight, 0, 1, 0, V, BV).to(tl.float32)[None, :]
    if GATED:
        g = load_rows(gate + head_offset(bh, H, T, V), t0, T, H * V, 0, V, C, BV).to(tl.float32)
        sig = tl.sigmoid(g)
        normed = n
        if AFFINE:
            normed = n * w
        dg = grad * normed * sig * (1.0 + g * (1.0 - sig))
        store_rows(d_gate + head_offset(bh, H, T, V), dg, t0, T, H * V, 0, V, C, BV)
        grad = grad * g * sig
    if AFFINE:
        # One partial sum per (chunk, batch·head), summed by the host: no atomics, a fixed order.
        cols = tl.arange(0, BV)
        partial = d_weight + (c.to(tl.int64) * tl.num_programs(1) + bh) * V
        tl.store(partial + cols, tl.sum(grad * n, axis=0), mask=cols < V)
        grad = grad * w
    inner = tl.sum(grad * n, axis=1)  # [C]: Σ over features of dn ⊙ n
    d_o = r[:, None] * (grad - n * (inner / V)[:, None]) / s[:, None]
    store_rows(do + head_offset(bh, H, T, V), d_o, t0, T, H * V, 0, V, C, BV)
    if UNSHIFTED:
        tl.store(d_log_scale + head_offset(bh, H, T, 1) + rows * H, -r * r * eps_x * inner, mask=rows < T)


def _log(eps: float) -> float:
    """log eps, computed on the host in double precision (an eps below fp32's range is still exact)."""
    return math.log(eps) if eps > 0 else -math.inf


def _tiles(dims: Dims) -> tuple[int, int]:
    """Key columns per tile and the (whole) value width of the epilogue's tiles."""
    full_v = max(16, next_power_of_2(dims.V))
    return min(dims.BK, max(16, _TILE_ELEMENTS // full_v)), full_v


def _common_args(q, v, gc, scores, states, epilogue: NormEpilogue, shifts: SafeExpShifts | None):
    """The pointer arguments both kernels start with, and their switches."""
    if epilogue.unshifted and shifts is None:
        raise ValueError("the norm's eps in the unshifted frame needs the safe-exp shifts")
    features = feature_args(shifts, q)
    placeholder = gc  # pointers the kernels never read under their switches
    return (
        (
            q,
            features["qs"],
            shifts.key if shifts is not None else placeholder,
            v,
            gc,
            scores,
            states,
            epilogue.gate if epilogue.gate is not None else placeholder,
            epilogue.weight if epilogue.weight is not None else placeholder,
        ),
        dict(EXP=features["EXP"], UNSHIFTED=epilogue.unshifted, AFFINE=epilogue.weight is not None),
    )


def normed_output(
    q: Tensor,
    v: Tensor,
    gc: Tensor,
    scores: Tensor,
    states: Tensor,
    scale: float,
    dims: Dims,
    shifts: SafeExpShifts | None,
    epilogue: NormEpilogue,
) -> Tensor:
    """The normalised (and gated) output, from the chunk states and the within-chunk scores.

    Args:
        q, v, gc, scores, states, scale, dims, shifts: as for `kernels.blocks.output.chunk_output`.
        epilogue: the norm's eps, weight and frame, and the output gate.

    Returns:
        y: [B, T, H, V] in q's dtype.
    """
    B, T, H, K, V, NT, _, _, dot = dims
    BK, BV = _tiles(dims)
    y = empty((B, T, H, V), q.dtype, q.device)
    pointers, switches = _common_args(q, v, gc, scores, states, epilogue, shifts)
    normed_output_kernel[(NT, B * H)](
        *pointers,
        y,
        scale,
        _log(epilogue.eps),
        T,
        gc.shape[1],
        H,
        K,
        V,
        NT,
        C=CHUNK,
        BK=BK,
        BV=BV,
        GATED=epilogue.gate is not None,
        **switches,
        **dot,
        **launch_options("normed_output_kernel"),
    )
    return y


def normed_output_grads(
    q: Tensor,
    v: Tensor,
    gc: Tensor,
    scores: Tensor,
    states: Tensor,
    dy: Tensor,
    scale: float,
    dims: Dims,
    shifts: SafeExpShifts | None,
    epilogue: NormEpilogue,
) -> EpilogueGrads:
    """The gradients through `normed_output`, the output recomputed.

    Args:
        q, v, gc, scores, states, scale, dims, shifts, epilogue: as given to `normed_output` (states
            recomputed by the backward).
        dy: [B, T, H, V] the gradient of the normalised output, contiguous.

    Returns:
        EpilogueGrads: the gradient of the unnormalised output (for `kernels.triton_gla.gla_backward`),
        of the gate, of the weight, and of the eps frame's log scale.
    """
    B, T, H, K, V, NT, _, _, dot = dims
    BK, BV = _tiles(dims)
    do = empty((B, T, H, V), q.dtype, q.device)
    gate, weight = epilogue.gate, epilogue.weight
    d_gate = empty(gate.shape, gate.dtype, gate.device) if gate is not None else None
    weight_parts = empty((NT, B * H, V), torch.float32, q.device) if weight is not None else None
    d_log_scale = empty((B, T, H), torch.float32, q.device) if epilogue.unshifted else None
    pointers, switches = _common_args(q, v, gc, scores, states, epilogue, shifts)
    placeholder = gc
    normed_output_grad_kernel[(NT, B * H)](
        *pointers,
        dy,
        do,
        d_gate if d_gate is not None else placeholder,
        weight_parts if weight_parts is not None else placeholder,
        d_log_scale if d_log_scale is not None else placeholder,
        scale,
        _log(epilogue.eps),
        T,
        gc.shape[1],
        H,
        K,
        V,
        NT,
        C=CHUNK,
        BK=BK,
        BV=BV,
        GATED=gate is not None,
        **switches,
        **dot,
        **launch_options("normed_output_grad_kernel"),
    )
    d_weight = weight_parts.sum((0, 1)) if weight_parts is not None else None
    return EpilogueGrads(do, d_gate, d_weight, d_log_scale)
