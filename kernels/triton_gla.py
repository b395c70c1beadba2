"""Chunked gated linear attention in Triton: forward and backward behind one autograd Function.

`triton_gla` has the signature of the torch references (`kernels.reference`) and computes

    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t

with a key-side log gate gk: [B, T, H, K] or a per-head scalar gate [B, T, H, 1]. The kernels
live in `triton_gla_kernels`; this module prepares inputs, launches them and assembles
gradients. The gate gradient uses the closed form: o depends on gk only through cumulative
sums, and ∂L/∂b_t = q_t ⊙ dq_t − k_t ⊙ dk_t for the within-chunk cumulative gate b_t, plus
rowsum(S ⊙ dS) of the state S leaving the chunk; dgk is the within-chunk reverse cumulative sum
of that (see `gate_grad_kernel`).

A value-side gate gv (Fast Decay) is not in the kernels: such calls run the torch chunked form.

Numerics: cumulative gates, states and every accumulation in fp32; matrix products take their
operands in the input dtype (bf16 on tensor cores; fp32 inputs use 3-pass tf32, close to fp32).
The final state is returned in fp32 whatever the input dtype, as the state is kept in fp32.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import reference
from .triton_gla_kernels import (
    CHUNK,
    DIAG_FEATURES,
    SUB_CHUNK,
    gate_cumsum_kernel,
    gate_grad_kernel,
    intra_score_grad_kernel,
    intra_scores_kernel,
    output_kernel,
    query_key_grad_kernel,
    query_key_inter_kernel,
    state_backward_kernel,
    state_forward_kernel,
    value_grad_kernel,
)

Tensor = torch.Tensor
MAX_HEAD_DIM = 256
_LOG2E = 1.0 / math.log(2.0)


#: Per-kernel launch options (num_warps, num_stages) by kernel name; Triton's defaults where
#: absent. Chosen by `benchmarks/tune_kernels.py` on the H200 (results/kernels/run5/tune_kernels.json:
#: fused ReGLA forward+backward 22.2 -> 18.4 ms at B4 T4096 H64 D128, 8.4 -> 6.8 ms at B16 T4096 H12 D64).
LAUNCH_OPTIONS: dict[str, dict[str, int]] = {
    "query_key_grad_kernel": dict(num_warps=2, num_stages=1),
    "intra_scores_kernel": dict(num_warps=4, num_stages=1),
    "state_forward_kernel": dict(num_warps=8, num_stages=3),
    "query_key_inter_kernel": dict(num_warps=2, num_stages=2),
    "output_kernel": dict(num_warps=4, num_stages=2),
    "value_grad_kernel": dict(num_warps=2, num_stages=2),
    "state_backward_kernel": dict(num_warps=8, num_stages=3),
    "gate_grad_kernel": dict(num_warps=2, num_stages=2),
}


def _launch_options(kernel_name: str) -> dict[str, int]:
    return LAUNCH_OPTIONS.get(kernel_name, {})


def check_supported(q: Tensor, v: Tensor) -> None:
    """Head dims up to MAX_HEAD_DIM; offsets inside one batch element must fit in 32 bits."""
    _, T, H, K = q.shape
    V = v.shape[-1]
    if max(K, V) > MAX_HEAD_DIM:
        raise ValueError(f"the Triton GLA kernels support head dims up to {MAX_HEAD_DIM}; got K={K}, V={V}")
    padded_T = triton.cdiv(T, CHUNK) * CHUNK
    if padded_T * H * max(K, V, CHUNK) >= 2**31:
        raise ValueError(
            f"T * H * max(K, V, {CHUNK}) must stay below 2^31 per batch element for the Triton "
            f"GLA kernels; got T={T}, H={H}, K={K}, V={V}: split the sequence or the heads"
        )


def on_device_of(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the kernels write goes through here (tests swap in a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block(dim: int) -> int:
    # tl.dot needs every side >= 16; 64 keeps an fp32 [64, 64] state tile within registers.
    return min(64, max(16, triton.next_power_of_2(dim)))


def _dot_options(dtype: torch.dtype) -> dict:
    """Operand dtype and fp32 precision of the kernels' matrix products."""
    interpreted = (
        triton.knobs.runtime.interpret if hasattr(triton, "knobs") else os.environ.get("TRITON_INTERPRET") == "1"
    )
    # Triton's CPU interpreter evaluates bf16 products wrongly, so it gets fp32 operands.
    half_precision = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    operand = tl.float32 if interpreted else half_precision.get(dtype, tl.float32)
    # tf32x3: three tf32 passes, close to fp32 accuracy; ignored for bf16 operands.
    return dict(PREC="tf32x3" if operand == tl.float32 else "tf32", DOT=operand)


class SafeExpShifts(NamedTuple):
    """Per-row shifts of ReGLA's safe-exp feature maps, [B, T, H] fp32 each: the kernels then read
    q and k as φ(q) = exp(q − query) and φ(k) = exp(k − key), formed on load."""

    query: Tensor
    key: Tensor


