"""The plain GLA op in Triton, `triton_gla`, and the forward and backward passes given the
within-chunk cumulative gates (`gla_forward_from_gate`, `gla_backward`), which the refined-gate op
(`kernels.triton_gla_refined`) and the fused ReGLA op (`kernels.triton_regla`) reuse.

`triton_gla` has the signature of the torch references (`kernels.reference`) and computes

    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t

with a key-side log gate gk: [B, T, H, K] or a per-head scalar gate [B, T, H, 1]. The kernels
are the building blocks of `kernels.blocks`; this module composes them and assembles gradients.
The gate gradient uses the closed form: o depends on gk only through cumulative sums, and
∂L/∂b_t = q_t ⊙ dq_t − k_t ⊙ dk_t for the within-chunk cumulative gate b_t, plus rowsum(S ⊙ dS)
of the state S leaving the chunk; dgk is the within-chunk reverse cumulative sum of that, computed
in a rearranged form in which the parts that cancel are never formed (see
`kernels.blocks.gate.gate_grad_kernel`).

Packed variable-length sequences (`cu_seqlens`, `kernels.varlen`) run in a chunk-aligned copy of
the inputs (`kernels.blocks.varlen`): each sequence starts on a chunk of its own, and the passes
over chunks restart the state at each sequence.

A value-side gate gv (Fast Decay), S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t v_tᵀ, runs on
the same kernels by an exact rescaling of v and o over 64-token segments (`kernels.value_gate`);
a call whose value gate decays by a factor below e^-30 within a segment runs the fused recurrent
kernels (`kernels.triton_recurrent`, exact for any finite gate) instead, or the torch chunked form
(`kernels.reference.chunked_gla`) when K exceeds their limit of 128; one with packed sequences runs
the torch chunked form.

Numerics: cumulative gates, states and every accumulation in fp32; matrix products take their
operands in the input dtype (bf16 on tensor cores; fp32 inputs use 3-pass tf32, close to fp32),
except the within-chunk products of dq and dk, whose operands are fp32 for any input (the gate
gradient's accuracy in bf16: `kernels.blocks.qkv_grad.GATE_GRADIENT_PRODUCTS`). The forward stores
the chunk states in the operand dtype, which is what its output product reads them as.
The final state is returned in fp32 whatever the input dtype, as the state is kept in fp32.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .blocks.chunk_state import chunk_state_grads, chunk_states
from .blocks.common import Dims, SafeExpShifts, check_supported, dims_of, on_device_of, operand_dtype
from .blocks.gate import gate_cumsum, gate_grad
from .blocks.norm_epilogue import NormEpilogue, normed_output
from .blocks.output import chunk_output, intra_scores
from .blocks.qkv_grad import intra_score_grads, query_key_grads, query_key_inter_grads, value_grads
from .blocks.varlen import SequenceChunks, align, chunk_aligned_layout, unalign
from .triton_recurrent import MAX_KEY_DIM, fused_recurrent_gla
from .value_gate import value_gated_gla
from .varlen import check_sequence_states, sequence_bounds

Tensor = torch.Tensor


def gla_forward_from_gate(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gc: Tensor,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    dims: Dims,
    shifts: SafeExpShifts | None = None,
    sequences: SequenceChunks | None = None,
    epilogue: NormEpilogue | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The forward pass given the within-chunk cumulative log2 gates.

    Args:
        q, k: [B, T, H, K] contiguous (with `shifts`, the raw inputs of the safe-exp features).
        v: [B, T, H, V] contiguous, q's dtype.
        gc: [B, Tp, H, K] fp32, from `blocks.gate.gate_cumsum` or `blocks.refined_gate.refined_gate_cumsum`.
        scale: the output's scale.
        initial_state: [B, H, K, V] (any float dtype), or None for zeros.
        output_final_state: whether to return the final state.
        dims: `blocks.common.dims_of(q, v)`.
        shifts: safe-exp shifts (q and k are then read as φ(q), φ(k)), or None.
        sequences: packed sequences, the inputs in the chunk-aligned layout of `blocks.varlen`
            (B = 1; initial and final states [N, H, K, V]), or None for one sequence per batch row.
        epilogue: a per-head RMSNorm (and output gate) applied to o before it is stored
            (`blocks.norm_epilogue`), or None.

    Returns:
        o: [B, T, H, V] in q's dtype (normalised and gated with `epilogue`).
        final: [B, H, K, V] ([N, H, K, V] with `sequences`) fp32, or None unless `output_final_state`.
        scores: [B, Tp, H, CHUNK] fp32 within-chunk scores, kept for `gla_backward`.
    """
    # The output reads the states only as product operands: stored in that dtype, as fla's forward does.
    states, final = chunk_states(
        k, v, gc, initial_state, output_final_state, dims, shifts, sequences, states_dtype=operand_dtype(dims)
    )
    scores = intra_scores(q, k, gc, dims, shifts)
    if epilogue is not None:
        o = normed_output(q, v, gc, scores, states, scale, dims, shifts, epilogue)
    else:
        o = chunk_output(q, v, gc, scores, states, scale, dims, shifts)
    return o, final, scores


