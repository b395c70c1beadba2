"""A pretrained transformers causal LM (GPT-NeoX/Pythia, GPT-2, Llama) with its attention layers
replaced by the harness's linear attention (`harness.layers.LinearAttention`), except a chosen
set kept as softmax attention.

The transformers model keeps running its own forward (embeddings, norms, MLPs, residuals, learned
or rotary positions): only each layer's attention module is swapped for an adapter with the same
call signature. A converted layer is a `LinearAttention` whose q/k/v/o projections are copies of
the pretrained ones (grouped-query k and v repeated to every head) and whose q and k are rotated
by the family's own rotary embedding (partial rotary for Pythia) before the feature map. A kept
layer attends with softmax through the pretrained module's own parameters (`SoftmaxAdapter`), so
that it, too, carries a KV cache through the harness's decoding state.

`ConvertedLM` has the harness model's interface: `forward(idx, cache, use_cache)` returns logits
and one decoding state per layer, so the training loop, `generate`, and the lm-eval model class
take it as they take a `LanguageModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AttentionConfig, layer_indices
from ..data.tokenization import PretrainedTokenizer, pretrained_tokenizer
from ..layers import KVCache, LinearAttention, LinearState
from ..model import LanguageModel
from .families import Family, Projection, Shape, UnsupportedModel, family_named, family_of

Tensor = torch.Tensor


def _heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    B, T, _ = x.shape
    return x.view(B, T, heads, head_dim)


def _repeat_kv_rows(projection: Projection, shape: Shape) -> Projection:
    """Grouped-query k or v rows repeated so that every query head has its own (as transformers'
    repeat_kv repeats each key-value head for its group of query heads, consecutively)."""
    weight, bias = projection
    repeats = shape.heads // shape.kv_heads
    if repeats == 1:
        return projection
    weight = weight.view(shape.kv_heads, shape.head_dim, -1).repeat_interleave(repeats, 0).flatten(0, 1)
    bias = (
        bias.view(shape.kv_heads, shape.head_dim).repeat_interleave(repeats, 0).flatten() if bias is not None else None
    )
    return weight, bias


def _linear_from(projection: Projection) -> nn.Linear:
    weight, bias = projection
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class _Step:
    """What a forward of ConvertedLM hands each adapter besides the hidden states: the layer's
    decoding state in and whether to return one. transformers' forward passes neither, so the
    converted model sets them on each adapter around its call (and clears them after)."""

    def __init__(self) -> None:
        self.state: Any = None
        self.use_cache = False
        self.new_state: Any = None


class LinearAdapter(nn.Module):
    """A converted layer: `attn` is the harness LinearAttention; the call signature is the
    replaced transformers module's (hidden states first, position_embeddings among the kwargs)."""

    def __init__(self, attention: LinearAttention, family: Family):
        super().__init__()
        self.attn = attention
        self.apply_rotary = family.apply_rotary
        self.step = _Step()

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        rotation = None
        if self.apply_rotary is not None and kwargs.get("position_embeddings") is not None:
            cos, sin = kwargs["position_embeddings"]
            # transformers computed cos and sin for this step's positions (the converted model
            # passes position_ids from the decoding offset), so the offset argument is not needed.
            # [B, T, H, K]: the head axis is 2 (transformers' default is 1, for [B, H, T, K]).
            rotation = lambda q, k, offset: self.apply_rotary(q, k, cos, sin, unsqueeze_dim=2)  # noqa: E731
        y, self.step.new_state = self.attn(hidden_states, self.step.state, self.step.use_cache, rotation=rotation)
        return y, None


