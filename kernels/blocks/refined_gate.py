"""Refining-gate building block: ReGLA's refining gate computed inside the gate-scan kernel.

The refining gate (REGLA.md §2; `variants.gates.RefinedGate`) turns two logits per key feature,
a (gate) and b (refine), into a log decay

    g = σ(a), r = σ(b),  log F = logσ(a) + log(g + 2 r (1 − g))      (= log of (1−r) g² + r (1−(1−g)²))
    log_gate = max(min(log F, 0) / τ, log_clamp)

Here that formula runs in fp32 inside the kernel that forms the within-chunk cumulative gates, so
log F never exists as a [B, T, H, K] tensor in memory; the backward chains the kernels' log-gate
gradient through the same formula in one elementwise kernel.

Used by `kernels.triton_gla_refined` and `kernels.triton_regla` in place of `kernels.blocks.gate.gate_cumsum`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import CHUNK, LOG2E, Dims, cdiv, empty, head_offset, store_rows
from .gate import add_row_decay

Tensor = torch.Tensor
_FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny


@triton.jit
def _refined_log_gate_parts(a, b):
    """fp32 logits -> (unclamped log F, g, r, inner = g + 2r(1 − g))."""
    g = tl.sigmoid(a)
    r = tl.sigmoid(b)
    log_sigmoid_a = tl.minimum(a, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(a)))
    inner = tl.maximum(g + 2.0 * r * (1.0 - g), _FP32_TINY)
    return log_sigmoid_a + tl.log(inner), g, r, inner


@triton.jit
def refined_gate_cumsum_kernel(
    gate_logits,
    refine_logits,
    row_decay,
    gc,
    T,
    Tp,
    H,
    K,
    inv_tau,
    log_clamp,
    log2e,
    C: tl.constexpr,
    BK: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    ROW_DECAY: tl.constexpr,
):
    """gc = within-chunk cumulative refined log gate (fp32, log2 units, padded rows hold zero gates)."""
    ik, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, h = bh // H, bh % H
    rows = c * C + tl.arange(0, C)
    cols = ik * BK + tl.arange(0, BK)
    inside = (rows[:, None] < T) & (cols[None, :] < K)
    offsets = head_offset(bh, H, T, K) + rows[:, None] * H * K + cols[None, :]
    a = tl.load(gate_logits + offsets, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(refine_logits + offsets, mask=inside, other=0.0).to(tl.float32)
    log_f, g, r, inner = _refined_log_gate_parts(a, b)
    log_gate = tl.minimum(log_f, 0.0) * inv_tau
    if HAS_CLAMP:
        log_gate = tl.maximum(log_gate, log_clamp)
    log_gate = add_row_decay(tl.where(inside, log_gate, 0.0), row_decay, batch, h, rows, T, H, ROW_DECAY)
    cumulative = tl.cumsum(log_gate, axis=0) * log2e
    store_rows(gc + head_offset(bh, H, Tp, K), cumulative, c * C, Tp, H * K, ik * BK, K, C, BK)


@triton.jit
def refined_gate_grad_kernel(
    gate_logits,
    refine_logits,
    d_log_gate,
    d_gate_logits,
    d_refine_logits,
    N,
    inv_tau,
    log_clamp,
    BLOCK: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
):
    """Chain rule from d(log_gate) to the two logits, elementwise; a clamp that bit passes no gradient."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < N
    a = tl.load(gate_logits + idx, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(refine_logits + idx, mask=inside, other=0.0).to(tl.float32)
    grad = tl.load(d_log_gate + idx, mask=inside, other=0.0) * inv_tau
    log_f, g, r, inner = _refined_log_gate_parts(a, b)
    passes = log_f <= 0.0
    if HAS_CLAMP:
        passes = passes & (log_f * inv_tau >= log_clamp)
    grad = tl.where(passes, grad, 0.0)
    d_a = (1.0 - g) + (1.0 - 2.0 * r) * g * (1.0 - g) / inner
    d_b = 2.0 * (1.0 - g) * r * (1.0 - r) / inner
    tl.store(d_gate_logits + idx, (grad * d_a).to(d_gate_logits.dtype.element_ty), mask=inside)
    tl.store(d_refine_logits + idx, (grad * d_b).to(d_refine_logits.dtype.element_ty), mask=inside)


def refined_gate_cumsum(
    gate_logits: Tensor,
    refine_logits: Tensor,
    tau: float,
    log_clamp: float | None,
    row_decay: Tensor | None,
    dims: Dims,
) -> Tensor:
    """Within-chunk cumulative refined log gates, the input of every other kernel.

    Args:
        gate_logits, refine_logits: [B, T, H, K] contiguous, any float dtype (read in fp32).
        tau: the gate's temperature (> 0).
        log_clamp: lower bound (< 0) of the log gate, or None for none.
        row_decay: optional [B, T, H] fp32 log decay (<= 0) added to every feature of its row
            (safe_exp's key-max rescaling).
        dims: the call's `Dims`.

    Returns:
        gc: [B, Tp, H, K] fp32, in log2 units, Tp = NT * CHUNK; padded rows repeat the last real row.
    """
    B, T, H, K, V, NT, BK, BV, dot = dims
    gc = empty((B, NT * CHUNK, H, K), torch.float32, gate_logits.device)  # [B, Tp, H, K]
    refined_gate_cumsum_kernel[(cdiv(K, BK), NT, B * H)](
        gate_logits,
        refine_logits,
        row_decay if row_decay is not None else gate_logits,
        gc,
        T,
        NT * CHUNK,
        H,
        K,
        1.0 / tau,
        log_clamp if log_clamp is not None else 0.0,
        LOG2E,
        C=CHUNK,
        BK=BK,
        HAS_CLAMP=log_clamp is not None,
        ROW_DECAY=row_decay is not None,
    )
    return gc


def refined_gate_grads(
    gate_logits: Tensor, refine_logits: Tensor, tau: float, log_clamp: float | None, d_log_gate: Tensor
) -> tuple[Tensor, Tensor]:
    """The two logits' gradients from the log gate's.

    Args:
        gate_logits, refine_logits: [B, T, H, K] contiguous, as given to `refined_gate_cumsum`.
        tau, log_clamp: as given to `refined_gate_cumsum`.
        d_log_gate: [B, T, H, K] fp32, the gradient of the (clamped, scaled) log gate.

    Returns:
        d_gate_logits, d_refine_logits: [B, T, H, K] in the logits' dtypes.
    """
    d_gate = empty(gate_logits.shape, gate_logits.dtype, gate_logits.device)
    d_refine = empty(refine_logits.shape, refine_logits.dtype, refine_logits.device)
    n, block = d_log_gate.numel(), 1024
    refined_gate_grad_kernel[(cdiv(n, block),)](
        gate_logits,
        refine_logits,
        d_log_gate,
        d_gate,
        d_refine,
        n,
        1.0 / tau,
        log_clamp if log_clamp is not None else 0.0,
        BLOCK=block,
        HAS_CLAMP=log_clamp is not None,
    )
    return d_gate, d_refine
