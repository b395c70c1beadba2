"""Pure-PyTorch gated linear attention: the ground truth and the CPU training path.

All three forms compute the same function. With q, k: [B, T, H, K], v: [B, T, H, V], log gates
gk: [B, T, H, K] (key side) and gv: [B, T, H, V] (value side), both <= 0 (either may be None,
and either may have a trailing dimension of 1 to express a per-head scalar gate), the state
S_t: [B, H, K, V] follows

    S_t = diag(exp(gk_t)) @ S_{t-1} @ diag(exp(gv_t)) + k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

- key-side gate only: GLA / the refining gate (fla's `chunk_gla` convention);
- both: Fast Decay's outer-product gate G_t = α_v α_kᵀ (Mao 2022);
- scalar: a [.., 1] gate on either side;
- none: plain linear attention.

The denominator of classic linear attention is handled by `kernels.dispatch` for every form
alike (an extra value column of ones), so these functions only see plain value tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .varlen import per_sequence

Tensor = torch.Tensor


def _expand_gate(g: Tensor | None, like: Tensor) -> Tensor | None:
    """A [.., 1] scalar gate broadcast to the feature dim of `like`; None stays None."""
    if g is None:
        return None
    return g.expand(*like.shape[:-1], like.shape[-1]) if g.shape[-1] == 1 else g


def recurrent_gla(
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
    """Step-by-step recurrence in the inputs' dtype: the ground truth (run it in fp64).

    With `cu_seqlens` ([N + 1] offsets, batch 1) the sequences packed along time are run one by
    one (`kernels.varlen`); initial and final states are then [N, H, K, V]."""
    if cu_seqlens is not None:
        return per_sequence(
            recurrent_gla,
            cu_seqlens,
            q,
            k,
            v,
            gk,
            gv,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
    B, T, H, K = q.shape
    V = v.shape[-1]
    gk, gv = _expand_gate(gk, k), _expand_gate(gv, v)
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    outputs = []
    for t in range(T):
        if gk is not None:
            state = state * gk[:, t].exp().unsqueeze(-1)  # [B, H, K, 1]
        if gv is not None:
            state = state * gv[:, t].exp().unsqueeze(-2)  # [B, H, 1, V]
        state = state + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o, (state if output_final_state else None)


def _intra_block(q: Tensor, k: Tensor, v: Tensor, bk: Tensor | None, bv: Tensor | None) -> Tensor:
    """Causal within-block attention with pairwise decays exp(b_t - b_s), s <= t.

    Inputs are [..., C, K] / [..., C, V] with b the within-block cumulative log gates. The
    exponent is masked to -inf above the diagonal *before* exp, so every exponent used is <= 0.
    """
    C = q.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if bk is None:
        scores = q @ k.transpose(-1, -2)  # [..., C, C]
    else:
        # [..., C(t), C(s), K]: the decay of feature j between positions s and t.
        diff = bk.unsqueeze(-2) - bk.unsqueeze(-3)
        diff = diff.masked_fill(~causal.unsqueeze(-1), float("-inf"))
        scores = torch.einsum("...tk,...sk,...tsk->...ts", q, k, diff.exp())
    scores = scores.masked_fill(~causal, 0.0)
    if bv is None:
        return scores @ v
    diff_v = (bv.unsqueeze(-2) - bv.unsqueeze(-3)).masked_fill(~causal.unsqueeze(-1), float("-inf"))
    return torch.einsum("...ts,...sv,...tsv->...tv", scores, v, diff_v.exp())


#: largest |exponent| the factorised form may produce, per dtype: e^60 ≈ 1e26 leaves fp32 (and
#: bf16, same exponent range) headroom on both sides; fp16 overflows at e^11.
_EXPONENT_LIMIT = {torch.float64: 600.0, torch.float32: 60.0, torch.bfloat16: 60.0, torch.float16: 10.0}
_MAX_CHUNK = 64


def adaptive_chunk_size(gates: list[Tensor | None], dtype: torch.dtype, max_chunk: int = _MAX_CHUNK) -> int | None:
    """The largest power-of-two chunk (<= max_chunk) whose within-chunk cumulative log decay stays
    inside the dtype's safe exponent range; None when a gate is not finite."""
    steepest = 0.0
    for g in gates:
        if g is None or g.numel() == 0:
            continue
        lowest = float(g.detach().min())
        if not math.isfinite(lowest):
            return None
        steepest = max(steepest, -lowest)
    chunk = max_chunk
    while chunk > 1 and (chunk - 1) * steepest > _EXPONENT_LIMIT.get(dtype, 60.0):
        chunk //= 2
    return chunk


def _intra_block_factorised(q: Tensor, k: Tensor, v: Tensor, bk: Tensor | None, bv: Tensor | None) -> Tensor:
    """Causal within-block attention through one matrix product per side:
    e^{b_t − b_s} = e^{b_t − b_0} · e^{b_0 − b_s}, b_0 the block's first cumulative log gate.
    The chunk size is chosen so that |b_t − b_0| stays inside the dtype's exponent range
    (`adaptive_chunk_size`), which makes this exact up to rounding and much cheaper than
    materialising the [C, C, K] pairwise decays."""
    C = q.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if bk is not None:
        shifted = bk - bk[..., :1, :]  # [..., C, K], <= 0
        q, k = q * shifted.exp(), k * (-shifted).exp()
    if bv is not None:
        shifted_v = bv - bv[..., :1, :]
        v = v * (-shifted_v).exp()
    out = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0) @ v
    return out * shifted_v.exp() if bv is not None else out


