"""ReGLA's attention as one fused op on the Triton GLA kernels: safe-exp feature maps and the
refining gate computed inside the kernels, from the raw projections.

    φ(q_t) = exp(q_t − max_i q_t,i),  φ(k_s) = exp(k_s − m_s)          (kernels.safe_exp)
    log α_t = refined log gate of (gate_logits, refine_logits) + (m_{t-1} − m_t)
    S_t = diag(α_t) S_{t-1} + φ(k_t) v_tᵀ,  o_t = scale · S_tᵀ φ(q_t)

The composed path (the paper's, and `harness.layers` off CUDA) writes φ(q), φ(k) and the log
gate to memory as [B, T, H, K] tensors and keeps them for the backward. Here the kernels read
the raw q, k and logits and form φ and the gate on load, in fp32; what is kept for the backward
is the inputs, the [B, T, H] shifts and the within-chunk cumulative gates. The shifts' small
reductions (amax / cummax over [B, T, H]) stay in torch, so their gradients, ties included,
are torch's own.

The gate is either ReGLA's refining gate (`gate_logits`, `refine_logits`, tau, log_clamp; the
formula of `variants.gates.RefinedGate`, in fp32) or any given log gate (`log_gate`, e.g. GLA's).
The output norm stays outside: it is one fused torch op (F.rms_norm) over o.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from . import safe_exp
from .triton_gla import (_LOG2E, CHUNK, SafeExpShifts, _backward, _dims, _empty, _forward_from_gate,
                         _launch_gate_cumsum, check_supported, on_device_of)
from .triton_gla_refined import refined_gate_cumsum_kernel, refined_gate_grad_kernel

Tensor = torch.Tensor


class ReGLAOutput(NamedTuple):
    output: Tensor                  # [B, T, H, V], the input dtype
    final_state: Tensor | None      # [B, H, K, V] fp32 when asked for
    key_max: Tensor                 # [B, H] fp32: the last key shift, the decoding state of safe_exp


class _RefinedGate(NamedTuple):
    tau: float
    log_clamp: float | None


def _gate_cumsum(gate: tuple[Tensor, ...], refined: _RefinedGate | None, log_decay: Tensor | None, dims) -> Tensor:
    """Within-chunk cumulative log2 gates [B, Tp, H, K] fp32, the key-max log decay folded in."""
    if refined is None:
        return _launch_gate_cumsum(gate[0], dims[3], dims, log_decay)
    B, T, H, K, V, NT, BK = dims[:7]
    gate_logits, refine_logits = gate
    gc = _empty((B, NT * CHUNK, H, K), torch.float32, gate_logits.device)
    refined_gate_cumsum_kernel[(triton.cdiv(K, BK), NT, B * H)](
        gate_logits, refine_logits, log_decay if log_decay is not None else gate_logits, gc, T, NT * CHUNK, H, K,
        1.0 / refined.tau, refined.log_clamp if refined.log_clamp is not None else 0.0, _LOG2E,
        C=CHUNK, BK=BK, HAS_CLAMP=refined.log_clamp is not None, ROW_DECAY=log_decay is not None)
    return gc


def _gate_grads(gate: tuple[Tensor, ...], refined: _RefinedGate | None, d_log_gate: Tensor) -> tuple[Tensor, ...]:
    """Chain the kernels' gradient of the (total) log gate, fp32 [B, T, H, K], to the gate inputs."""
    if refined is None:
        (log_gate,) = gate
        if log_gate.shape[-1] == 1:  # a per-head scalar gate, broadcast over features
            d_log_gate = d_log_gate.sum(-1, keepdim=True)
        return (d_log_gate.to(log_gate.dtype),)
    gate_logits, refine_logits = gate
    d_gate = _empty(gate_logits.shape, gate_logits.dtype, gate_logits.device)
    d_refine = _empty(refine_logits.shape, refine_logits.dtype, refine_logits.device)
    n, block = d_log_gate.numel(), 1024
    refined_gate_grad_kernel[(triton.cdiv(n, block),)](
        gate_logits, refine_logits, d_log_gate, d_gate, d_refine, n, 1.0 / refined.tau,
        refined.log_clamp if refined.log_clamp is not None else 0.0, BLOCK=block,
        HAS_CLAMP=refined.log_clamp is not None)
    return d_gate, d_refine