def recompute_states(
    k: Tensor,
    v: Tensor,
    gc: Tensor,
    initial_state: Tensor | None,
    dims: Dims,
    shifts: SafeExpShifts | None = None,
    sequences: SequenceChunks | None = None,
) -> Tensor:
    """The chunk-entry states [B, H, NT, K, V] fp32 for the backward, arguments as for `gla_forward_from_gate`.

    Recomputed rather than kept from the forward: they would otherwise be held for the whole of the
    model's backward."""
    states, _ = chunk_states(k, v, gc, initial_state, False, dims, shifts, sequences)
    return states


def gla_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gc: Tensor,
    scores: Tensor,
    initial_state: Tensor | None,
    do: Tensor,
    dht: Tensor | None,
    scale: float,
    dims: Dims,
    dg_dtype: torch.dtype,
    shifts: SafeExpShifts | None = None,
    sequences: SequenceChunks | None = None,
    states: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The backward pass of `gla_forward_from_gate`.

    Args:
        q, k, v, gc, initial_state, dims, shifts, sequences: as given to `gla_forward_from_gate`.
        scores: [B, Tp, H, CHUNK] fp32, as returned by it.
        do: [B, T, H, V] the output's gradient, contiguous.
        dht: [B, H, K, V] ([N, H, K, V] with `sequences`) the final state's gradient, contiguous,
            or None for zero.
        scale: the output's scale.
        dg_dtype: dtype of the log gate's gradient.
        states: [B, H, NT, K, V] fp32 chunk-entry states, when the caller has recomputed them
            already (`recompute_states`; the norm epilogue's backward needs them first), or None.

    Returns:
        dq, dk: [B, T, H, K]; in q's and k's dtypes without `shifts`; with `shifts`, the raw inputs'
            gradients at fixed shifts, in fp32 (`blocks.max_shift.add_max_gradient` adds the rest).
        dv: [B, T, H, V] in v's dtype.
        dg: [B, T, H, K] in `dg_dtype`, the gradient of the per-feature log gate (before the
            cumulative sum: summed over features for a per-head gate by the caller).
        dh0: [B, H, K, V] ([N, H, K, V] with `sequences`) fp32, or None without an initial state.
        d_query_shift, d_key_shift: [B, T, H] fp32, the safe-exp shifts' gradients; None without `shifts`.
    """
    if states is None:
        states = recompute_states(k, v, gc, initial_state, dims, shifts, sequences)
    dstates, dh0 = chunk_state_grads(q, do, gc, dht, initial_state is not None, scale, dims, shifts, sequences)
    score_grad = intra_score_grads(do, v, scale, dims)
    dv = value_grads(k, gc, scores, do, dstates, scale, dims, v.dtype, shifts)
    dq_inter, dk_inter = query_key_inter_grads(v, gc, do, states, dstates, scale, dims)
    # With safe-exp features, dq and dk still get the max shifts' terms (kernels.triton_regla):
    # they stay in fp32 until then, as those terms nearly cancel at the maxima.
    dq, dk, dG, key_state_term, rowsums = query_key_grads(q, k, gc, score_grad, dq_inter, dk_inter, dims, shifts)
    del score_grad, dq_inter, dk_inter  # dq_inter's buffer is dG's now, dk_inter's key_state_term's
    # Closed-form gate gradient from within-chunk sums and the states entering each chunk, in a form
    # whose terms do not cancel (blocks.gate.gate_grad_kernel).
    dg = gate_grad(dG, key_state_term, gc, states, dstates, dims, dg_dtype)
    if rowsums is None:
        return dq, dk, dv, dg, dh0, None, None
    # φ = exp(x − m): ∂L/∂m = −Σ_features φ ⊙ dφ, i.e. minus the row sums of dq, dk.
    return dq, dk, dv, dg, dh0, -rowsums[0].sum(0), -rowsums[1].sum(0)


class ChunkedGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gk, scale, initial_state, output_final_state, bounds):
        # Packed sequences run in the chunk-aligned layout (blocks.varlen): inputs copied in, output out.
        layout = chunk_aligned_layout(bounds, q.device) if bounds is not None else None
        if layout is not None:
            q, k, v, gk = (align(t, layout) for t in (q, k, v, gk))
        sequences = layout.chunks if layout is not None else None
        dims = dims_of(q, v)
        gc = gate_cumsum(gk, dims)  # [B, Tp, H, K]
        o, final, scores = gla_forward_from_gate(
            q, k, v, gc, scale, initial_state, output_final_state, dims, sequences=sequences
        )
        ctx.save_for_backward(q, k, v, gk, gc, scores, initial_state)
        ctx.scale, ctx.dims, ctx.layout = scale, dims, layout
        return (unalign(o, layout) if layout is not None else o), final

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, do, dht):
        q, k, v, gk, gc, scores, initial_state = ctx.saved_tensors
        layout = ctx.layout
        scalar_gate = gk.shape[-1] == 1
        do = align(do, layout) if layout is not None else do.contiguous()
        dq, dk, dv, dg, dh0, _, _ = gla_backward(
            q,
            k,
            v,
            gc,
            scores,
            initial_state,
            do,
            dht.contiguous() if dht is not None else None,
            ctx.scale,
            ctx.dims,
            torch.float32 if scalar_gate else gk.dtype,
            sequences=layout.chunks if layout is not None else None,
        )
        if scalar_gate:
            dg = dg.sum(-1, keepdim=True).to(gk.dtype)
        if layout is not None:
            dq, dk, dv, dg = (unalign(t, layout) for t in (dq, dk, dv, dg))
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk, dv, dg, None, dh0, None, None


def triton_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention on the Triton kernels (same contract as the references).

    Args:
        q, k: [B, T, H, K], K <= 256.
        v: [B, T, H, V], V <= 256; q, k, v of one float dtype (bf16 runs its products on tensor
            cores; fp32 in 3-pass tf32).
        gk: key-side log gate (<= 0), [B, T, H, K] or [B, T, H, 1] for one per head; None for no decay.
        gv: value-side log gate [B, T, H, V] or [B, T, H, 1] (Fast Decay), or None. The kernels
            take it through an exact rescaling of v and o over 64-token segments
            (`kernels.value_gate`), at the cost of one device-to-host copy per call; a call whose
            value gate decays by a factor below e^-30 within a segment (`value_gate.MAX_SPAN`) runs
            the fused recurrent kernels (`kernels.triton_recurrent.fused_recurrent_gla`; the torch
            chunked form for K > 128), and one with `cu_seqlens` runs `kernels.reference.chunked_gla`.
        scale: the output's scale.
        initial_state: [B, H, K, V] ([N, H, K, V] with `cu_seqlens`), or None for zeros.
        output_final_state: whether to return the final state.
        cu_seqlens: [N + 1] int offsets of N sequences packed along time (B = 1; `kernels.varlen`):
            the state restarts at each boundary. None: one sequence per batch row.

    Returns:
        o: [B, T, H, V] in q's dtype.
        final_state: [B, H, K, V] ([N, H, K, V] with `cu_seqlens`), or None unless
            `output_final_state`; fp32 on the kernels (the state is kept in fp32).
    """
    if gv is not None:
        # Fast Decay: this op on rescaled values, segment by segment, or the fused recurrence for gates
        # too fast for that (within its key-dim limit; else the torch chunked form).
        fallback = fused_recurrent_gla if q.shape[-1] <= MAX_KEY_DIM else None
        return value_gated_gla(
            triton_gla,
            q,
            k,
            v,
            gk,
            gv,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            fallback_op=fallback,
        )
    check_supported(q, v)
    B, T, H, K = q.shape
    bounds = sequence_bounds(cu_seqlens, B, T) if cu_seqlens is not None else None
    if bounds is not None:
        check_sequence_states(initial_state, len(bounds) - 1)
    if gk is None:
        gk = q.new_zeros(B, T, H, 1)
    q, k, v, gk = (t.contiguous() for t in (q, k, v, gk))
    with on_device_of(q):
        return ChunkedGLAFunction.apply(q, k, v, gk, float(scale), initial_state, output_final_state, bounds)
