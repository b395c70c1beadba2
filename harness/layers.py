"""Attention layers and blocks. Each layer is an ordinary nn.Module taking x [B, T, D], so it can
be dropped into someone else's model (post-linearization), and returns its decoding state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import gated_linear_attention
from kernels.dispatch import divide_by_denominator, with_denominator_column
from kernels.fusion import RefiningGateKernel, SafeExpKernel
from kernels.safe_exp import key_shifts, query_shift
from variants import FEATURE_MAPS, GATES, NORMS, GateOutput

from .config import AttentionConfig, ConfigError, ModelConfig

Tensor = torch.Tensor


@dataclass
class LinearState:
    """What a linear-attention layer carries between decoding steps."""

    memory: Tensor  # [B, H, F, V] (V + 1 with the denominator)
    key_feature: Any  # the feature map's key state (e.g. safe_exp's running max)
    last_input: Tensor  # [B, 1, D], for gates fed with the previous token
    #: tokens seen so far: the rotary offset of the next step
    position: int = 0


class FusedPlan(NamedTuple):
    """What the fused op computes in place of the feature map and the gate."""

    features: SafeExpKernel
    gate: RefiningGateKernel


@dataclass
class KVCache:
    keys: Tensor  # [B, H, T_cached, K]
    values: Tensor  # [B, H, T_cached, K]

    @property
    def length(self) -> int:
        return self.keys.shape[2]


def _combine_log_decays(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return a + b


#: rotates (q, k) [B, T, H, K] for positions offset.. offset+T: a pretrained model's own rotary
#: embedding, handed to LinearAttention.forward by a converted model (harness.postlin)
Rotation = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]


class LinearAttention(nn.Module):
    """phi(q), phi(k) from the feature-map registry, a forget gate from the gate registry, the
    gated recurrence (kernels.gated_linear_attention), and an output norm from the norm registry.

    With `config.rotary` q and k get rotary positions (base `rotary_base`) before the feature map,
    as a softmax layer's do: what a layer converted from a pretrained softmax model keeps."""

    def __init__(
        self, d_model: int, num_heads: int, head_dim: int, config: AttentionConfig, rotary_base: float = 10000.0
    ):
        super().__init__()
        self.num_heads, self.head_dim, self.config = num_heads, head_dim, config
        self.rotary_base = rotary_base
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        self.feature_map = FEATURE_MAPS.create(config.feature_map, head_dim, num_heads, **config.feature_map_options)
        self.norm = NORMS.create(config.norm, head_dim, num_heads, **config.norm_options)
        self.gate = GATES.create(
            config.gate, d_model, num_heads, self.feature_map.feature_dim, head_dim, **config.gate_options
        )
        self.output_gate = nn.Linear(d_model, inner, bias=False) if config.output_gate == "swish" else None
        self.uses_denominator = config.denominator or self.norm.uses_denominator
        if self.uses_denominator and not self.feature_map.positive_kernel:
            positive = [n for n in FEATURE_MAPS.names() if FEATURE_MAPS.get(n).positive_kernel]
            raise ConfigError(
                f"the denominator normalisation divides by phi(q)·z and needs a feature map whose kernel "
                f"is positive; {config.feature_map!r} can give negative or zero values. Use one of "
                f"{', '.join(positive)}, or a norm without the denominator."
            )
        #: set by gate-saturation probes: the last GateOutput is kept when True
        self.capture_gates = False
        self.captured: GateOutput | None = None

    def forward(
        self, x: Tensor, state: LinearState | None = None, use_cache: bool = False, rotation: Rotation | None = None
    ) -> tuple[Tensor, LinearState | None]:
        """`rotation`: rotates q and k in place of the layer's own rotary (`config.rotary`)."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, K)
        k = self.k_proj(x).view(B, T, H, K)
        v = self.v_proj(x).view(B, T, H, K)
        offset = state.position if state is not None else 0
        if rotation is not None:
            q, k = rotation(q, k, offset)
        elif self.config.rotary:
            q = _rotate(q.transpose(1, 2), offset, self.rotary_base).transpose(1, 2)
            k = _rotate(k.transpose(1, 2), offset, self.rotary_base).transpose(1, 2)
        if self.takes_fused_path(q):
            o, memory, key_state, log_scale = self._fused_attention(x, q, k, v, state, use_cache)
        else:
            o, memory, key_state, log_scale = self._composed_attention(x, q, k, v, state, use_cache)
        o = self.norm(o, log_scale) if log_scale is not None else self.norm(o)  # [B, T, H, V]
        if self.output_gate is not None:
            o = o * F.silu(self.output_gate(x)).view(B, T, H, K)
        y = self.o_proj(o.reshape(B, T, H * K))
        new_state = LinearState(memory, key_state, x[:, -1:], offset + T) if use_cache else None
        return y, new_state

    def fused_plan(self) -> FusedPlan | None:
        """The feature map's and the gate's descriptions for the fused op, when both plugins
        declare one (`fused_kernel()`); None when either cannot run inside it."""
        features, gate = self.feature_map.fused_kernel(), self.gate.fused_kernel()
        if isinstance(features, SafeExpKernel) and isinstance(gate, RefiningGateKernel):
            return FusedPlan(features, gate)
        return None

    def takes_fused_path(self, q: Tensor) -> bool:
        """The fused ReGLA op (kernels.triton_regla) replaces feature map + gate + kernel when both
        plugins declare a fused form, on CUDA, with impl "auto", over more than one token (a
        decoding step is a small recurrence), and no probe reading the gates."""
        return (
            kernels.triton_regla is not None
            and q.is_cuda
            and q.shape[1] > 1
            and self.config.impl == "auto"
            and not self.capture_gates
            and self.fused_plan() is not None
        )

    def unshifted_frame(self, query_shift: Tensor | None, key_shift: Tensor | None) -> Tensor | None:
        """The norm's `log_scale` [B, T, H, 1]: the factor exp(−(q shift + key shift)) by which the
        feature map's shifts scale the output, when the norm should see its eps in the unshifted
        frame (the default) and can. Then the shifts (and a non-causal key max with them)
        cancel exactly under the norm, eps included."""
        if self.config.norm_eps_frame != "unshifted" or not self.norm.scales_eps:
            return None
        if query_shift is None and key_shift is None:
            return None
        total = sum(s for s in (query_shift, key_shift) if s is not None)
        return -total

    def _composed_attention(self, x, q, k, v, state, use_cache):
        """Feature map, gate and kernel as separate steps: any combination of plugins."""
        query = self.feature_map(q, "q")
        key = self.feature_map(k, "k", state.key_feature if state is not None else None)
        gate = self.gate(x, state.last_input if state is not None else None)
        if self.capture_gates:
            self.captured = gate
        keys = key.features if gate.input_scale is None else key.features * gate.input_scale
        o, memory = gated_linear_attention(
            query.features,
            keys,
            v,
            _combine_log_decays(gate.log_k, key.log_decay),
            gate.log_v,
            scale=self.feature_map.kernel_scale,
            initial_state=state.memory if state is not None else None,
            output_final_state=use_cache,
            denominator=self.uses_denominator,
            denominator_eps=self.config.denominator_eps,
            impl=self.config.impl,
        )
        return o, memory, key.state, self.unshifted_frame(query.shift, key.shift)

    def _fused_attention(self, x, q, k, v, state, use_cache):
        """The same computation as `_composed_attention`, in one Triton op, for plugins that
        declare a fused form (`fused_plan`)."""
        plan = self.fused_plan()
        if plan is None:
            raise RuntimeError(
                f"the fused path needs a feature map and a gate that declare a fused form; "
                f"{self.config.feature_map!r} / {self.config.gate!r} do not"
            )
        features, gate = plan
        kernel_scale = self.feature_map.kernel_scale
        gate_logits, refine_logits = gate.logits(x, state.last_input if state is not None else None)
        if self.uses_denominator:
            v, _ = with_denominator_column(v)
        o, memory, key_max = kernels.triton_regla(
            q,
            k,
            v,
            gate_logits=gate_logits,
            refine_logits=refine_logits,
            tau=gate.tau,
            log_clamp=gate.log_clamp,
            key_max=features.key_max,
            chunk_size=features.chunk_size,
            # A constant factor on φ(q) inside the kernel is the same factor on the op's scale.
            scale=kernel_scale * features.query_factor,
            initial_state=state.memory if state is not None else None,
            initial_key_max=state.key_feature if state is not None else None,
            output_final_state=use_cache,
        )
        if self.uses_denominator:
            # eps scaled as the composed path scales it: by the op scale there, which leaves a
            # query-side factor out (it multiplies φ(q) instead).
            o = divide_by_denominator(o, self.config.denominator_eps * kernel_scale)
        log_scale = None
        if self.config.norm_eps_frame == "unshifted" and self.norm.scales_eps:
            # The op's shifts, recomputed on the small [B, T, H] maxima (as the feature map forms them).
            previous = state.key_feature if state is not None else None
            key_shift, _ = key_shifts(k.amax(-1), features.key_max, features.chunk_size, previous)
            log_scale = self.unshifted_frame(query_shift(q).unsqueeze(-1), key_shift.unsqueeze(-1))
        return o, memory, key_max.to(k.dtype), log_scale


def _rotate(x: Tensor, offset: int, base: float) -> Tensor:
    """Rotary position embedding (Su et al. 2021) on [B, H, T, K], positions offset.. offset+T."""
    T, K = x.shape[-2], x.shape[-1]
    half = K // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # [T, K/2]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1) if K % 2 else rotated


class SoftmaxAttention(nn.Module):
    """Causal softmax attention through PyTorch SDPA, rotary positions, a KV cache for decoding."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, rotary: bool, rotary_base: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.rotary, self.rotary_base = rotary, rotary_base
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(d_model, 3 * inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)

    def forward(
        self, x: Tensor, state: KVCache | None = None, use_cache: bool = False
    ) -> tuple[Tensor, KVCache | None]:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        offset = state.length if state is not None else 0
        if self.rotary:
            q, k = _rotate(q, offset, self.rotary_base), _rotate(k, offset, self.rotary_base)
        if state is not None:
            k, v = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
        if offset == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Queries sit at the end of the cached sequence: bottom-right aligned causal mask.
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=offset)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        return y, (KVCache(k, v) if use_cache else None)


class MLP(nn.Module):
    def __init__(self, d_model: int, kind: str, ratio: float):
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            # 2/3 of the ratio keeps the parameter count of a GELU MLP with the same ratio.
            hidden = 8 * round(2 * ratio * d_model / 3 / 8)
            self.up = nn.Linear(d_model, 2 * hidden, bias=False)
        else:
            hidden = int(ratio * d_model)
            self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, softmax: bool):
        super().__init__()
        D, H, K = config.d_model, config.n_heads, config.resolved_head_dim
        self.attn_norm = nn.RMSNorm(D)
        self.mlp_norm = nn.RMSNorm(D)
        self.is_softmax = softmax
        self.attn = (
            SoftmaxAttention(D, H, K, config.rotary, config.rotary_base)
            if softmax
            else LinearAttention(D, H, K, config.attention, config.rotary_base)
        )
        self.mlp = MLP(D, config.mlp, config.mlp_ratio)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, state: Any = None, use_cache: bool = False) -> tuple[Tensor, Any]:
        h, new_state = self.attn(self.attn_norm(x), state, use_cache)
        x = x + self.dropout(h)
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x, new_state
