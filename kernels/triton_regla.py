"""ReGLA's attention as one fused op on the Triton GLA kernels: safe-exp feature maps and the
refining gate computed inside the kernels, from the raw projections.

    φ(q_t) = exp(q_t − max_i q_t,i),  φ(k_s) = exp(k_s − m_s)          (kernels.safe_exp)
    log α_t = refined log gate of (gate_logits, refine_logits) + (m_{t-1} − m_t)
    S_t = diag(α_t) S_{t-1} + φ(k_t) v_tᵀ,  o_t = scale · S_tᵀ φ(q_t)

The composed path (the paper's, and `harness.layers` off CUDA) writes φ(q), φ(k) and the log
gate to memory as [B, T, H, K] tensors and keeps them for the backward. Here the kernels read
the raw q, k and logits and form φ and the gate on load, in fp32; what is kept for the backward
is the inputs, the [B, T, H] shifts and token maxima, the within-chunk cumulative gates
([B, T, H, K] fp32) and the within-chunk scores ([B, T, H, 64] fp32). The shifts' small
scans (cummax / chunk and sequence maxima over [B, T, H]) stay in torch, and their backward is
torch's autograd on those small tensors, ties included; the gradient through each token's max
over features is added to dq, dk in fp32 by one row kernel (`kernels.blocks.max_shift`; the two
terms nearly cancel at the maxima, so rounding them to bf16 first would lose the difference).

The gate is either ReGLA's refining gate (`gate_logits`, `refine_logits`, tau, log_clamp; the
formula of `variants.gates.RefinedGate`, in fp32) or any given log gate (`log_gate`, e.g. GLA's).
Optionally the per-head RMSNorm of the output (its eps in the unshifted frame when asked) and
the swish output gate are applied in the output kernel's epilogue (`kernels.blocks.norm_epilogue`),
so the unnormalised o never reaches memory; its backward recomputes o from the chunk states,
which the backward recomputes anyway. Nothing is kept for it beyond the norm weight and the gate's
input g. Without it the norm stays outside (the layer's own norm over o).

The op composes the gate building blocks (`kernels.blocks.gate`, `kernels.blocks.refined_gate`) with
the forward and backward passes of `kernels.triton_gla`, which take the shifts; `harness.layers`
calls it on CUDA.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from . import safe_exp
from .blocks.common import SafeExpShifts, check_supported, dims_of, on_device_of
from .blocks.gate import gate_cumsum
from .blocks.max_shift import add_max_gradient
from .blocks.norm_epilogue import NormEpilogue, normed_output_grads
from .blocks.refined_gate import refined_gate_cumsum, refined_gate_grads
from .blocks.varlen import align, chunk_aligned_layout, unalign
from .triton_gla import gla_backward, gla_forward_from_gate, recompute_states
from .varlen import sequence_bounds

Tensor = torch.Tensor


class ReGLAOutput(NamedTuple):
    output: Tensor  # [B, T, H, V], the input dtype
    final_state: Tensor | None  # [B, H, K, V] fp32 when asked for
    key_max: Tensor  # [B, H] fp32: the last key shift, the decoding state of safe_exp
    #: [B, T, H] fp32 with `return_log_scale`: −(query shift + key shift), differentiable; else None
    log_scale: Tensor | None = None


class _RefinedGate(NamedTuple):
    tau: float
    log_clamp: float | None


class _Norm(NamedTuple):
    eps: float
    unshifted: bool  # eps · exp(−2 (query shift + key shift)): the frame without safe-exp's shifts


class _Options(NamedTuple):
    refined: _RefinedGate | None  # None: the gate is a given log gate
    norm: _Norm | None  # the output norm of the epilogue, or None for the plain output
    key_max: str
    chunk_size: int
    scale: float
    bounds: list[int] | None  # packed sequences' offsets (kernels.varlen), or None
    log_scale: bool  # also return −(query shift + key shift) per token and head


def _key_shifts(token_max: Tensor, options: _Options, previous: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """safe_exp's key shifts and log decay [B, T, H], per packed sequence when there are several."""
    if options.bounds is None:
        return safe_exp.key_shifts(token_max, options.key_max, options.chunk_size, previous)
    return safe_exp.packed_key_shifts(token_max, options.key_max, options.chunk_size, previous, options.bounds)