class FusedReGLAFunction(torch.autograd.Function):
    """Inputs: q, k, v; the shifts [B, T, H] fp32 (query, key) and the key-max log decay [B, T, H]
    or None; the gate tensors (one log gate, or two logits). Gradients flow to all of them."""

    @staticmethod
    def forward(ctx, q, k, v, query_shift, key_shift, log_decay, refined, scale, initial_state,
                output_final_state, *gate):
        dims = _dims(q, v)
        shifts = SafeExpShifts(query_shift, key_shift)
        gc = _gate_cumsum(gate, refined, log_decay, dims)
        o, final, scores = _forward_from_gate(q, k, v, gc, scale, initial_state, output_final_state, dims, shifts)
        ctx.save_for_backward(q, k, v, query_shift, key_shift, gc, scores, initial_state, final, *gate)
        ctx.refined, ctx.scale, ctx.dims, ctx.has_log_decay = refined, scale, dims, log_decay is not None
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, query_shift, key_shift, gc, scores, initial_state, final, *gate = ctx.saved_tensors
        dq, dk, dv, d_log_gate, dh0, d_query_shift, d_key_shift = _backward(
            q, k, v, gc, scores, initial_state, final, do.contiguous(),
            dht.contiguous() if dht is not None else None, ctx.scale, ctx.dims, torch.float32,
            SafeExpShifts(query_shift, key_shift))
        # The key-max decay is added to every feature's log gate: its gradient is the feature sum.
        d_log_decay = d_log_gate.sum(-1) if ctx.has_log_decay else None
        d_gate = _gate_grads(tuple(gate), ctx.refined, d_log_gate)
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk, dv, d_query_shift, d_key_shift, d_log_decay, None, None, dh0, None, *d_gate


def triton_regla(q: Tensor, k: Tensor, v: Tensor, *, gate_logits: Tensor | None = None,
                 refine_logits: Tensor | None = None, log_gate: Tensor | None = None, tau: float = 1.0,
                 log_clamp: float | None = -8.0, key_max: str = "running", chunk_size: int = 64,
                 scale: float = 1.0, initial_state: Tensor | None = None, initial_key_max: Tensor | None = None,
                 output_final_state: bool = False) -> ReGLAOutput:
    """Gated linear attention with safe-exp features of the raw q, k: [B, T, H, K], and a key-side gate.

    The gate is ReGLA's refining gate of (gate_logits, refine_logits), both [B, T, H, K] (then tau
    and log_clamp apply as in `variants.gates.RefinedGate`), or a given `log_gate` [B, T, H, K or 1].
    `key_max` is safe_exp's scope of the key max (`kernels.safe_exp`); `initial_key_max` [B, H]
    continues a decoded sequence (with `initial_state`). Same result as the composed path
    `SafeExp` → gate → `gated_linear_attention`, with φ and the gate in fp32.
    """
    refined = gate_logits is not None or refine_logits is not None
    if refined == (log_gate is not None) or (refined and (gate_logits is None or refine_logits is None)):
        raise ValueError("triton_regla takes either gate_logits and refine_logits (the refining gate) or "
                         "log_gate, not both and not neither")
    for name, t in (("k", k), ("gate_logits", gate_logits), ("refine_logits", refine_logits)):
        if t is not None and t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape [B, T, H, K] = {tuple(q.shape)}; got {tuple(t.shape)}")
    if log_gate is not None and (log_gate.shape[:3] != q.shape[:3] or log_gate.shape[-1] not in (1, q.shape[-1])):
        raise ValueError(f"log_gate must be [B, T, H, {q.shape[-1]}] or [B, T, H, 1]; got {tuple(log_gate.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H {tuple(q.shape[:3])}; got {tuple(v.shape)}")
    if refined and (tau <= 0 or (log_clamp is not None and not log_clamp < 0)):
        raise ValueError(f"tau must be > 0 and log_clamp negative or None; got tau={tau}, log_clamp={log_clamp}")
    if (initial_key_max is None) != (initial_state is None):
        raise ValueError("initial_state and initial_key_max go together: the state is scaled by the key max")
    check_supported(q, v)

    query_shift = safe_exp.query_shift(q.float()).contiguous()
    key_shift, log_decay = safe_exp.key_shifts(k.float().amax(-1), key_max, chunk_size,
                                               initial_key_max.float() if initial_key_max is not None else None)
    key_shift = key_shift.contiguous()
    log_decay = log_decay.contiguous() if log_decay is not None else None
    gate = (gate_logits, refine_logits) if refined else (log_gate,)
    gate_options = _RefinedGate(float(tau), log_clamp) if refined else None
    q, k, v, *gate = (t.contiguous() for t in (q, k, v, *gate))
    with on_device_of(q):
        o, final = FusedReGLAFunction.apply(q, k, v, query_shift, key_shift, log_decay, gate_options,
                                            float(scale), initial_state, output_final_state, *gate)
    return ReGLAOutput(o, final, key_shift[:, -1])
