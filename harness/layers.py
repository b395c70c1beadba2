"""Attention layers and blocks. Each layer is an ordinary nn.Module taking x [B, T, D], so it can
be dropped into someone else's model (post-linearization), and returns its decoding state."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import gated_linear_attention
from kernels.dispatch import divide_by_denominator, with_denominator_column
from kernels.fusion import (
    IdentityKernel,
    RefiningGateKernel,
    RMSNormKernel,
    SafeExpKernel,
    SigmoidGateKernel,
)
from kernels.value_gate import PATH_COUNTS as VALUE_GATE_PATH_COUNTS
from kernels.varlen import sequence_bounds
from variants import FEATURE_MAPS, GATES, NORMS, GateOutput

from .config import AttentionConfig, ConfigError, ModelConfig
from .short_conv import ShortConvolution

Tensor = torch.Tensor


@dataclass
class LinearState:
    """What a linear-attention layer carries between decoding steps."""

    memory: Tensor  # [B, H, F, V] (V + 1 with the denominator)
    key_feature: Any  # the feature map's key state (e.g. safe_exp's running max)
    last_input: Tensor  # [B, 1, D], for gates fed with the previous token
    #: static decoding buffers (CUDA graphs): the fused decoding step updates memory and key
    #: feature in place instead of returning new tensors
    in_place: bool = False
    #: tokens seen so far: the rotary offset of the next step (a 0-dim tensor shared with the
    #: decoder when decoding over static buffers, which advances it in place)
    position: int | Tensor = 0
    #: the last W − 1 q, k, v projections [B, W − 1, 3·H·K] before the short convolution, where
    #: the layer has one (`config.short_conv` = W); None without
    conv_inputs: Tensor | None = None


class FusedPlan(NamedTuple):
    """What the fused op computes in place of the feature map and the gate."""

    features: SafeExpKernel
    gate: RefiningGateKernel | SigmoidGateKernel


class DecodePlan(NamedTuple):
    """What the fused decoding step computes in place of feature map, gate, recurrence and norm."""

    features: SafeExpKernel | IdentityKernel
    gate: RefiningGateKernel | SigmoidGateKernel
    norm: RMSNormKernel


@dataclass
class KVCache:
    keys: Tensor  # [B, H, T_cached, K]
    values: Tensor  # [B, H, T_cached, K]
    #: the last W − 1 qkv projections [B, W − 1, 3·H·K] before the layer's short convolution
    #: (`model.softmax_short_conv` = W); None without one
    conv_inputs: Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[2]


def _joined(parts: list[Tensor | None]) -> Tensor | None:
    """Per-document pieces [1, L_i, ...] joined along time; None when the pieces are None."""
    return None if parts[0] is None else torch.cat(parts, dim=1)


@dataclass
class StaticKVCache:
    """A softmax layer's KV cache in preallocated buffers, for decoding one token at a time with
    fixed shapes (CUDA graphs): the new key and value are written at `position`, and the query
    attends over the first `window` cached positions, masked beyond `position`. The decoder
    advances `position` (shared by every layer) after each step and picks `window`."""

    keys: Tensor  # [B, H, capacity, K]
    values: Tensor  # [B, H, capacity, K]
    position: Tensor  # [] int64 on the cache's device: the index the next token is written at
    window: int  # cached positions the next step attends over (<= capacity)
    #: the short convolution's last inputs (KVCache.conv_inputs), updated in place each step
    conv_inputs: Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


def compact(t: Any) -> Any:
    """A tensor that owns its storage: a copy of a view into a larger one (the last token of the
    layer's input, the last key max of a [B, T, H] tensor), else the tensor itself. A decoding
    state that kept such views would keep every layer's whole prefill input alive, so a linear
    model's state would grow with the prompt (it did: 384 MiB per layer at batch 16, 8192 tokens)."""
    if torch.is_tensor(t) and t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone()
    return t


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
        #: over q, k and v together (one module, channels in that order)
        self.short_conv = ShortConvolution(3 * inner, config.short_conv) if config.short_conv else None
        self.uses_denominator = config.denominator or self.norm.uses_denominator
        if self.uses_denominator and not self.feature_map.positive_kernel:
            positive = [n for n in FEATURE_MAPS.names() if FEATURE_MAPS.get(n).positive_kernel]
            raise ConfigError(
                f"the denominator normalisation divides by phi(q)·z and needs a feature map whose kernel "
                f"is positive; {config.feature_map!r} can give negative or zero values. Use one of "
                f"{', '.join(positive)}, or a norm without the denominator."
            )
        # Under a per-head norm with its eps in the unshifted frame the output does not depend on the
        # feature map's shifts at all (`unshifted_frame`): no gradient needs to flow through them.
        self.feature_map.detach_shifts = self.unshifted_frame_cancels_shifts()
        #: set by gate-saturation probes: the last GateOutput is kept when True
        self.capture_gates = False
        #: off: incremental steps take the composed path even where the fused step could run
        #: (benchmarks compare the two)
        self.fused_decode_step = True
        #: on: the fused op applies the norm and the output gate in its epilogue where the norm
        #: declares that form (`config.fused_epilogue`; benchmarks flip it on a built layer)
        self.fused_epilogue = config.fused_epilogue
        self.captured: GateOutput | None = None
        #: the path the last forward took, one of ATTENTION_PATHS (None before any): runs record it
        #: (`attention_path_counts`), since the paths compute in different precisions (the fused op
        #: in the input dtype with fp32 gates; the composed path in fp32 for exponential features)
        self.attention_path: str | None = None

    def forward(
        self,
        x: Tensor,
        state: LinearState | None = None,
        use_cache: bool = False,
        cu_seqlens: Tensor | None = None,
        rotation: Rotation | None = None,
    ) -> tuple[Tensor, LinearState | None]:
        """x [B, T, D] -> y [B, T, D] and, with `use_cache`, the decoding state.

        `cu_seqlens` ([N + 1] int offsets over the B·T tokens read row after row, every row start
        among them; `LanguageModel.forward`) packs documents into the rows: attention restarts at
        each boundary. Training only: no state in or out.
        `rotation`: rotates q and k in place of the layer's own rotary (`config.rotary`)."""
        if cu_seqlens is not None:
            if rotation is not None or self.config.rotary:
                raise ValueError(
                    "packed documents (cu_seqlens) are not supported in linear-attention layers with rotary "
                    "positions (converted models); use data.packing: windows"
                )
            return self._packed_forward(x, state, use_cache, cu_seqlens), None
        B, T, _ = x.shape
        q, k, v, conv_inputs = self._queries_keys_values(x, state.conv_inputs if state is not None else None)
        offset = state.position if state is not None else 0
        if rotation is not None:
            q, k = rotation(q, k, offset)
        elif self.config.rotary:
            q = _rotate(q.transpose(1, 2), offset, self.rotary_base).transpose(1, 2)
            k = _rotate(k.transpose(1, 2), offset, self.rotary_base).transpose(1, 2)
        if self.takes_decode_step(q, state):
            self.attention_path = "decode_step"
            o, memory, key_state = self._decode_step(x, q, k, v, state)  # normalised
            y = self._output(x, o)
        elif self.takes_fused_path(q):
            self.attention_path = "fused_epilogue" if self.epilogue_norm() is not None else "fused"
            o, memory, key_state, log_scale = self._fused_attention(x, q, k, v, state, use_cache)
            y = self._finish(x, o, log_scale, normalised=self.epilogue_norm() is not None)
        else:
            self.attention_path = "composed"
            o, memory, key_state, log_scale = self._composed_attention(x, q, k, v, state, use_cache)
            y = self._finish(x, o, log_scale)
        new_state = None
        if use_cache:
            in_place = state is not None and state.in_place
            # Static buffers keep their shared position tensor (the decoder advances it), and copy
            # what the step returns into themselves (`copy_state`): only a state handed back to the
            # caller needs tensors of its own.
            own = (lambda t: t) if in_place else compact
            position = state.position if in_place else offset + T
            new_state = LinearState(
                memory,
                own(key_state),
                own(x[:, -1:]),
                in_place=in_place,
                position=position,
                conv_inputs=own(conv_inputs),
            )
        return y, new_state

    def _queries_keys_values(
        self, x: Tensor, conv_history: Tensor | None = None, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """q, k, v [B, T, H, K] of x [B, T, D], through the short convolution where the layer has
        one (continuing from `conv_history`; `positions`: each token's position in its packed
        document), and the convolution's last inputs for the next call (None without one)."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        projections = (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        conv_inputs = None
        if self.short_conv is not None:
            mixed, conv_inputs = self.short_conv(torch.cat(projections, dim=-1), conv_history, positions)
            projections = [part.contiguous() for part in mixed.chunk(3, dim=-1)]
        q, k, v = (p.reshape(B, T, H, K) for p in projections)
        return q, k, v, conv_inputs

    def _norm(self, o: Tensor, log_scale: Tensor | None) -> Tensor:
        """The per-head output norm of o [B, T, H, V] (`log_scale`: the eps frame's shift, if any)."""
        return self.norm(o, log_scale) if log_scale is not None else self.norm(o)

    def _finish(self, x: Tensor, o: Tensor, log_scale: Tensor | None, normalised: bool = False) -> Tensor:
        """The norm, output gate and projection of the attention output o [B, T, H, V]; with
        `normalised`, the fused op applied norm and gate in its epilogue (`epilogue_norm`)."""
        if normalised:
            return self._project(o)
        return self._output(x, self._norm(o, log_scale))

    def _output(self, x: Tensor, o: Tensor) -> Tensor:
        """The output gate and projection of the normalised attention output o [B, T, H, V]."""
        B, T, _ = x.shape
        if self.output_gate is not None:
            o = o * F.silu(self.output_gate(x)).view(B, T, self.num_heads, self.head_dim)
        return self._project(o)

    def _project(self, o: Tensor) -> Tensor:
        """The output projection of o [B, T, H, V]. o may be fp32 where the composed path kept it so
        (`_op_precision`): outside autocast it takes the projection's dtype (under autocast the
        projection casts for itself, and a cast here would only add a pass on the fused path)."""
        if not torch.is_autocast_enabled(o.device.type):
            o = o.to(self.o_proj.weight.dtype)
        B, T = o.shape[:2]
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def _packed_forward(self, x: Tensor, state, use_cache: bool, cu_seqlens: Tensor) -> Tensor:
        """The layer over documents packed into x's rows: the rows are read as one sequence of B·T
        tokens, the attention op takes `cu_seqlens`, and what a plugin computes across tokens (the
        feature map's key max, a gate's previous-token input) is computed one document at a time."""
        if state is not None or use_cache:
            raise ValueError("cu_seqlens (packed documents) is for training: no decoding state in or out")
        B, T, D = x.shape
        bounds = check_row_starts(cu_seqlens, B, T)
        flat = x.reshape(1, B * T, D)
        positions = None
        if self.short_conv is not None:
            positions = packed_positions(cu_seqlens, B, T, x.device)[1].reshape(1, B * T)
        q, k, v, _ = self._queries_keys_values(flat, positions=positions)
        if self.takes_fused_path(q):
            self.attention_path = "fused_epilogue" if self.epilogue_norm() is not None else "fused"
            o, _, _, log_scale = self._fused_attention(flat, q, k, v, None, False, cu_seqlens, bounds)
            return self._finish(flat, o, log_scale, normalised=self.epilogue_norm() is not None).view(B, T, D)
        self.attention_path = "composed"
        o, log_scale = self._composed_packed(flat, q, k, v, cu_seqlens, bounds)
        return self._finish(flat, o, log_scale).view(B, T, D)

    def gate_reads_one_token(self) -> bool:
        """Whether the gate of token t reads x_t alone (then one call covers packed documents). Only
        gates that say so (`input: x`) are trusted; any other may look back across a boundary, which
        matters where its output scales the keys (`input_scale`), not only the decay."""
        return getattr(self.gate, "input", None) == "x"

    def _composed_packed(self, x, q, k, v, cu_seqlens, bounds):
        """`_composed_attention` over packed documents x [1, T, D] (no state): feature maps and gate
        per document, one `gated_linear_attention` call with `cu_seqlens`."""
        spans = list(zip(bounds, bounds[1:]))
        q, k, v = self._op_precision(q, k, v)
        queries = [self.feature_map(q[:, start:end], "q") for start, end in spans]
        keys = [self.feature_map(k[:, start:end], "k") for start, end in spans]
        if self.gate_reads_one_token():
            gate = self.gate(x)
        else:
            gates = [self.gate(x[:, start:end]) for start, end in spans]
            gate = GateOutput(
                **{name: _joined([getattr(g, name) for g in gates]) for name in ("log_k", "log_v", "input_scale")},
                activations={name: _joined([g.activations[name] for g in gates]) for name in gates[0].activations},
                preactivations={
                    name: _joined([g.preactivations[name] for g in gates]) for name in gates[0].preactivations
                },
            )
        if self.capture_gates:
            self.captured = gate
        key_features = _joined([key.features for key in keys])
        if gate.input_scale is not None:
            key_features = key_features * gate.input_scale
        o, _ = gated_linear_attention(
            _joined([query.features for query in queries]),
            key_features,
            v,
            _combine_log_decays(gate.log_k, _joined([key.log_decay for key in keys])),
            gate.log_v,
            scale=self.feature_map.kernel_scale,
            denominator=self.uses_denominator,
            denominator_eps=self.config.denominator_eps,
            impl=self.config.impl,
            cu_seqlens=cu_seqlens,
        )
        log_scale = self.unshifted_frame(
            _joined([query.shift for query in queries]), _joined([key.shift for key in keys])
        )
        return o, log_scale

    def fused_plan(self) -> FusedPlan | None:
        """The feature map's and the gate's descriptions for the fused op, when both plugins
        declare one (`fused_kernel()`); None when either cannot run inside it."""
        features, gate = self.feature_map.fused_kernel(), self.gate.fused_kernel()
        if isinstance(features, SafeExpKernel) and isinstance(gate, (RefiningGateKernel, SigmoidGateKernel)):
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

    def epilogue_norm(self) -> RMSNormKernel | None:
        """The norm's description when the fused op applies it (and the output gate) in its
        epilogue: the `fused_epilogue` switch on, a norm that declares a form the epilogue computes
        (`fused_kernel()`), and no denominator (which divides o before the norm). None: the layer
        normalises and gates the op's output itself."""
        norm = self.norm.fused_kernel()
        if self.fused_epilogue and isinstance(norm, RMSNormKernel) and not self.uses_denominator:
            return norm
        return None

    def decode_plan(self) -> DecodePlan | None:
        """The feature map's, gate's and norm's descriptions for the fused decoding step, when all
        three declare one it computes (`fused_kernel()`) and no denominator is asked for."""
        features, gate, norm = self.feature_map.fused_kernel(), self.gate.fused_kernel(), self.norm.fused_kernel()
        if (
            isinstance(features, (SafeExpKernel, IdentityKernel))
            and isinstance(gate, (RefiningGateKernel, SigmoidGateKernel))
            and isinstance(norm, RMSNormKernel)
            and not self.uses_denominator
        ):
            return DecodePlan(features, gate, norm)
        return None

    def fuses_decode_steps(self, device: torch.device) -> bool:
        """Whether one-token steps on `device` go through the fused decoding step: on CUDA, with
        impl "auto", the `fused_decode_step` switch on, no probe reading the gates, and plugins
        that all declare a form it computes."""
        return (
            kernels.triton_decode_step is not None
            and device.type == "cuda"
            and self.config.impl == "auto"
            and self.fused_decode_step
            and not self.capture_gates
            and self.decode_plan() is not None
        )

    def takes_decode_step(self, q: Tensor, state: LinearState | None) -> bool:
        """The fused decoding step (kernels.triton_decode) replaces feature map, gate, recurrence
        and norm for one new token after earlier ones (`fuses_decode_steps`), outside autograd:
        the kernel has no backward, so a step whose gradients are wanted takes the composed path."""
        return (
            q.shape[1] == 1 and state is not None and not torch.is_grad_enabled() and self.fuses_decode_steps(q.device)
        )

    def _decode_step(self, x, q, k, v, state):
        """One token through `kernels.triton_decode_step`: the normalised output [B, 1, H, V], the
        new memory and key state (the given ones, updated, when the state is `in_place`)."""
        plan = self.decode_plan()
        if plan is None:
            raise RuntimeError(
                f"the fused decoding step needs a feature map, a gate and a norm that declare a form it "
                f"computes; {self.config.feature_map!r} / {self.config.gate!r} / {self.config.norm!r} do not"
            )
        features, gate, norm = plan
        safe_exp = isinstance(features, SafeExpKernel)
        logits = gate.logits(x, state.last_input)
        gate_tensors = (
            dict(gate_logits=logits[0], refine_logits=logits[1])
            if isinstance(gate, RefiningGateKernel)
            else dict(gate_logits=logits)
        )
        if isinstance(gate, SigmoidGateKernel) and gate.scales_keys:
            v = v * _key_scale(gate, logits).to(v.dtype)  # gated RFA's 1 − g on the keys, as a factor on v
        memory = state.memory
        if memory.dtype != torch.float32 or not memory.is_contiguous():
            memory = memory.float().contiguous()  # the prefill's state in another dtype: converted once
        key_max = state.key_feature
        if safe_exp and key_max.dtype != torch.float32:
            key_max = key_max.float()
        step = kernels.triton_decode_step(
            q,
            k,
            v,
            memory,
            features="safe_exp" if safe_exp else "identity",
            key_max=key_max if safe_exp else None,
            query_factor=features.query_factor if safe_exp else 1.0,
            gate="refined" if isinstance(gate, RefiningGateKernel) else "sigmoid",
            **gate_tensors,
            tau=gate.tau,
            log_clamp=gate.log_clamp,
            scale=self.feature_map.kernel_scale,
            norm_eps=norm.eps,
            norm_weight=norm.weight,
            eps_unshifted=self.eps_in_unshifted_frame(),
            in_place=state.in_place and memory is state.memory and (not safe_exp or key_max is state.key_feature),
        )
        key_state = step.key_max if safe_exp else state.key_feature
        return step.output, step.state, key_state

    def eps_in_unshifted_frame(self) -> bool:
        """Whether the output norm puts its eps in the frame without the feature map's shifts: the
        layer asks for it (`norm_eps_frame: unshifted`, the default) and the norm can (`scales_eps`)."""
        return self.config.norm_eps_frame == "unshifted" and self.norm.scales_eps

    def unshifted_frame_cancels_shifts(self) -> bool:
        """Whether the output norm cancels the feature map's shifts exactly, eps included: a
        per-head norm with its eps in the unshifted frame, and no denominator (whose eps does not
        follow the shifts)."""
        return self.eps_in_unshifted_frame() and not self.uses_denominator

    def unshifted_frame(self, query_shift: Tensor | None, key_shift: Tensor | None) -> Tensor | None:
        """The norm's `log_scale` [B, T, H, 1]: the factor exp(−(q shift + key shift)) by which the
        feature map's shifts scale the output, when the norm should see its eps in the unshifted
        frame (the default) and can. Then the shifts (and a non-causal key max with them)
        cancel exactly under the norm, eps included."""
        if not self.eps_in_unshifted_frame():
            return None
        if query_shift is None and key_shift is None:
            return None
        total = sum(s for s in (query_shift, key_shift) if s is not None)
        return -total

    def _composed_attention(self, x, q, k, v, state, use_cache):
        """Feature map, gate and kernel as separate steps: any combination of plugins."""
        q, k, v = self._op_precision(q, k, v)
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

    def _op_precision(self, queries: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v for the composed path's feature map and op, in fp32 at least where the feature
        map asks for it (`needs_fp32_op`); as they are otherwise. The op's output then stays fp32
        through the norm too: rounding it, or the gradient the norm passes back, to bf16 left
        q_proj's gradient wrong by ~70% relative (the norm's gradient is nearly orthogonal to o,
        and the part that matters is small)."""
        if not self.feature_map.needs_fp32_op:
            return queries, keys, values
        dtype = torch.promote_types(queries.dtype, torch.float32)
        return queries.to(dtype), keys.to(dtype), values.to(dtype)

    def _epilogue_arguments(self, x: Tensor) -> dict:
        """The fused op's norm and output-gate arguments when it takes the epilogue (`epilogue_norm`);
        empty otherwise. The eps frame is the one `unshifted_frame` gives the composed path."""
        norm = self.epilogue_norm()
        if norm is None:
            return {}
        B, T, _ = x.shape
        gate = None
        if self.output_gate is not None:
            gate = self.output_gate(x).view(B, T, self.num_heads, self.head_dim)
        return dict(
            norm_eps=norm.eps,
            norm_weight=norm.weight,
            eps_unshifted=self.eps_in_unshifted_frame(),
            output_gate=gate,
        )

    def _fused_attention(self, x, q, k, v, state, use_cache, cu_seqlens=None, bounds=None):
        """The same computation as `_composed_attention`, in one Triton op, for plugins that
        declare a fused form (`fused_plan`); with `cu_seqlens` (and `bounds`, its offsets as a list),
        over packed documents (batch 1, no state). With `epilogue_norm` the output is normalised and
        gated already (log_scale then None)."""
        plan = self.fused_plan()
        if plan is None:
            raise RuntimeError(
                f"the fused path needs a feature map and a gate that declare a fused form; "
                f"{self.config.feature_map!r} / {self.config.gate!r} do not"
            )
        features, gate = plan
        kernel_scale = self.feature_map.kernel_scale
        # Over packed documents one call serves even a gate fed with the previous token: at a
        # document's first token that input reads the document before, but the gate there decays
        # a state that is zero (it restarts), so its value changes nothing, output or gradient.
        # A gate whose logits also scale the keys (`scales_keys`) is another matter: that factor
        # reaches the output at the first token, so such a gate reads each document on its own.
        spans = None
        if bounds is not None and not self.gate_reads_one_token():
            spans = list(zip(bounds, bounds[1:]))
        gate_arguments, key_scale = _fused_gate_arguments(
            gate, x, state.last_input if state is not None else None, spans
        )
        if self.uses_denominator:
            v, _ = with_denominator_column(v)
        if key_scale is not None:
            v = v * key_scale.to(v.dtype)  # after the ones column: the denominator sums the scaled keys too
        epilogue = self._epilogue_arguments(x)
        # A norm after the op with its eps in the unshifted frame needs the op's shifts: the op
        # returns them (differentiably) instead of the layer forming them a second time.
        wants_log_scale = not epilogue and self.eps_in_unshifted_frame()
        result = kernels.triton_regla(
            q,
            k,
            v,
            **gate_arguments,
            key_max=features.key_max,
            chunk_size=features.chunk_size,
            # A constant factor on φ(q) inside the kernel is the same factor on the op's scale.
            scale=kernel_scale * features.query_factor,
            initial_state=state.memory if state is not None else None,
            initial_key_max=state.key_feature if state is not None else None,
            output_final_state=use_cache,
            cu_seqlens=cu_seqlens,
            return_log_scale=wants_log_scale,
            **epilogue,
        )
        o, memory, key_max = result.output, result.final_state, result.key_max.to(k.dtype)
        if epilogue:
            return o, memory, key_max, None
        if self.uses_denominator:
            # eps scaled as the composed path scales it: by the op scale there, which leaves a
            # query-side factor out (it multiplies φ(q) instead).
            o = divide_by_denominator(o, self.config.denominator_eps * kernel_scale)
        log_scale = result.log_scale.unsqueeze(-1) if wants_log_scale else None
        return o, memory, key_max, log_scale


#: the computations a linear-attention layer's forward can take: the fused ReGLA op (with the norm
#: and output gate in its epilogue, or not), feature map + gate + op as separate torch passes, or
#: the fused single-token decoding step
ATTENTION_PATHS = ("fused", "fused_epilogue", "composed", "decode_step")


def value_gate_path_counts() -> Counter[str]:
    """How many value-gated attention calls (Fast Decay's gate) took each path so far in this
    process, the kernels or a fallback (`kernels.value_gate.PATH_COUNTS`): a snapshot, to subtract
    from a later one."""
    return Counter(VALUE_GATE_PATH_COUNTS)


def attention_path_counts(model: nn.Module) -> dict[str, int]:
    """How many of `model`'s linear-attention layers took each path (ATTENTION_PATHS) in their
    last forward; empty for a model without linear attention."""
    layers = [module for module in model.modules() if isinstance(module, LinearAttention)]
    if not layers:
        return {}
    counts = dict.fromkeys(ATTENTION_PATHS, 0)
    for layer in layers:
        if layer.attention_path is not None:
            counts[layer.attention_path] += 1
    return counts


def _fused_gate_arguments(
    gate: RefiningGateKernel | SigmoidGateKernel,
    x: Tensor,
    x_prev: Tensor | None,
    spans: list[tuple[int, int]] | None = None,
) -> tuple[dict, Tensor | None]:
    """The fused op's gate arguments: the refining gate's two logits (its formula runs inside the
    gate-scan kernel), or a sigmoid gate's log decay logσ(a)/τ, clamped, as the op's given log gate.
    The latter is one elementwise pass in fp32 (the composed gate computes it in the logits' dtype,
    bf16 under autocast); its backward is torch's. Second: the factor σ(−a) [B, T, H, 1] on the
    keys of a gate that `scales_keys` (applied to v by the caller), else None. `spans`: the packed
    documents' (start, end), for a gate that scales the keys and reads beyond its own token: its
    logits are then taken one document at a time."""
    if isinstance(gate, RefiningGateKernel):
        gate_logits, refine_logits = gate.logits(x, x_prev)
        return dict(gate_logits=gate_logits, refine_logits=refine_logits, tau=gate.tau, log_clamp=gate.log_clamp), None
    if gate.scales_keys and spans is not None:
        logits = torch.cat([gate.logits(x[:, start:end], None) for start, end in spans], dim=1)
    else:
        logits = gate.logits(x, x_prev)
    log_gate = F.logsigmoid(logits.float()) / gate.tau
    if gate.log_clamp is not None:
        log_gate = log_gate.clamp_min(gate.log_clamp)
    return dict(log_gate=log_gate), (_key_scale(gate, logits) if gate.scales_keys else None)


def _key_scale(gate: SigmoidGateKernel, logits: Tensor) -> Tensor:
    """Gated RFA's factor 1 − σ(a) = σ(−a) on the keys, per head: a factor on v is the same only
    where it is one number per token and head."""
    if logits.shape[-1] != 1:
        raise ValueError(
            f"a sigmoid gate that scales the keys (SigmoidGateKernel.scales_keys) needs one logit per head, "
            f"[B, T, H, 1]; got {tuple(logits.shape)}"
        )
    return torch.sigmoid(-logits)


def _rotate(x: Tensor, offset: int | Tensor, base: float, positions: Tensor | None = None) -> Tensor:
    """Rotary position embedding (Su et al. 2021) on [B, H, T, K], positions offset.. offset+T
    (`offset` an int, or a 0-dim tensor on x's device for decoding with fixed shapes), or the given
    `positions` [B, T] (packed documents: each counts from 0)."""
    T, K = x.shape[-2], x.shape[-1]
    half = K // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    if positions is None:
        positions = offset + torch.arange(T, device=x.device)
    else:
        positions = positions[:, None]  # [B, 1, T]: one set per row, shared by the heads
    angles = positions.to(torch.float32)[..., None] * inv_freq
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # [T, K/2] or [B, 1, T, K/2]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1) if K % 2 else rotated


def check_row_starts(cu_seqlens: Tensor, B: int, T: int) -> list[int]:
    """The offsets of documents packed into B rows of T tokens, checked (`kernels.varlen`), every
    row start among them."""
    bounds = sequence_bounds(cu_seqlens, 1, B * T)
    starts = set(bounds)
    if any(row * T not in starts for row in range(B)):
        raise ValueError(
            f"cu_seqlens must hold every row start (the multiples of T = {T}): a document cannot span two rows"
        )
    return bounds


def packed_positions(cu_seqlens: Tensor, B: int, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The document index and the position inside its document of every token, [B, T] each, for
    documents packed into B rows of T tokens by `cu_seqlens` (offsets over the B·T tokens row after
    row; every row start must be among them, so that no document spans two rows), on `device`."""
    check_row_starts(cu_seqlens, B, T)
    starts = cu_seqlens[:-1].to(device, torch.int64)
    token = torch.arange(B * T, device=device)
    document = torch.searchsorted(starts, token, right=True) - 1
    return document.view(B, T), (token - starts[document]).view(B, T)


class SoftmaxAttention(nn.Module):
    """Causal softmax attention through PyTorch SDPA, rotary positions, a KV cache for decoding;
    with `short_conv` (a width) a short causal convolution over q, k and v first, as the linear
    layers can have (harness.short_conv)."""

    def __init__(
        self, d_model: int, num_heads: int, head_dim: int, rotary: bool, rotary_base: float, short_conv: int = 0
    ):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.rotary, self.rotary_base = rotary, rotary_base
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(d_model, 3 * inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        self.short_conv = ShortConvolution(3 * inner, short_conv) if short_conv else None

    def forward(
        self,
        x: Tensor,
        state: KVCache | StaticKVCache | None = None,
        use_cache: bool = False,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, KVCache | StaticKVCache | None]:
        """`cu_seqlens`: packed documents as for `LinearAttention.forward` (training only): a
        block-diagonal causal mask per row, and rotary positions counted from each document's start."""
        B, T, _ = x.shape
        document = positions = None  # each token's document and its position in it, when packed
        if cu_seqlens is not None:
            if state is not None or use_cache:
                raise ValueError("cu_seqlens (packed documents) is for training: no KV cache in or out")
            document, positions = packed_positions(cu_seqlens, B, T, x.device)
        qkv, conv_inputs = self.qkv_proj(x), None
        if self.short_conv is not None:
            history = state.conv_inputs if state is not None else None
            qkv, conv_inputs = self.short_conv(qkv, history, positions)
            if isinstance(state, StaticKVCache):
                state.conv_inputs.copy_(conv_inputs)  # static buffers: updated in place (CUDA graphs)
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if isinstance(state, StaticKVCache):
            return self._static_step(q, k, v, state), state
        if cu_seqlens is not None:
            if self.rotary:
                q, k = (_rotate(t, 0, self.rotary_base, positions) for t in (q, k))
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = causal & (document[:, :, None] == document[:, None, :])  # [B, T, T]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
            return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), None
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
        return y, (KVCache(k, v, compact(conv_inputs)) if use_cache else None)

    def _static_step(self, q: Tensor, k: Tensor, v: Tensor, cache: StaticKVCache) -> Tensor:
        """One token against a static cache: no shape depends on how many tokens came before."""
        B, _, T, _ = q.shape
        if T != 1:
            raise ValueError(f"a static KV cache takes one token per step; got {T}")
        if self.rotary:
            q, k = _rotate(q, cache.position, self.rotary_base), _rotate(k, cache.position, self.rotary_base)
        index = cache.position.view(1)
        cache.keys.index_copy_(2, index, k)
        cache.values.index_copy_(2, index, v)
        visible = (torch.arange(cache.window, device=q.device) <= cache.position).unsqueeze(0)  # [1, window]
        o = F.scaled_dot_product_attention(
            q, cache.keys[:, :, : cache.window], cache.values[:, :, : cache.window], attn_mask=visible
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


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
            SoftmaxAttention(D, H, K, config.rotary, config.rotary_base, config.softmax_short_conv)
            if softmax
            else LinearAttention(D, H, K, config.attention, config.rotary_base)
        )
        self.mlp = MLP(D, config.mlp, config.mlp_ratio)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, state: Any = None, use_cache: bool = False, cu_seqlens: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        """`cu_seqlens`: documents packed into the rows (see `LinearAttention.forward`), or None."""
        h, new_state = self.attn(self.attn_norm(x), state, use_cache, cu_seqlens)
        x = x + self.dropout(h)
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x, new_state