def _gate_cumsum(gate: tuple[Tensor, ...], refined: _RefinedGate | None, log_decay: Tensor | None, dims) -> Tensor:
    """Within-chunk cumulative log2 gates [B, Tp, H, K] fp32, the key-max log decay folded in."""
    if refined is None:
        return gate_cumsum(gate[0], dims, log_decay)
    return refined_gate_cumsum(*gate, refined.tau, refined.log_clamp, log_decay, dims)


def _gate_grads(gate: tuple[Tensor, ...], refined: _RefinedGate | None, d_log_gate: Tensor) -> tuple[Tensor, ...]:
    """Chain the kernels' gradient of the (total) log gate, fp32 [B, T, H, K], to the gate inputs."""
    if refined is None:
        (log_gate,) = gate
        if log_gate.shape[-1] == 1:  # a per-head scalar gate, broadcast over features
            d_log_gate = d_log_gate.sum(-1, keepdim=True)
        return (d_log_gate.to(log_gate.dtype),)
    return refined_gate_grads(*gate, refined.tau, refined.log_clamp, d_log_gate)


def _key_shifts_backward(token_max, initial_key_max, options, d_shift, d_log_decay):
    """Gradients of the keys' token maxima [B, T, H] and of the initial key max, through
    `safe_exp.key_shifts` (cummax, chunk or sequence max): the running max's written out (the
    layers' default, and what every scope continues as from a state), torch's autograd on these
    small tensors otherwise."""
    if options.bounds is None and (options.key_max == "running" or initial_key_max is not None):
        previous = initial_key_max.float() if initial_key_max is not None else None
        d_token_max, d_previous = safe_exp.running_key_shifts_backward(token_max, previous, d_shift, d_log_decay)
        return d_token_max, (d_previous.to(initial_key_max.dtype) if d_previous is not None else None)
    with torch.enable_grad():
        leaves = [token_max.detach().requires_grad_(True)]
        if initial_key_max is not None:
            leaves.append(initial_key_max.detach().float().requires_grad_(True))
        shift, log_decay = _key_shifts(leaves[0], options, leaves[1] if len(leaves) > 1 else None)
        outputs, grads = [shift], [d_shift]
        if log_decay is not None:
            outputs.append(log_decay)
            grads.append(d_log_decay)
        d_leaves = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    d_leaves = [torch.zeros_like(leaf) if d is None else d for leaf, d in zip(leaves, d_leaves)]
    return d_leaves[0], (d_leaves[1].to(initial_key_max.dtype) if initial_key_max is not None else None)


