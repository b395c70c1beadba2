"""A value-side log gate gv (Fast Decay) on the key-gate-only GLA kernels, by exact rescaling.

    S_t = diag(e^{gk_t}) S_{t-1} diag(e^{gv_t}) + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t

The time axis is cut into segments of SEGMENT tokens. Inside a segment, with a_t = Σ gv_s over the
segment's tokens s <= t (fp32), S'_t = S_t diag(e^{-a_t}) follows the key-gate-only recurrence

    S'_t = diag(e^{gk_t}) S'_{t-1} + k_t v'_tᵀ,   v'_t = v_t ⊙ e^{-a_t},

from S' = S at the segment's entry, and o_t = e^{a_t} ⊙ o'_t with o'_t = scale · S'_tᵀ q_t.
Every segment is one batch row of a single call of the key-gate op (`kernels.triton_gla`) from a
zero state, which gives the within-segment outputs and the segment's own final state F'. What the
state entering a segment adds is carried in torch: with b_t the within-segment cumulative gk,

    o'_t += scale · (q_t ⊙ e^{b_t})ᵀ S_entry,
    S_exit = (diag(e^{b_end}) S_entry + F') diag(e^{a_end}),

one step per segment on [B, H, K, V] fp32 states. Gradients flow through torch autograd (the
Triton op is an autograd Function, the rest torch ops). Segments as batch rows of one call, rather
than one call per segment chaining its final state into the next one's initial state, launch each
kernel once per call with the chunk-parallel work of all segments together, where the chain would
launch every kernel once per segment; what that costs is the torch step per segment above, and the
entering states kept for the backward.

Numerics: a_t, b_t, the rescaling, the carried states and the entering states' share of o in fp32
(autocast off); v' is cast to v's dtype for the kernels, whose o' comes back in q's dtype. For
fp32 inputs the result is as accurate as the key-gate op's. In bf16 the value gate's gradient, which
autograd forms as a within-segment sum of do ⊙ o − v ⊙ dv (a cancelling difference of the kernels'
bf16 outputs), is several times less accurate than the key gate's, which the kernels form in a
rearranged fp32 form (`kernels.blocks.gate`); tests/test_value_gate.py gives the measured errors.

Limits: the rescaling factor e^{-a_t} grows along a segment, so a call whose value gate decays by
more than MAX_SPAN nats within some segment (in any batch row, head or value column) runs the
caller's `fallback_op` instead: `kernels.triton_gla` passes the fused recurrent kernels
(`kernels.triton_recurrent`, exact for any finite gate, one token per step: slower than the chunk
kernels, far faster than torch); without one, and for calls with packed sequences (`cu_seqlens`),
`kernels.reference.chunked_gla` runs (exact for any finite gate, in torch). fp16 inputs take the
fallback too (their range holds ~11 nats of rescaling). Choosing the path reads two numbers back
from the device per call, so a call cannot be captured in a CUDA graph. The segments as batch rows
are B · T/64 rows; they go to the kernels in groups that fit CUDA's grid axis (MAX_GRID_AXIS).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import reference
from .blocks.common import CHUNK, MAX_GRID_AXIS

Tensor = torch.Tensor

#: Tokens per segment: the kernels' chunk (64). A multiple of it adds no padded rows to the kernels'
#: work (their chunk-parallel passes see as many chunks as in one call over the whole sequence), and
#: the smallest such multiple lets the fastest value decay through before a call falls back: MAX_SPAN
#: over 64 tokens, i.e. a column decaying on average by more than e^{-30/64} ≈ 0.63 a step over a
#: whole segment (128 would fall back from 0.79 a step). The entering states kept for the backward
#: are B · T/64 · H · K · V fp32 (the size of the kernels' own chunk-entry states, which they
#: recompute instead), a few times over with autograd's copies of the carried states.
SEGMENT = CHUNK

#: Largest |a_t| (nats) allowed inside a segment. v' reaches at most e^30 ≈ 1.1e13 · |v|, so the
#: kernels' states and outputs (sums of ≤ 64 products of q, k and v') stay below ~1e20 for
#: activations up to 1e3, far from the fp32/bf16 limit of 3.4e38 (e^88.7); the output gradient
#: entering the kernels, do ⊙ e^{a_t}, is at least e^{-30} ≈ 1e-13 · |do|, far above the smallest
#: normal 1.2e-38 (e^-87.3) for any gradient above 1e-20. Inside that range the rescaling is exact up
#: to rounding (products with exp factors, relative rounding only): accuracy does not depend on a_t.
MAX_SPAN = 30.0

KeyGateOp = Callable[..., tuple[Tensor, Tensor | None]]

#: Calls of `value_gated_gla` in this process by the path they took: "kernels" (the segmented form)
#: or why they fell back ("span": the gate decayed by more than MAX_SPAN inside a segment, and the
#: call ran the caller's fallback op, the fused recurrent kernels for `kernels.triton_gla`, or the
#: torch chunked form without one; "fp16": fp16 inputs, too narrow for the rescaling, the same
#: fallback; "empty": T = 0; "packed": `cu_seqlens`, the torch chunked form). Training records
#: the counts of its own steps (`harness.train`), so a slow Fast Decay run shows which path it took.
PATH_COUNTS: Counter[str] = Counter()


def value_gated_gla(
    key_gate_op: KeyGateOp,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None,
    gv: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    fallback_op: KeyGateOp | None = None,
) -> tuple[Tensor, Tensor | None]:
    """GLA with a value-side gate through `key_gate_op` (a key-gate-only op with the references'
    signature, e.g. `kernels.triton_gla.triton_gla`); `fallback_op` when the gate decays too fast
    for the rescaling (see the module docstring), and `kernels.reference.chunked_gla` with
    `cu_seqlens`.

    Args:
        q, k: [B, T, H, K].
        v: [B, T, H, V].
        gk: key-side log gate [B, T, H, K] or [B, T, H, 1], or None.
        gv: value-side log gate [B, T, H, V] or [B, T, H, 1].
        scale, initial_state, output_final_state, cu_seqlens: as for `kernels.reference.chunked_gla`.
        fallback_op: an op with the references' signature, exact for any finite gate and taking
            both gates, e.g. `kernels.triton_recurrent.fused_recurrent_gla` (never given
            `cu_seqlens`); None for `kernels.reference.chunked_gla`.

    Returns:
        o: [B, T, H, V] in q's dtype.
        final_state: [B, H, K, V] ([N, H, K, V] with `cu_seqlens`) in fp32 (fp64 for fp64 inputs on
            the torch fallback), or None unless `output_final_state`.
    """
    if cu_seqlens is not None:
        reason = "packed"
    elif v.dtype == torch.float16:
        reason = "fp16"  # fp16's range (6.5e4; normals from 6e-5) holds ~11 nats of rescaling, not MAX_SPAN
    elif q.shape[1] == 0:
        reason = "empty"
    else:
        # Autocast off: it would round the torch products here (the entering states' share of o) to bf16.
        with torch.autocast(q.device.type, enabled=False):
            result = _segmented(key_gate_op, q, k, v, gk, gv, scale, initial_state, output_final_state)
        if result is not None:
            PATH_COUNTS["kernels"] += 1
            return result
        reason = "span"
    fallback = fallback_op if reason != "packed" and fallback_op is not None else None
    if reason == "span" and not PATH_COUNTS["span"]:
        # Once per process: either fallback is exact but slower than the segmented form (the recurrent
        # kernels take one token per step, the torch form is several times slower), which a run's log
        # should say.
        form = "the fused recurrent kernels" if fallback is not None else "the torch chunked form"
        warnings.warn(
            f"a value-side gate decayed by more than {MAX_SPAN:g} nats within a {SEGMENT}-token segment: "
            f"this call and any like it run {form} (exact, slower than the chunk kernels); a run records "
            "how many did as attention/value_gate_span",
            RuntimeWarning,
            stacklevel=2,
        )
    PATH_COUNTS[reason] += 1
    if fallback is not None:
        return fallback(
            q, k, v, gk, gv, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    o, final = reference.chunked_gla(
        q,
        k,
        v,
        gk,
        gv,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    # chunked_gla returns bf16/fp16 states in that dtype, having computed them in fp32.
    return o, (final.to(torch.promote_types(final.dtype, torch.float32)) if final is not None else None)


def _segmented(
    key_gate_op: KeyGateOp,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None,
    gv: Tensor,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None] | None:
    """The segmented form of the module docstring, arguments as for `value_gated_gla` (one sequence
    per batch row, T >= 1); None when the value gate spans more than MAX_SPAN inside a segment."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    L = min(SEGMENT, T)
    N = -(-T // L)
    pad = N * L - T

    def segments(x: Tensor) -> Tensor:
        # [B, T, H, D] -> [B * N, L, H, D], one segment per row; zero padding after the end (zero
        # keys, values and log gates) changes no real output and leaves the final state as it is.
        return F.pad(x, (0, 0, 0, 0, 0, pad)).reshape(B * N, L, H, x.shape[-1])

    a = segments(gv).float().cumsum(1)  # [B*N, L, H, V|1]: the within-segment cumulative value gate
    # One device-to-host copy per call, to choose the path; aminmax reads `a` once and makes no
    # temporary of its size. A NaN gate fails the test and takes the fallback too.
    low, high = torch.aminmax(a.detach())
    if not max(-low.item(), high.item()) <= MAX_SPAN:
        return None

    v_scaled = (segments(v).float() * torch.exp(-a)).to(v.dtype)
    q_seg = segments(q)
    gk_seg = segments(gk) if gk is not None else None
    o_local, local_final = _by_row_groups(
        key_gate_op, H, q_seg, segments(k), v_scaled, gk_seg, scale=scale, initial_state=None, output_final_state=True
    )
    o_scaled = o_local.float()  # [B*N, L, H, V]: o' from a zero state at each segment's entry
    bk = gk_seg.float().cumsum(1) if gk_seg is not None else None  # [B*N, L, H, K|1]

    state = initial_state.float() if initial_state is not None else None
    if state is not None or N > 1 or output_final_state:
        # The states entering each segment, one step per segment (zero entering the first one
        # without an initial state), and the final state.
        local_final = local_final.view(B, N, H, K, V)
        key_decay = bk[:, -1].exp().view(B, N, H, -1, 1) if bk is not None else None
        value_decay = a[:, -1].exp().view(B, N, H, 1, -1)
        entries = []
        for n in range(N):
            entries.append(state if state is not None else local_final.new_zeros(B, H, K, V))
            if n < N - 1 or output_final_state:
                carried = local_final[:, n]
                if state is not None:
                    carried = carried + (state * key_decay[:, n] if key_decay is not None else state)
                state = carried * value_decay[:, n]
        if initial_state is not None or N > 1:
            q_decayed = q_seg.float() * bk.exp() if bk is not None else q_seg.float()
            entering = torch.stack(entries, 1).view(B * N, H, K, V)
            o_scaled = o_scaled + scale * torch.einsum("rlhk,rhkv->rlhv", q_decayed, entering)
    o = (torch.exp(a) * o_scaled).to(q.dtype).reshape(B, N * L, H, V)[:, :T]
    return o, (state if output_final_state else None)


def _by_row_groups(key_gate_op: KeyGateOp, H: int, q: Tensor, k: Tensor, v: Tensor, gk: Tensor | None, **options):
    """`key_gate_op` over the rows of q, k, v, gk in groups of at most MAX_GRID_AXIS // H rows: the
    segments as batch rows multiply the rows by T/64, and the kernels launch one program per row and
    head on a grid axis CUDA caps at MAX_GRID_AXIS. Outputs (and final states) concatenated."""
    rows = max(MAX_GRID_AXIS // H, 1)
    if q.shape[0] <= rows:
        return key_gate_op(q, k, v, gk, None, **options)
    parts = [
        key_gate_op(
            q[i : i + rows], k[i : i + rows], v[i : i + rows], gk[i : i + rows] if gk is not None else None, None,
            **options,
        )
        for i in range(0, q.shape[0], rows)
    ]  # fmt: skip
    return torch.cat([o for o, _ in parts]), torch.cat([final for _, final in parts])