class SoftmaxAdapter(nn.Module):
    """A layer kept as softmax attention: the pretrained module (`inner`, its parameters
    untouched) attending through SDPA with a KV cache in the harness's decoding state. Dropout
    inside attention is not applied (the recipes this serves continue training without it)."""

    def __init__(self, inner: nn.Module, family: Family, shape: Shape):
        super().__init__()
        self.inner = inner
        self.family, self.shape = family, shape
        self.step = _Step()

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        s = self.shape
        p = self.family.projections(self.inner, s)
        B, T, _ = hidden_states.shape
        q = _heads(F.linear(hidden_states, *p.q), s.heads, s.head_dim).transpose(1, 2)
        k = _heads(F.linear(hidden_states, *p.k), s.kv_heads, s.head_dim).transpose(1, 2)
        v = _heads(F.linear(hidden_states, *p.v), s.kv_heads, s.head_dim).transpose(1, 2)
        if self.family.apply_rotary is not None and kwargs.get("position_embeddings") is not None:
            q, k = self.family.apply_rotary(q, k, *kwargs["position_embeddings"])
        cache: KVCache | None = self.step.state
        offset = cache.length if cache is not None else 0
        if cache is not None:
            k, v = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)
        self.step.new_state = KVCache(k, v) if self.step.use_cache else None
        repeats = s.heads // s.kv_heads
        k, v = k.repeat_interleave(repeats, 1), v.repeat_interleave(repeats, 1)
        if offset == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s.scale)
        else:
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=offset)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.scale)
        return F.linear(o.transpose(1, 2).reshape(B, T, -1), *p.o), None


@dataclass(frozen=True)
class ConvertedConfig:
    """What the lm-eval model class and the reports read from a model's `config`."""

    model_type: str
    n_layers: int
    max_seq_len: int
    vocab_size: int
    softmax_layers: tuple[int, ...]
    attention: AttentionConfig
    tie_embeddings: bool


class ConvertedLM(nn.Module):
    """A converted transformers model (`hf`) behind the harness model's interface."""

    def __init__(self, hf_model: nn.Module, config: ConvertedConfig):
        super().__init__()
        self.hf = hf_model
        self.config = config
        family = family_of(hf_model)
        self.adapters = [getattr(layer, family.attention_attr) for layer in family.layers(hf_model)]

    def forward(
        self, idx: Tensor, cache: list[Any] | None = None, use_cache: bool = False, cu_seqlens: Tensor | None = None
    ) -> tuple[Tensor, list[Any] | None]:
        if cu_seqlens is not None:
            raise ValueError(
                "packed documents (data.packing: documents) are not supported for converted transformers "
                "models: their layers take positions, not document offsets; use data.packing: windows"
            )
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, time] token ids; got shape {tuple(idx.shape)}")
        offset = _cached_length(cache[0]) if cache else 0
        for i, adapter in enumerate(self.adapters):
            adapter.step.state, adapter.step.use_cache = (cache[i] if cache else None), use_cache
        positions = torch.arange(offset, offset + idx.shape[1], device=idx.device)[None]
        try:
            logits = self.hf(input_ids=idx, position_ids=positions, use_cache=False).logits
            new_cache = [adapter.step.new_state for adapter in self.adapters] if use_cache else None
        finally:
            for adapter in self.adapters:
                adapter.step.state = adapter.step.new_state = None
        return logits, new_cache

    # The same loss as the harness model: it only calls forward.
    loss = LanguageModel.loss

    def generate(self, idx: Tensor, max_new_tokens: int, *args: Any, **kwargs: Any) -> Tensor:
        """The harness model's decoding loop over the growing state. Not over static buffers or
        CUDA graphs: the softmax layers kept here are transformers' own, with their own cache."""
        if kwargs.get("cuda_graph") or kwargs.get("static"):
            raise ValueError("converted transformers models decode without static buffers or CUDA graphs")
        kwargs.update(cuda_graph=False, static=False)
        return LanguageModel.generate(self, idx, max_new_tokens, *args, **kwargs)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for module in (self.hf.get_input_embeddings(), self.hf.get_output_embeddings()):
                if module is not None:
                    params.pop(id(module.weight), None)
        return sum(p.numel() for p in params.values())

    def linear_attention_layers(self) -> list[LinearAttention]:
        return [a.attn for a in self.adapters if isinstance(a, LinearAdapter)]


def _cached_length(state: Any) -> int:
    return state.position if isinstance(state, LinearState) else state.length