def _feature_args(shifts: SafeExpShifts | None, placeholder: Tensor) -> dict:
    """The kernels' shift pointers and EXP switch (placeholders, never read, without features)."""
    if shifts is None:
        return dict(qs=placeholder, ks=placeholder, EXP=False)
    return dict(qs=shifts.query, ks=shifts.key, EXP=True)


def _launch_gate_cumsum(gk: Tensor, K: int, dims, row_decay: Tensor | None = None) -> Tensor:
    """Within-chunk cumulative log gates: [B, T, H, K or 1] -> [B, NT * CHUNK, H, K] fp32, log2 units.
    `row_decay` [B, T, H] fp32 adds one more log decay per row (safe_exp's key-max rescaling)."""
    B, T, H, _, V, NT, BK, BV, dot = dims
    gc = _empty((B, NT * CHUNK, H, K), torch.float32, gk.device)
    gate_cumsum_kernel[(triton.cdiv(K, BK), NT, B * H)](
        gk,
        row_decay if row_decay is not None else gk,
        gc,
        T,
        NT * CHUNK,
        H,
        K,
        gk.shape[-1],
        _LOG2E,
        C=CHUNK,
        BK=BK,
        SCALAR=gk.shape[-1] == 1,
        ROW_DECAY=row_decay is not None,
        **_launch_options("gate_cumsum_kernel"),
    )
    return gc


def _launch_states_forward(k, v, gc, initial_state, output_final_state, dims, shifts=None):
    B, T, H, K, V, NT, BK, BV, dot = dims
    states = _empty((B, H, NT, K, V), torch.float32, k.device)  # [B, H, NT, K, V]
    final = _empty((B, H, K, V), torch.float32, k.device) if output_final_state else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    features = _feature_args(shifts, k)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)
    state_forward_kernel[grid](
        k,
        features["ks"],
        v,
        gc,
        h0 if h0 is not None else states,
        states,
        final if final is not None else states,
        T,
        gc.shape[1],
        H,
        K,
        V,
        NT,
        C=CHUNK,
        BK=BK,
        BV=BV,
        HAS_H0=h0 is not None,
        STORE_HT=final is not None,
        EXP=features["EXP"],
        **dot,
        **_launch_options("state_forward_kernel"),
    )
    return states, final


def _launch_intra_scores(q, k, gc, dims, shifts=None):
    B, T, H, K, V, NT, BK, BV, dot = dims
    scores = _empty((B, gc.shape[1], H, CHUNK), torch.float32, q.device)  # [B, Tp, H, C]
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
        BD=min(BK, DIAG_FEATURES),
        **_feature_args(shifts, q),
        **dot,
        **_launch_options("intra_scores_kernel"),
    )
    return scores


def _dims(q: Tensor, v: Tensor) -> tuple:
    B, T, H, K = q.shape
    V = v.shape[-1]
    return (B, T, H, K, V, triton.cdiv(T, CHUNK), _block(K), _block(V), _dot_options(q.dtype))


def _forward_from_gate(q, k, v, gc, scale, initial_state, output_final_state, dims, shifts=None):
    """The forward pass given within-chunk cumulative log2 gates gc: [B, Tp, H, K] fp32."""
    B, T, H, K, V, NT, BK, BV, dot = dims
    states, final = _launch_states_forward(k, v, gc, initial_state, output_final_state, dims, shifts)
    scores = _launch_intra_scores(q, k, gc, dims, shifts)
    o = _empty((B, T, H, V), q.dtype, q.device)
    features = _feature_args(shifts, q)
    output_kernel[(triton.cdiv(V, BV), NT, B * H)](
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
        **_launch_options("output_kernel"),
    )
    return o, final, scores


