"""Where each supported transformers family keeps its attention: the decoder layers, the attention
module of a layer, its q/k/v/o projections as plain (weight, bias) pairs in nn.Linear's layout,
and its rotary embedding. A family is a few lines here; nothing else in the conversion knows one.

The projections are computed from the module's own parameters with differentiable tensor ops
(slices, views, transposes): a layer kept as softmax attention trains the pretrained parameters
themselves, and a converted layer copies them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor
#: (weight [out, in], bias [out] or None), as nn.Linear holds them
Projection = tuple[Tensor, Tensor | None]


class UnsupportedModel(ValueError):
    """A pretrained model the conversion cannot take; the message names what is supported."""


@dataclass(frozen=True)
class Projections:
    q: Projection
    k: Projection  # [kv_heads * head_dim, d_model]: fewer heads than q under grouped-query attention
    v: Projection
    o: Projection


@dataclass(frozen=True)
class Shape:
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    #: the softmax scale the pretrained model attends with
    scale: float


@dataclass(frozen=True)
class Family:
    model_type: str
    layers: Callable[[nn.Module], nn.ModuleList]
    attention_attr: str
    shape: Callable[[Any], Shape]
    projections: Callable[[nn.Module, Shape], Projections]
    #: the transformers function that rotates (q, k) by (cos, sin); None: no rotary (GPT-2)
    apply_rotary: Callable | None
    #: the max context: the config attribute that holds it
    max_positions_attr: str


def _neox_shape(config: Any) -> Shape:
    head_dim = config.hidden_size // config.num_attention_heads
    return Shape(config.hidden_size, config.num_attention_heads, config.num_attention_heads, head_dim, head_dim**-0.5)


def _neox_projections(attention: nn.Module, shape: Shape) -> Projections:
    # NeoX fuses q, k and v per head: the output rows are laid out [head, (q | k | v), head_dim].
    H, K, D = shape.heads, shape.head_dim, shape.d_model
    weight = attention.query_key_value.weight.view(H, 3, K, D)
    bias = attention.query_key_value.bias
    bias = bias.view(H, 3, K) if bias is not None else None
    q, k, v = (
        (weight[:, j].reshape(H * K, D), bias[:, j].reshape(H * K) if bias is not None else None) for j in range(3)
    )
    return Projections(q, k, v, (attention.dense.weight, attention.dense.bias))


def _gpt2_shape(config: Any) -> Shape:
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise UnsupportedModel(
            "GPT-2 models with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not supported"
        )
    head_dim = config.n_embd // config.n_head
    scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
    return Shape(config.n_embd, config.n_head, config.n_head, head_dim, scale)


def _gpt2_projections(attention: nn.Module, shape: Shape) -> Projections:
    # GPT-2's Conv1D holds its weight as [in, out] (y = x W + b): transposed to nn.Linear's layout.
    D = shape.d_model
    weight, bias = attention.c_attn.weight, attention.c_attn.bias
    q, k, v = ((weight[:, j * D : (j + 1) * D].t(), bias[j * D : (j + 1) * D]) for j in range(3))
    return Projections(q, k, v, (attention.c_proj.weight.t(), attention.c_proj.bias))


def _llama_shape(config: Any) -> Shape:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(config.hidden_size, heads, kv_heads, head_dim, head_dim**-0.5)


def _llama_projections(attention: nn.Module, shape: Shape) -> Projections:
    pair = lambda linear: (linear.weight, linear.bias)  # noqa: E731
    return Projections(pair(attention.q_proj), pair(attention.k_proj), pair(attention.v_proj), pair(attention.o_proj))


def _rotary_of(module_name: str) -> Callable:
    import importlib

    return importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}").apply_rotary_pos_emb


FAMILIES: dict[str, Callable[[], Family]] = {
    "gpt_neox": lambda: Family(
        "gpt_neox",
        lambda m: m.gpt_neox.layers,
        "attention",
        _neox_shape,
        _neox_projections,
        _rotary_of("gpt_neox"),
        "max_position_embeddings",
    ),
    "gpt2": lambda: Family(
        "gpt2", lambda m: m.transformer.h, "attn", _gpt2_shape, _gpt2_projections, None, "n_positions"
    ),
    "llama": lambda: Family(
        "llama",
        lambda m: m.model.layers,
        "self_attn",
        _llama_shape,
        _llama_projections,
        _rotary_of("llama"),
        "max_position_embeddings",
    ),
}


def family_of(model: nn.Module) -> Family:
    return family_named(getattr(getattr(model, "config", None), "model_type", None))


def family_named(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model family {model_type!r} cannot be converted; supported: {', '.join(sorted(FAMILIES))} "
            "(GPT-NeoX/Pythia, GPT-2, Llama), and the harness's own checkpoints"
        )
    return FAMILIES[model_type]()