class FusedReGLAFunction(torch.autograd.Function):
    """Inputs: q, k, v [B, T, H, ·], the initial state and key max (or None), the options, and the
    gate tensors (one log gate, or the two logits). Outputs: o, the final state, the last key max.

    With options.norm the output is the normalised one, norm_weight ([V] or None) and output_gate
    ([B, T, H, V] or None) take part in it; without, both are None.

    Packed sequences (options.bounds) run in the chunk-aligned layout of `kernels.blocks.varlen`: the
    shifts are formed per sequence on the packed maxima, then every kernel input is copied in. Added
    rows get shift +inf (so φ = 0 there), log decay 0 and a log gate of exactly 0 (gate logit +inf);
    the output gate gets 0 there."""

    @staticmethod
    def forward(
        ctx, q, k, v, initial_state, initial_key_max, options, output_final_state, norm_weight, output_gate, *gate
    ):
        # Maxima are exact in any dtype: no fp32 copy of q, k is made for them.
        query_shift = safe_exp.query_shift(q).float()
        token_max = k.amax(-1).float()
        key_shift, log_decay = _key_shifts(
            token_max, options, initial_key_max.float() if initial_key_max is not None else None
        )
        layout = chunk_aligned_layout(options.bounds, q.device) if options.bounds is not None else None
        last_key_shift = key_shift[0, layout.ends] if layout is not None else key_shift[:, -1]
        log_scale = -(query_shift + key_shift) if options.log_scale else None
        kernel_inputs = (q, k, v, query_shift, key_shift, log_decay, output_gate, *gate)
        if layout is not None:
            gate_fill = (float("inf"), 0.0) if options.refined is not None else (0.0,)
            fills = (0.0, 0.0, 0.0, float("inf"), float("inf"), 0.0, 0.0, *gate_fill)
            kernel_inputs = tuple(
                None if t is None else align(t, layout, fill) for t, fill in zip(kernel_inputs, fills)
            )
        q_in, k_in, v_in, query_shift, key_shift, log_decay, output_gate_in, *gate_in = (
            None if t is None else t.contiguous() for t in kernel_inputs
        )
        dims = dims_of(q_in, v_in)
        shifts = SafeExpShifts(query_shift, key_shift)
        gc = _gate_cumsum(tuple(gate_in), options.refined, log_decay, dims)
        epilogue = _epilogue(options.norm, norm_weight, output_gate_in)
        o, final, scores = gla_forward_from_gate(
            q_in,
            k_in,
            v_in,
            gc,
            options.scale,
            initial_state,
            output_final_state,
            dims,
            shifts,
            layout.chunks if layout is not None else None,
            epilogue,
        )
        ctx.save_for_backward(
            q,
            k,
            q_in,
            k_in,
            v_in,
            query_shift,
            key_shift,
            token_max,
            gc,
            scores,
            initial_state,
            initial_key_max,
            norm_weight,
            output_gate_in,
            *gate,
        )
        ctx.options, ctx.dims, ctx.has_log_decay, ctx.layout = options, dims, log_decay is not None, layout
        if layout is not None:
            o = unalign(o, layout)
        return o, final, last_key_shift.clone(), log_scale  # not a view of a tensor saved for backward

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, do, dht, d_key_max, d_log_scale):
        (
            q,
            k,
            q_in,
            k_in,
            v_in,
            query_shift,
            key_shift,
            token_max,
            gc,
            scores,
            initial_state,
            initial_key_max,
            norm_weight,
            output_gate_in,
            *gate,
        ) = ctx.saved_tensors
        options, layout, dims = ctx.options, ctx.layout, ctx.dims
        shifts = SafeExpShifts(query_shift, key_shift)
        sequences = layout.chunks if layout is not None else None
        states = recompute_states(k_in, v_in, gc, initial_state, dims, shifts, sequences)
        do = align(do, layout) if layout is not None else do.contiguous()
        epilogue_grads = None
        if options.norm is not None:
            # Through the norm and the gate first, o recomputed: `do` becomes the gradient of o.
            epilogue = _epilogue(options.norm, norm_weight, output_gate_in)
            epilogue_grads = normed_output_grads(
                q_in, v_in, gc, scores, states, do, options.scale, dims, shifts, epilogue
            )
            do = epilogue_grads.do
        dq, dk, dv, d_log_gate, dh0, d_query_shift, d_key_shift = gla_backward(
            q_in,
            k_in,
            v_in,
            gc,
            scores,
            initial_state,
            do,
            dht.contiguous() if dht is not None else None,
            options.scale,
            dims,
            torch.float32,
            shifts,
            sequences,
            states,
        )
        d_output_gate = d_norm_weight = None
        if epilogue_grads is not None:
            d_output_gate, d_norm_weight = epilogue_grads.d_gate, epilogue_grads.d_weight
            if epilogue_grads.d_log_scale is not None:
                # log_scale = −(query shift + key shift): the eps frame's part of the shifts' gradients.
                d_query_shift = d_query_shift - epilogue_grads.d_log_scale
                d_key_shift = d_key_shift - epilogue_grads.d_log_scale
        if layout is not None:
            dq, dk, dv, d_log_gate, d_query_shift, d_key_shift = (
                unalign(t, layout) for t in (dq, dk, dv, d_log_gate, d_query_shift, d_key_shift)
            )
            d_output_gate = unalign(d_output_gate, layout) if d_output_gate is not None else None
        if d_log_scale is not None:  # the returned −(query shift + key shift)
            d_query_shift = d_query_shift - d_log_scale
            d_key_shift = d_key_shift - d_log_scale
        # The key-max decay is added to every feature's log gate: its gradient is the feature sum.
        d_log_decay = d_log_gate.sum(-1) if ctx.has_log_decay else None
        if d_key_max is not None:
            if layout is not None:
                d_key_shift[0, layout.ends] += d_key_max
            else:
                d_key_shift[:, -1] += d_key_max
        d_token_max, d_initial_key_max = _key_shifts_backward(
            token_max, initial_key_max, options, d_key_shift, d_log_decay
        )
        dq = add_max_gradient(q, dq.contiguous(), d_query_shift)
        dk = add_max_gradient(k, dk.contiguous(), d_token_max)
        d_gate = _gate_grads(tuple(gate), options.refined, d_log_gate.contiguous())
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        d_norm_weight = d_norm_weight.to(norm_weight.dtype) if d_norm_weight is not None else None
        return dq, dk, dv, dh0, d_initial_key_max, None, None, d_norm_weight, d_output_gate, *d_gate