def _backward(q, k, v, gc, scores, initial_state, final, do, dht, scale, dims, dg_dtype, shifts=None):
    """Gradients of q, k, v, the (per-feature) log gate [B, T, H, K] in dg_dtype, and the initial state.

    With safe-exp `shifts`, dq and dk are the raw inputs' gradients at fixed shifts, in fp32, and
    two more results, [B, T, H] fp32, are the shifts' gradients (None without)."""
    B, T, H, K, V, NT, BK, BV, dot = dims
    Tp = gc.shape[1]
    features = _feature_args(shifts, q)
    # Chunk-entry states are recomputed rather than kept from the forward: [B, H, NT, K, V] fp32
    # would otherwise be held for the whole of the model's backward.
    states, _ = _launch_states_forward(k, v, gc, initial_state, False, dims, shifts)

    dstates = _empty((B, H, NT, K, V), torch.float32, q.device)
    dh0 = _empty((B, H, K, V), torch.float32, q.device) if initial_state is not None else None
    state_backward_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
        q,
        features["qs"],
        do,
        gc,
        dht if dht is not None else dstates,
        dstates,
        dh0 if dh0 is not None else dstates,
        scale,
        T,
        Tp,
        H,
        K,
        V,
        NT,
        C=CHUNK,
        BK=BK,
        BV=BV,
        HAS_DHT=dht is not None,
        STORE_DH0=dh0 is not None,
        EXP=features["EXP"],
        **dot,
        **_launch_options("state_backward_kernel"),
    )

    score_grad = _empty((B, Tp, H, CHUNK), torch.float32, q.device)  # [B, Tp, H, C]
    intra_score_grad_kernel[(NT, B * H)](
        do, v, score_grad, scale, T, Tp, H, V, C=CHUNK, BV=BV, **dot, **_launch_options("intra_score_grad_kernel")
    )

    dv = _empty((B, T, H, V), v.dtype, q.device)
    value_grad_kernel[(triton.cdiv(V, BV), NT, B * H)](
        k,
        features["ks"],
        gc,
        scores,
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
        C=CHUNK,
        BK=BK,
        BV=BV,
        EXP=features["EXP"],
        **dot,
        **_launch_options("value_grad_kernel"),
    )

    dq_inter = _empty((B, T, H, K), torch.float32, q.device)  # through the chunk states
    dk_inter = _empty((B, T, H, K), torch.float32, q.device)
    query_key_inter_kernel[(triton.cdiv(K, BK), NT, B * H)](
        v,
        gc,
        do,
        states,
        dstates,
        dq_inter,
        dk_inter,
        scale,
        T,
        Tp,
        H,
        K,
        V,
        NT,
        C=CHUNK,
        BK=BK,
        BV=BV,
        **dot,
        **_launch_options("query_key_inter_kernel"),
    )
    # With safe-exp features, dq and dk still get the max shifts' terms (kernels.triton_regla):
    # they stay in fp32 until then, as those terms nearly cancel at the maxima.
    dq = _empty((B, T, H, K), q.dtype if shifts is None else torch.float32, q.device)
    dk = _empty((B, T, H, K), k.dtype if shifts is None else torch.float32, q.device)
    dG = _empty((B, T, H, K), torch.float32, q.device)  # q ⊙ dq − k ⊙ dk, the gate's local term
    # Key blocks as narrow as the diagonal block's decay tensor, which spans a whole block here.
    BKD = min(BK, DIAG_FEATURES)
    # Per key block row sums of the raw dq, dk (safe-exp only): summed below, deterministically.
    rowsums = [
        _empty((triton.cdiv(K, BKD), B, T, H), torch.float32, q.device) if shifts is not None else dG for _ in range(2)
    ]
    query_key_grad_kernel[(triton.cdiv(K, BKD), NT * (CHUNK // SUB_CHUNK), B * H)](
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
        Tp,
        H,
        K,
        B,
        C=CHUNK,
        S=SUB_CHUNK,
        BK=BKD,
        EXP=features["EXP"],
        **dot,
        **_launch_options("query_key_grad_kernel"),
    )

    # Closed-form gate gradient (see gate_grad_kernel): within-chunk reverse sums of dG plus the
    # state-leaving-the-chunk term; the last chunk's leaving state is the final state, whose
    # gradient is zero (and the term absent) when no final state was asked for or used.
    dg = _empty((B, T, H, K), dg_dtype, q.device)
    has_final = final is not None and dht is not None
    gate_grad_kernel[(triton.cdiv(K, BK), NT, B * H)](
        dG,
        states,
        final if has_final else states,
        dstates,
        dg,
        T,
        H,
        K,
        V,
        NT,
        C=CHUNK,
        BK=BK,
        BV=BV,
        HAS_FINAL=has_final,
        **_launch_options("gate_grad_kernel"),
    )
    if shifts is None:
        return dq, dk, dv, dg, dh0, None, None
    # φ = exp(x − m): ∂L/∂m = −Σ_features φ ⊙ dφ, i.e. minus the row sums of dq, dk.
    return dq, dk, dv, dg, dh0, -rowsums[0].sum(0), -rowsums[1].sum(0)


class ChunkedGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gk, scale, initial_state, output_final_state):
        dims = _dims(q, v)
        gc = _launch_gate_cumsum(gk, q.shape[-1], dims)  # [B, Tp, H, K]
        o, final, scores = _forward_from_gate(q, k, v, gc, scale, initial_state, output_final_state, dims)
        ctx.save_for_backward(q, k, v, gk, gc, scores, initial_state, final)
        ctx.scale, ctx.dims = scale, dims
        return o, final

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, do, dht):
        q, k, v, gk, gc, scores, initial_state, final = ctx.saved_tensors
        scalar_gate = gk.shape[-1] == 1
        dq, dk, dv, dg, dh0, _, _ = _backward(
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
            torch.float32 if scalar_gate else gk.dtype,
        )
        if scalar_gate:
            dg = dg.sum(-1, keepdim=True).to(gk.dtype)
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk, dv, dg, None, dh0, None


def triton_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention, key-side gate, on the Triton kernels (same contract as the references)."""
    if gv is not None:
        # A value-side gate (Fast Decay) is not in the kernels yet: the torch chunked form is exact.
        return reference.chunked_gla(
            q, k, v, gk, gv, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    check_supported(q, v)
    B, T, H, K = q.shape
    if gk is None:
        gk = q.new_zeros(B, T, H, 1)
    q, k, v, gk = (t.contiguous() for t in (q, k, v, gk))
    with on_device_of(q):
        return ChunkedGLAFunction.apply(q, k, v, gk, float(scale), initial_state, output_final_state)