def _init_new_linear_weights(attention: LinearAttention, std: float) -> None:
    """The parameters the conversion adds (gate projections, output gate, feature-map weights)
    start as the harness initialises them in a model of its own: matrices N(0, std), biases and
    norm weights as their plugin sets them (a gate's bias_init, norm weights 1). The pretrained
    projections are copied over afterwards."""
    for name, module in attention.named_modules():
        if isinstance(module, nn.Linear) and name not in ("q_proj", "k_proj", "v_proj", "o_proj"):
            nn.init.normal_(module.weight, 0.0, std)


def convert_pretrained(
    model: nn.Module, attention: AttentionConfig, softmax_layers: str | tuple | list = "none", seed: int = 0
) -> ConvertedLM:
    """Convert `model` (a transformers causal LM, changed in place) into a ConvertedLM: every layer
    not in `softmax_layers` (a hybrid pattern, as model.softmax_layers) becomes linear attention
    built from `attention`; new parameters are drawn from `seed`.

    New parameters are initialised as in a harness model (see `_init_new_linear_weights`), so that
    a converted run and the same variant from scratch differ only in what was pretrained: gates
    start at their plugin's bias_init (the decay the variant starts with from scratch), the output
    norm at weight 1 (unit RMS per head: no weight reproduces softmax attention's output scale
    exactly, so the pretrained output projection adapts in training), an output gate N(0, std)."""
    family = family_of(model)
    config = model.config
    shape = family.shape(config)
    layers = family.layers(model)
    kept = layer_indices(softmax_layers, len(layers), "softmax_layers (the layers kept as softmax)")
    std = float(getattr(config, "initializer_range", 0.02))
    torch.manual_seed(seed)
    for index, layer in enumerate(layers):
        original = getattr(layer, family.attention_attr)
        if index in kept:
            setattr(layer, family.attention_attr, SoftmaxAdapter(original, family, shape))
            continue
        linear = LinearAttention(shape.d_model, shape.heads, shape.head_dim, attention)
        _init_new_linear_weights(linear, std)
        with torch.no_grad():
            p = family.projections(original, shape)
            linear.q_proj = _linear_from(p.q)
            linear.k_proj = _linear_from(_repeat_kv_rows(p.k, shape))
            linear.v_proj = _linear_from(_repeat_kv_rows(p.v, shape))
            linear.o_proj = _linear_from(p.o)
        setattr(layer, family.attention_attr, LinearAdapter(linear.to(next(original.parameters()).dtype), family))
    converted = ConvertedConfig(
        model_type=family.model_type,
        n_layers=len(layers),
        max_seq_len=int(getattr(config, family.max_positions_attr)),
        vocab_size=int(config.vocab_size),
        softmax_layers=kept,
        attention=attention,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )
    return ConvertedLM(model, converted)


def load_pretrained(source: str, revision: str | None = None) -> tuple[nn.Module, PretrainedTokenizer]:
    """(transformers causal LM in fp32, its tokenizer) from a hub name or a local directory; the
    family is checked before the weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    family_named(AutoConfig.from_pretrained(source, revision=revision).model_type)
    model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=torch.float32)
    return model, pretrained_tokenizer(source, revision)


def random_pretrained(source: str, revision: str | None, min_positions: int, seed: int) -> nn.Module:
    """A transformers causal LM of `source`'s architecture with random weights (fp32), from its
    config alone (no weights are read), its position limit raised to `min_positions` where that
    is more: for timing and memory, which depend on the architecture, not on the weights. With
    rotary positions (GPT-NeoX, Llama) the limit is a number only; GPT-2's learned position table
    grows to it (a lookup: its size does not change the speed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, revision=revision)
    family = family_named(config.model_type)
    positions = family.max_positions_attr
    setattr(config, positions, max(int(getattr(config, positions)), min_positions))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()


__all__ = [
    "ConvertedConfig",
    "ConvertedLM",
    "LinearAdapter",
    "PretrainedTokenizer",
    "SoftmaxAdapter",
    "UnsupportedModel",
    "convert_pretrained",
    "load_pretrained",
    "random_pretrained",
]