def _epilogue(norm: _Norm | None, weight: Tensor | None, gate: Tensor | None) -> NormEpilogue | None:
    """The output kernel's epilogue for a call with a norm; gate in the kernels' time layout."""
    if norm is None:
        return None
    return NormEpilogue(norm.eps, weight.contiguous() if weight is not None else None, gate, norm.unshifted)


def triton_regla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    gate_logits: Tensor | None = None,
    refine_logits: Tensor | None = None,
    log_gate: Tensor | None = None,
    tau: float = 1.0,
    log_clamp: float | None = -8.0,
    key_max: str = "running",
    chunk_size: int = 64,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    initial_key_max: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    norm_eps: float | None = None,
    norm_weight: Tensor | None = None,
    eps_unshifted: bool = False,
    output_gate: Tensor | None = None,
    return_log_scale: bool = False,
) -> ReGLAOutput:
    """Gated linear attention with safe-exp features of the raw q, k, and a key-side gate.

    The gate is ReGLA's refining gate of (gate_logits, refine_logits) (then tau and log_clamp apply
    as in `variants.gates.RefinedGate`), or a given `log_gate`. Same result as the composed path
    `SafeExp` → gate → `gated_linear_attention`, with φ and the gate in fp32.

    Args:
        q, k: [B, T, H, K] raw projections (K <= 256), one float dtype with v.
        v: [B, T, H, V] (V <= 256).
        gate_logits, refine_logits: [B, T, H, K] logits of the refining gate (any float dtype, read
            in fp32), both or neither.
        log_gate: [B, T, H, K] or [B, T, H, 1] a given key-side log gate (<= 0), instead of the logits.
        tau: the refining gate's temperature (> 0).
        log_clamp: lower bound of the refined log gate (< 0), or None for none.
        key_max: safe_exp's scope of the key max, one of `kernels.safe_exp.KEY_MAX_SCOPES`.
        chunk_size: the chunk of the `chunk` scope (>= 1).
        scale: the output's scale.
        initial_state: [B, H, K, V], or None; with `initial_key_max`, continues a decoded sequence.
        initial_key_max: [B, H], the key max of the earlier tokens (`ReGLAOutput.key_max`), or None.
        output_final_state: whether to return the final state.
        cu_seqlens: [N + 1] int offsets of N sequences packed along time (B = 1; `kernels.varlen`):
            state and key max restart at each boundary, and initial_state, initial_key_max, the
            final state and key_max are per sequence ([N, H, K, V], [N, H]). None: one per batch row.
        norm_eps: with a value (>= 0), the output is normalised per head in the kernel's epilogue,
            o / sqrt(mean(o²) + eps) · norm_weight (`variants.norms.RMSNorm` with per_head); None: o as is.
        norm_weight: [V] the norm's weight (shared by the heads), or None for none.
        eps_unshifted: the norm's eps in the frame without safe-exp's shifts, eps · exp(−2 (qs + ks))
            per token and head (the layers' `norm_eps_frame: unshifted`).
        output_gate: [B, T, H, V] g, the normalised output then multiplied by silu(g) (the swish
            output gate); needs `norm_eps`.
        return_log_scale: also return −(query shift + key shift) [B, T, H], the log of the factor by
            which safe-exp's shifts scale the output: what a norm applied after the op needs to put
            its eps in the unshifted frame. Returned rather than recomputed by the caller (two max
            reductions, the key max's scan and their backward again); gradients flow through it.

    Returns:
        ReGLAOutput: output [B, T, H, V] in q's dtype (normalised and gated as asked); final_state
        [B, H, K, V] fp32, or None unless `output_final_state`; key_max [B, H] fp32, the last key
        shift (the decoding state of safe_exp); log_scale [B, T, H] fp32 with `return_log_scale`,
        else None.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K]; got shape {tuple(q.shape)}")
    refined = gate_logits is not None or refine_logits is not None
    if refined == (log_gate is not None) or (refined and (gate_logits is None or refine_logits is None)):
        raise ValueError(
            "triton_regla takes either gate_logits and refine_logits (the refining gate) or "
            "log_gate, not both and not neither"
        )
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
    B, T, H, K = q.shape
    bounds = sequence_bounds(cu_seqlens, B, T) if cu_seqlens is not None else None
    states = B if bounds is None else len(bounds) - 1  # initial / final states: one per sequence
    if initial_state is not None and tuple(initial_state.shape) != (states, H, K, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [{'B' if bounds is None else 'N'}, H, K, V] = {(states, H, K, v.shape[-1])}; "
            f"got {tuple(initial_state.shape)}"
        )
    if initial_key_max is not None and tuple(initial_key_max.shape) != (states, H):
        raise ValueError(
            f"initial_key_max must be [{'B' if bounds is None else 'N'}, H] = {(states, H)}; "
            f"got {tuple(initial_key_max.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size (of the `chunk` key-max scope) must be >= 1; got {chunk_size}")
    check_supported(q, v)
    _check_norm(q, v, norm_eps, norm_weight, eps_unshifted, output_gate)
    gate = (gate_logits, refine_logits) if refined else (log_gate,)
    options = _Options(
        _RefinedGate(float(tau), log_clamp) if refined else None,
        _Norm(float(norm_eps), bool(eps_unshifted)) if norm_eps is not None else None,
        key_max,
        int(chunk_size),
        float(scale),
        bounds,
        bool(return_log_scale),
    )
    if key_max not in safe_exp.KEY_MAX_SCOPES:
        raise ValueError(f"key_max must be one of {', '.join(safe_exp.KEY_MAX_SCOPES)}; got {key_max!r}")
    q, k, v, *gate = (t.contiguous() for t in (q, k, v, *gate))
    output_gate = output_gate.contiguous() if output_gate is not None else None
    with on_device_of(q):
        return ReGLAOutput(
            *FusedReGLAFunction.apply(
                q, k, v, initial_state, initial_key_max, options, output_final_state, norm_weight, output_gate, *gate
            )
        )


def _check_norm(q, v, norm_eps, norm_weight, eps_unshifted, output_gate) -> None:
    """The epilogue's arguments: a norm weight, an eps frame or an output gate only with a norm."""
    if norm_eps is None:
        if norm_weight is not None or output_gate is not None or eps_unshifted:
            raise ValueError(
                "norm_weight, eps_unshifted and output_gate belong to the output norm's epilogue: give norm_eps too"
            )
        return
    if not norm_eps >= 0:
        raise ValueError(f"norm_eps must be >= 0 or None; got {norm_eps}")
    V = v.shape[-1]
    if norm_weight is not None and tuple(norm_weight.shape) != (V,):
        raise ValueError(
            f"norm_weight must be [V] = ({V},), one weight per value feature; got {tuple(norm_weight.shape)}"
        )
    if output_gate is not None and output_gate.shape != v.shape:
        raise ValueError(
            f"output_gate must have v's shape [B, T, H, V] = {tuple(v.shape)}; got {tuple(output_gate.shape)}"
        )
