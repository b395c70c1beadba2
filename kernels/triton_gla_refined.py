"""Gated linear attention with ReGLA's refining gate computed inside the gate-scan kernel.

The refining gate (REGLA.md §2; `variants.gates.RefinedGate`) turns two logits per key feature,
a (gate) and b (refine), into a log decay

    g = σ(a), r = σ(b),  log F = logσ(a) + log(g + 2 r (1 − g))      (= log of (1−r) g² + r (1−(1−g)²))
    log_gate = max(min(log F, 0) / τ, log_clamp)

Here that formula runs in fp32 inside the kernel that forms the within-chunk cumulative gates, so
log F never exists as a [B, T, H, K] tensor in memory; the backward chains the kernels' log-gate
gradient through the same formula in one elementwise kernel. Everything else is the key-side
gate path of `triton_gla`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .triton_gla import _LOG2E, CHUNK, _backward, _dims, _empty, _forward_from_gate, check_supported, on_device_of
from .triton_gla_kernels import _add_row_decay, _store_rows

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
    offsets = (batch.to(tl.int64) * T * H + h) * K + rows[:, None] * H * K + cols[None, :]
    a = tl.load(gate_logits + offsets, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(refine_logits + offsets, mask=inside, other=0.0).to(tl.float32)
    log_f, g, r, inner = _refined_log_gate_parts(a, b)
    log_gate = tl.minimum(log_f, 0.0) * inv_tau
    if HAS_CLAMP:
        log_gate = tl.maximum(log_gate, log_clamp)
    log_gate = _add_row_decay(tl.where(inside, log_gate, 0.0), row_decay, batch, h, rows, T, H, ROW_DECAY)
    cumulative = tl.cumsum(log_gate, axis=0) * log2e
    _store_rows(gc + (batch.to(tl.int64) * Tp * H + h) * K, cumulative, c * C, Tp, H * K, ik * BK, K, C, BK)


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
    gate_logits: Tensor, refine_logits: Tensor, tau: float, log_clamp: float | None, row_decay: Tensor | None, dims
) -> Tensor:
    """Within-chunk cumulative refined log gates [B, Tp, H, K] fp32 (log2 units), with an optional
    per-row extra log decay `row_decay` [B, T, H] fp32 (safe_exp's key-max rescaling)."""
    B, T, H, K, V, NT, BK = dims[:7]
    gc = _empty((B, NT * CHUNK, H, K), torch.float32, gate_logits.device)  # [B, Tp, H, K]
    refined_gate_cumsum_kernel[(triton.cdiv(K, BK), NT, B * H)](
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
        _LOG2E,
        C=CHUNK,
        BK=BK,
        HAS_CLAMP=log_clamp is not None,
        ROW_DECAY=row_decay is not None,
    )
    return gc


def refined_gate_grads(
    gate_logits: Tensor, refine_logits: Tensor, tau: float, log_clamp: float | None, d_log_gate: Tensor
) -> tuple[Tensor, Tensor]:
    """The two logits' gradients from the log gate's, d_log_gate [B, T, H, K] fp32."""
    d_gate = _empty(gate_logits.shape, gate_logits.dtype, gate_logits.device)
    d_refine = _empty(refine_logits.shape, refine_logits.dtype, refine_logits.device)
    n, block = d_log_gate.numel(), 1024
    refined_gate_grad_kernel[(triton.cdiv(n, block),)](
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


class RefinedGateGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate_logits, refine_logits, tau, log_clamp, scale, initial_state, output_final_state):
        dims = _dims(q, v)
        gc = refined_gate_cumsum(gate_logits, refine_logits, tau, log_clamp, None, dims)
        o, final, scores = _forward_from_gate(q, k, v, gc, scale, initial_state, output_final_state, dims)
        ctx.save_for_backward(q, k, v, gate_logits, refine_logits, gc, scores, initial_state, final)
        ctx.scale, ctx.dims, ctx.tau, ctx.log_clamp = scale, dims, tau, log_clamp
        return o, final

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, do, dht):
        q, k, v, gate_logits, refine_logits, gc, scores, initial_state, final = ctx.saved_tensors
        dq, dk, dv, d_log_gate, dh0, _, _ = _backward(
            q,
            k,
            v,
            gc,
            scores,
            initial_state,
            final,
            do.contiguous(),
            dht.contiguous() if dht is not None else None,
            ctx.scale,
            ctx.dims,
            torch.float32,
        )
        d_gate, d_refine = refined_gate_grads(gate_logits, refine_logits, ctx.tau, ctx.log_clamp, d_log_gate)
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk, dv, d_gate, d_refine, None, None, None, dh0, None


def triton_gla_refined_gate(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate_logits: Tensor,
    refine_logits: Tensor,
    *,
    tau: float = 1.0,
    log_clamp: float | None = -8.0,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """GLA whose key-side log gate is ReGLA's refining gate of (gate_logits, refine_logits): [B, T, H, K].

    Same result as `triton_gla(q, k, v, log_gate)` with log_gate from `variants.gates.RefinedGate`'s
    formula (fp32, max 0, / tau, clamped at log_clamp), without materialising log_gate.
    """
    if gate_logits.shape != q.shape or refine_logits.shape != q.shape:
        raise ValueError(
            f"gate_logits and refine_logits must be [B, T, H, K] = {tuple(q.shape)}; got "
            f"{tuple(gate_logits.shape)} and {tuple(refine_logits.shape)}"
        )
    check_supported(q, v)
    if tau <= 0 or (log_clamp is not None and not log_clamp < 0):
        raise ValueError(f"tau must be > 0 and log_clamp negative or None; got tau={tau}, log_clamp={log_clamp}")
    q, k, v, gate_logits, refine_logits = (t.contiguous() for t in (q, k, v, gate_logits, refine_logits))
    with on_device_of(q):
        return RefinedGateGLAFunction.apply(
            q, k, v, gate_logits, refine_logits, float(tau), log_clamp, float(scale), initial_state, output_final_state
        )