def _below_fp32(*tensors: Tensor | None) -> bool:
    """Whether any given tensor is in a float dtype narrower than fp32, or autocast is on for
    their device (it would run the matrix products in a narrower dtype)."""
    present = [t for t in tensors if t is not None]
    if torch.is_autocast_enabled(present[0].device.type):
        return True
    return any(t.is_floating_point() and torch.finfo(t.dtype).bits < 32 for t in present)


def chunked_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise-parallel form: exact decays inside a chunk, a state carried across chunks.

    `chunk_size=None` (the default) picks the largest chunk (<= 64) for which the factorised
    within-chunk form is safe for these gate values. An explicit `chunk_size` uses explicit
    pairwise decays instead (every exponent a difference b_t − b_s <= 0): [B, H, n, C, C, K]
    memory, exact for any finite gate. Across chunks, every exponent is a chunk-relative
    cumulative (<= 0), so nothing overflows. Log gates must be finite (differences of -inf are
    undefined): clamp them from below, as the gates' `log_clamp` option does.

    With `cu_seqlens` ([N + 1] offsets, batch 1) the sequences packed along time are run one by
    one (`kernels.varlen`); initial and final states are then [N, H, K, V].

    Inputs narrower than fp32 (bf16, fp16), or any under autocast, are computed in fp32 and the
    results returned in q's dtype: the log gates' gradient needs it (see the comment below).
    """
    if cu_seqlens is not None:
        return per_sequence(
            chunked_gla,
            cu_seqlens,
            q,
            k,
            v,
            gk,
            gv,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            chunk_size=chunk_size,
        )
    if _below_fp32(q, k, v, gk, gv, initial_state):
        # The gate gradient of this form is a difference of two sums that share their largest
        # terms (each position's own q_t·k_t, which no gate decays): for small gates, e^g ≪ 1, what
        # survives the cancellation is ~e^g of them, so rounding products and sums to bf16 (2^-8)
        # left gradients many times their true size at log gates of -6..-8 (a closed gate). The
        # computation runs in fp32 (autocast off, as autocast would round the products again);
        # results come back in q's dtype.
        with torch.autocast(q.device.type, enabled=False):
            o, state = chunked_gla(
                *(None if x is None else x.float() for x in (q, k, v, gk, gv)),
                scale=scale,
                initial_state=None if initial_state is None else initial_state.float(),
                output_final_state=output_final_state,
                chunk_size=chunk_size,
            )
        return o.to(q.dtype), (None if state is None else state.to(q.dtype))
    B, T, H, K = q.shape
    V = v.shape[-1]
    gk, gv = _expand_gate(gk, k), _expand_gate(gv, v)
    factorised = chunk_size is None
    if factorised:
        chunk_size = adaptive_chunk_size([gk, gv], q.dtype)
        if chunk_size is None and any(g is not None and bool(torch.isnan(g).any()) for g in (gk, gv)):
            # NaN gates come from NaN activations: the model has diverged, no setting fixes the call.
            raise FloatingPointError(
                "chunked_gla: the log gates contain NaN (the values they are computed from are not finite)"
            )
        if chunk_size is None:
            raise ValueError(
                "chunked_gla: log gates must be finite (a gate of exactly 0 has log −inf); "
                "clamp them from below (gate option log_clamp) or use the recurrent form"
            )
    C = min(chunk_size, T) if factorised else chunk_size
    n = -(-T // C)
    pad = n * C - T

    def blocks(x: Tensor | None) -> Tensor | None:
        # [B, T, H, D] -> [B, H, n, C, D]; zero padding after the end changes no real output
        # (padded keys are zero, padded log gates are zero, i.e. no decay).
        if x is None:
            return None
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.reshape(B, n, C, H, -1).permute(0, 3, 1, 2, 4)

    qc, kc, vc = blocks(q), blocks(k), blocks(v)
    bk = blocks(gk).cumsum(-2) if gk is not None else None  # within-chunk cumulative log gates
    bv = blocks(gv).cumsum(-2) if gv is not None else None

    intra = _intra_block_factorised if factorised else _intra_block
    o_intra = intra(qc, kc, vc, bk, bv)  # [B, H, n, C, V]

    # Decayed keys/values as seen from the chunk end, and queries as seen from the chunk start.
    k_to_end = kc * (bk[..., -1:, :] - bk).exp() if bk is not None else kc
    v_to_end = vc * (bv[..., -1:, :] - bv).exp() if bv is not None else vc
    q_from_start = qc * bk.exp() if bk is not None else qc
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    o_inter = []
    for i in range(n):
        o_chunk = q_from_start[:, :, i] @ state  # [B, H, C, V]
        if bv is not None:
            o_chunk = o_chunk * bv[:, :, i].exp()
        o_inter.append(o_chunk)
        if bk is not None:
            state = state * bk[:, :, i, -1].exp().unsqueeze(-1)
        if bv is not None:
            state = state * bv[:, :, i, -1].exp().unsqueeze(-2)
        state = state + k_to_end[:, :, i].transpose(-1, -2) @ v_to_end[:, :, i]
    o = o_intra + torch.stack(o_inter, dim=2)
    o = scale * o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]
    return o, (state if output_final_state else None)


def parallel_gla(
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
    """Masked quadratic form over the whole sequence (one chunk of length T): short T only.
    With `cu_seqlens`, over each packed sequence."""
    if cu_seqlens is not None:
        return per_sequence(
            parallel_gla,
            cu_seqlens,
            q,
            k,
            v,
            gk,
            gv,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
    T = q.shape[1]
    return chunked_gla(q, k, v, gk, gv, scale, initial_state, output_final_state, chunk_size=max(T, 1))
