"""One decoding step of gated linear attention as one Triton kernel: for one new token per
sequence, the feature map, the gate, the state update, the readout and the per-head output norm.

    φ(q) = q or exp(q − max q) · query_factor,   φ(k) = k or exp(k − m_t), m_t = max(m_{t-1}, max k)
    log α = given | logσ(a) / τ (GLA) | refined log gate of (a, b) (ReGLA), clamped; + (m_{t-1} − m_t)
    S_t = diag(α) S_{t-1} + φ(k) vᵀ,   o = scale · S_tᵀ φ(q),   o ← o / sqrt(mean(o²) + eps) · w

Decoding one token through the composed path is a dozen small launches per layer (feature maps,
gate, recurrence, norm), each of which moves a few kilobytes: the step is launch-bound. Here one
program per (batch, head) reads the raw projections, keeps the state tile in registers while it
decays, updates and reads it out, and writes the normalised output; the state and the key max are
updated in place when asked (static decoding buffers, CUDA graphs) or written to new tensors.

The formulas are those of the composed path: `kernels.safe_exp.key_shifts` for the running key
max (decoding continues every key-max scope as `running`), `variants.gates` for the gates (the
refining gate's formula is the shared `_refined_log_gate_parts`), `variants.norms.RMSNorm` for the
norm, with its eps optionally in the unshifted frame (eps · exp(−2 (q shift + key shift))).
Everything is computed in fp32; the state is fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .blocks.common import MAX_HEAD_DIM, empty, next_power_of_2, on_device_of
from .blocks.refined_gate import _refined_log_gate_parts

Tensor = torch.Tensor

FEATURES = ("identity", "safe_exp")
GATES = ("none", "log", "sigmoid", "refined")
# Key rows per state tile: a [32, 256] fp32 tile is 64 registers a thread over 4 warps.
_KEY_BLOCK = 32


class DecodeStepOutput(NamedTuple):
    output: Tensor  # [B, 1, H, V] in q's dtype, normalised when a norm was given
    state: Tensor  # [B, H, K, V] fp32: the given state itself when updated in place
    key_max: Tensor | None  # [B, H] fp32 (safe_exp), the given one itself when in place


@triton.jit
def decode_step_kernel(
    q,
    k,
    v,
    gate_a,
    gate_b,
    state_in,
    state_out,
    key_max_in,
    key_max_out,
    weight,
    o,
    K,
    V,
    gate_width,
    gate_column_stride,
    scale,
    query_factor,
    inv_tau,
    log_clamp,
    eps,
    SAFE_EXP: tl.constexpr,
    GATE: tl.constexpr,  # 0 none, 1 given log gate, 2 sigmoid (GLA), 3 refined
    HAS_CLAMP: tl.constexpr,
    NORM: tl.constexpr,
    AFFINE: tl.constexpr,
    EPS_UNSHIFTED: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    KP: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # one (batch, head) per program; rows of q, k, v are [B*H, ·]
    cols = tl.arange(0, BV)
    in_v = cols < V
    values = tl.load(v + bh * V + cols, mask=in_v, other=0.0).to(tl.float32)
    row_decay = 0.0
    query_shift = 0.0
    key_shift = 0.0
    if SAFE_EXP:
        every = tl.arange(0, KP)
        query_shift = tl.max(tl.load(q + bh * K + every, mask=every < K, other=float("-inf")).to(tl.float32), 0)
        token_max = tl.max(tl.load(k + bh * K + every, mask=every < K, other=float("-inf")).to(tl.float32), 0)
        previous = tl.load(key_max_in + bh)
        key_shift = tl.maximum(previous, token_max)
        row_decay = previous - key_shift  # <= 0: the state is rescaled to the new key max
    readout = tl.zeros([BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rows = k0 + tl.arange(0, BK)
        in_k = rows < K
        queries = tl.load(q + bh * K + rows, mask=in_k, other=0.0).to(tl.float32)
        keys = tl.load(k + bh * K + rows, mask=in_k, other=0.0).to(tl.float32)
        if SAFE_EXP:
            queries = tl.where(in_k, tl.exp(queries - query_shift) * query_factor, 0.0)
            keys = tl.where(in_k, tl.exp(keys - key_shift), 0.0)
        # A per-head scalar gate (width 1, column stride 0) is read at column 0 for every key row.
        gate_rows = rows * gate_column_stride
        log_gate = tl.zeros([BK], dtype=tl.float32)
        if GATE == 1:
            log_gate = tl.load(gate_a + bh * gate_width + gate_rows, mask=in_k, other=0.0).to(tl.float32)
        if GATE == 2:
            a = tl.load(gate_a + bh * gate_width + gate_rows, mask=in_k, other=0.0).to(tl.float32)
            log_gate = (tl.minimum(a, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(a)))) * inv_tau
        if GATE == 3:
            a = tl.load(gate_a + bh * gate_width + gate_rows, mask=in_k, other=0.0).to(tl.float32)
            b = tl.load(gate_b + bh * gate_width + gate_rows, mask=in_k, other=0.0).to(tl.float32)
            log_f, _, _, _ = _refined_log_gate_parts(a, b)
            log_gate = tl.minimum(log_f, 0.0) * inv_tau
        if HAS_CLAMP:
            log_gate = tl.maximum(log_gate, log_clamp)
        decay = tl.exp(log_gate + row_decay)
        tile = (bh * K + rows[:, None]) * V + cols[None, :]
        inside = in_k[:, None] & in_v[None, :]
        state = tl.load(state_in + tile, mask=inside, other=0.0)
        state = state * decay[:, None] + keys[:, None] * values[None, :]
        tl.store(state_out + tile, state, mask=inside)
        readout += tl.sum(queries[:, None] * state, 0)
    readout = readout * scale
    if NORM:
        # As `variants.norms.unit_rows`: the readout divided by s, its largest magnitude or
        # sqrt(eps_t) where that is larger, and eps_t by s² (in log space), so that a tiny readout
        # (safe-exp's shifted frame under a closed gate) is never squared; the result is the same.
        magnitude = tl.maximum(tl.max(tl.where(in_v, tl.abs(readout), 0.0), 0), 1.1754943508222875e-38)
        log_eps = tl.log(eps)
        if EPS_UNSHIFTED:
            # The norm's eps in the frame without safe-exp's shifts: eps · exp(2 log_scale), log_scale = -(shifts).
            log_eps = log_eps - 2.0 * (query_shift + key_shift)
        log_s = tl.maximum(tl.log(magnitude), 0.5 * log_eps)
        readout = readout * tl.exp(-log_s)
        norm_eps = tl.exp(log_eps - 2.0 * log_s)
        mean_square = tl.sum(tl.where(in_v, readout * readout, 0.0), 0) / V
        readout = readout / tl.sqrt(mean_square + norm_eps)
        if AFFINE:
            readout = readout * tl.load(weight + cols, mask=in_v, other=0.0).to(tl.float32)
    tl.store(o + bh * V + cols, readout.to(o.dtype.element_ty), mask=in_v)
    if SAFE_EXP:
        tl.store(key_max_out + bh, key_shift)


def triton_decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: Tensor,
    *,
    features: str = "identity",
    key_max: Tensor | None = None,
    query_factor: float = 1.0,
    gate: str = "none",
    gate_logits: Tensor | None = None,
    refine_logits: Tensor | None = None,
    log_gate: Tensor | None = None,
    tau: float = 1.0,
    log_clamp: float | None = None,
    scale: float = 1.0,
    norm_eps: float | None = None,
    norm_weight: Tensor | None = None,
    eps_unshifted: bool = False,
    in_place: bool = False,
) -> DecodeStepOutput:
    """One token of gated linear attention per sequence, feature map to output norm in one launch.

    Args:
        q, k: [B, 1, H, K] raw projections of the new token (K <= 256), one float dtype with v.
        v: [B, 1, H, V] (V <= 256).
        state: [B, H, K, V] fp32 contiguous, the state after the earlier tokens.
        features: "identity" or "safe_exp" (then `key_max` [B, H] fp32, the last key shift, is
            required, and `query_factor` multiplies φ(q)).
        gate: "none"; "log" (`log_gate`, a key-side log gate <= 0); "sigmoid" (GLA's logσ(a)/τ of
            `gate_logits`); or "refined" (ReGLA's refining gate of `gate_logits`, `refine_logits`).
            Gate tensors are [B, 1, H, K] or [B, 1, H, 1] (a per-head scalar), any float dtype;
            `log_clamp` (< 0 or None) bounds the learnable gates' log decay from below.
        scale: the readout's scale.
        norm_eps: the per-head RMSNorm's eps, or None for no norm; `norm_weight` [V] or None.
        eps_unshifted: put the norm's eps in the frame without safe-exp's shifts.
        in_place: write the new state (and key max) into the given tensors.

    Returns:
        DecodeStepOutput: output [B, 1, H, V] in q's dtype, the new state and key max.
    """
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be [B, 1, H, K] (one new token per sequence); got shape {tuple(q.shape)}")
    B, _, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"k must have q's shape {tuple(q.shape)} and v be [B, 1, H, V]; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if max(K, V) > MAX_HEAD_DIM:
        raise ValueError(f"the decoding step supports head dims up to {MAX_HEAD_DIM}; got K={K}, V={V}")
    if tuple(state.shape) != (B, H, K, V) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(
            f"state must be a contiguous fp32 [B, H, K, V] = {(B, H, K, V)} tensor; "
            f"got {tuple(state.shape)} {state.dtype}{'' if state.is_contiguous() else ' (not contiguous)'}"
        )
    if features not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}; got {features!r}")
    safe_exp = features == "safe_exp"
    if safe_exp and (key_max is None or tuple(key_max.shape) != (B, H) or key_max.dtype != torch.float32):
        got = None if key_max is None else f"{tuple(key_max.shape)} {key_max.dtype}"
        raise ValueError(f"safe_exp features need key_max, fp32 [B, H] = {(B, H)}; got {got}")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}; got {gate!r}")
    needed = {
        "none": (),
        "log": ("log_gate",),
        "sigmoid": ("gate_logits",),
        "refined": ("gate_logits", "refine_logits"),
    }
    given = {"log_gate": log_gate, "gate_logits": gate_logits, "refine_logits": refine_logits}
    if {name for name, t in given.items() if t is not None} != set(needed[gate]):
        raise ValueError(f"gate {gate!r} takes {', '.join(needed[gate]) or 'no gate tensors'}, and only those")
    gate_tensors = [given[name].contiguous() for name in needed[gate]]
    for t in gate_tensors:
        if t.shape[:3] != q.shape[:3] or t.shape[-1] not in (1, K):
            raise ValueError(f"gate tensors must be [B, 1, H, {K}] or [B, 1, H, 1]; got {tuple(t.shape)}")
    if len(gate_tensors) == 2 and gate_tensors[0].shape != gate_tensors[1].shape:
        raise ValueError("gate_logits and refine_logits must have one shape")
    if not tau > 0 or (log_clamp is not None and not log_clamp < 0):
        raise ValueError(f"tau must be > 0 and log_clamp negative or None; got tau={tau}, log_clamp={log_clamp}")
    if norm_weight is not None and (norm_eps is None or tuple(norm_weight.shape) != (V,)):
        raise ValueError(f"norm_weight must be [V] = ({V},) and comes with norm_eps; got {tuple(norm_weight.shape)}")
    if norm_eps is not None and not norm_eps >= 0:
        raise ValueError(f"norm_eps must be >= 0 or None; got {norm_eps}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    new_state = state if in_place else empty(state.shape, torch.float32, state.device)
    new_key_max = None
    if safe_exp:
        key_max = key_max.contiguous()
        new_key_max = key_max if in_place else empty(key_max.shape, torch.float32, key_max.device)
    o = empty((B, 1, H, V), q.dtype, q.device)
    placeholder = state  # pointers the kernel never reads under its switches
    gate_a = gate_tensors[0] if gate_tensors else placeholder
    with on_device_of(q):
        decode_step_kernel[(B * H,)](
            q,
            k,
            v,
            gate_a,
            gate_tensors[1] if len(gate_tensors) == 2 else placeholder,
            state,
            new_state,
            key_max if safe_exp else placeholder,
            new_key_max if safe_exp else placeholder,
            norm_weight if norm_weight is not None else placeholder,
            o,
            K,
            V,
            gate_a.shape[-1] if gate_tensors else 1,
            1 if gate_tensors and gate_a.shape[-1] > 1 else 0,
            float(scale),
            float(query_factor),
            1.0 / float(tau),
            float(log_clamp) if log_clamp is not None else 0.0,
            float(norm_eps) if norm_eps is not None else 0.0,
            SAFE_EXP=safe_exp,
            GATE=GATES.index(gate),
            HAS_CLAMP=log_clamp is not None and gate in ("sigmoid", "refined"),
            NORM=norm_eps is not None,
            AFFINE=norm_weight is not None,
            EPS_UNSHIFTED=bool(eps_unshifted and safe_exp and norm_eps is not None),
            BK=min(_KEY_BLOCK, next_power_of_2(K)),
            BV=next_power_of_2(V),
            KP=next_power_of_2(K),
        )
    return DecodeStepOutput(o, new_state, new_key_max)
