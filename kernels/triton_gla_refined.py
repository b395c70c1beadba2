"""Gated linear attention whose key-side log gate is ReGLA's refining gate, formed inside the
gate-scan kernel: the op `triton_gla_refined_gate`.

It composes the refining-gate building block (`kernels.blocks.refined_gate`: the formula of
`variants.gates.RefinedGate` in fp32, so the log gate never exists in memory) with the forward and
backward passes of `kernels.triton_gla`. Used by `benchmarks/bench_kernels.py` and the tests; the
layers take the fused op (`kernels.triton_regla`), which also forms the feature maps in the kernels.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .blocks.common import check_supported, dims_of, on_device_of
from .blocks.refined_gate import refined_gate_cumsum, refined_gate_grads
from .blocks.varlen import align, chunk_aligned_layout, unalign
from .triton_gla import gla_backward, gla_forward_from_gate
from .varlen import check_sequence_states, sequence_bounds

Tensor = torch.Tensor


class RefinedGateGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, k, v, gate_logits, refine_logits, tau, log_clamp, scale, initial_state, output_final_state, bounds
    ):
        # Packed sequences run in the chunk-aligned layout (blocks.varlen). Added rows get gate logit
        # +inf: σ(+inf) = 1 makes the refined log gate exactly 0 there (no decay), whatever tau or clamp.
        layout = chunk_aligned_layout(bounds, q.device) if bounds is not None else None
        aligned = (q, k, v, gate_logits, refine_logits)
        if layout is not None:
            fills = (0.0, 0.0, 0.0, float("inf"), 0.0)
            aligned = tuple(align(t, layout, fill) for t, fill in zip(aligned, fills))
        q, k, v, aligned_gate, aligned_refine = aligned
        dims = dims_of(q, v)
        gc = refined_gate_cumsum(aligned_gate, aligned_refine, tau, log_clamp, None, dims)
        o, final, scores = gla_forward_from_gate(
            q, k, v, gc, scale, initial_state, output_final_state, dims, sequences=layout.chunks if layout else None
        )
        ctx.save_for_backward(q, k, v, gate_logits, refine_logits, gc, scores, initial_state)
        ctx.scale, ctx.dims, ctx.tau, ctx.log_clamp, ctx.layout = scale, dims, tau, log_clamp, layout
        return (unalign(o, layout) if layout is not None else o), final

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, do, dht):
        q, k, v, gate_logits, refine_logits, gc, scores, initial_state = ctx.saved_tensors
        layout = ctx.layout
        dq, dk, dv, d_log_gate, dh0, _, _ = gla_backward(
            q,
            k,
            v,
            gc,
            scores,
            initial_state,
            align(do, layout) if layout is not None else do.contiguous(),
            dht.contiguous() if dht is not None else None,
            ctx.scale,
            ctx.dims,
            torch.float32,
            sequences=layout.chunks if layout is not None else None,
        )
        if layout is not None:
            dq, dk, dv, d_log_gate = (unalign(t, layout) for t in (dq, dk, dv, d_log_gate))
        d_gate, d_refine = refined_gate_grads(gate_logits, refine_logits, ctx.tau, ctx.log_clamp, d_log_gate)
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk, dv, d_gate, d_refine, None, None, None, dh0, None, None


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
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """GLA whose key-side log gate is ReGLA's refining gate of (gate_logits, refine_logits).

    Same result as `triton_gla(q, k, v, log_gate)` with log_gate from `variants.gates.RefinedGate`'s
    formula (fp32, max 0, / tau, clamped at log_clamp), without materialising log_gate.

    Args:
        q, k: [B, T, H, K], K <= 256.
        v: [B, T, H, V], V <= 256; q, k, v of one float dtype.
        gate_logits, refine_logits: [B, T, H, K], any float dtype (read in fp32; their gradients
            come back in their own dtypes).
        tau: the gate's temperature (> 0).
        log_clamp: lower bound of the log gate (< 0), or None for none.
        scale: the output's scale.
        initial_state: [B, H, K, V] ([N, H, K, V] with `cu_seqlens`), or None for zeros.
        output_final_state: whether to return the final state.
        cu_seqlens: [N + 1] int offsets of N sequences packed along time (B = 1; `kernels.varlen`),
            or None for one sequence per batch row.

    Returns:
        o: [B, T, H, V] in q's dtype.
        final_state: [B, H, K, V] ([N, H, K, V] with `cu_seqlens`) fp32, or None unless `output_final_state`.
    """
    if gate_logits.shape != q.shape or refine_logits.shape != q.shape:
        raise ValueError(
            f"gate_logits and refine_logits must be [B, T, H, K] = {tuple(q.shape)}; got "
            f"{tuple(gate_logits.shape)} and {tuple(refine_logits.shape)}"
        )
    check_supported(q, v)
    if tau <= 0 or (log_clamp is not None and not log_clamp < 0):
        raise ValueError(f"tau must be > 0 and log_clamp negative or None; got tau={tau}, log_clamp={log_clamp}")
    bounds = sequence_bounds(cu_seqlens, q.shape[0], q.shape[1]) if cu_seqlens is not None else None
    if bounds is not None:
        check_sequence_states(initial_state, len(bounds) - 1)
    q, k, v, gate_logits, refine_logits = (t.contiguous() for t in (q, k, v, gate_logits, refine_logits))
    with on_device_of(q):
        return RefinedGateGLAFunction.apply(
            q,
            k,
            v,
            gate_logits,
            refine_logits,
            float(tau),
            log_clamp,
            float(scale),
            initial_state,
            output_final_state,
            bounds,
        )
