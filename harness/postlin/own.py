"""Post-linearization of the harness's own models: a trained `LanguageModel` (softmax, or a hybrid)
becomes a `LanguageModel` of the target config, whose linear layers reuse the trained q/k/v/o
projections. The result is an ordinary harness model: its checkpoint, the transformers export,
the probes and the lm-eval stage take it as they take any other.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import ConfigError, ModelConfig
from ..layers import LinearAttention, SoftmaxAttention
from ..model import LanguageModel, build_model

#: what must be equal between the source model and the converted one (all but the attention)
SHARED_FIELDS = ("d_model", "n_layers", "n_heads", "head_dim", "mlp", "mlp_ratio", "rotary", "rotary_base")


def check_compatible(source: ModelConfig, target: ModelConfig, where: str) -> None:
    """Raise ConfigError naming each setting in which `target` cannot start from `source`."""
    different = [
        f"{name} ({getattr(target, name)!r}; the source has {getattr(source, name)!r})"
        for name in (*SHARED_FIELDS, "tie_embeddings")
        if getattr(source, name) != getattr(target, name)
    ]
    converted = set(range(target.n_layers)) - set(target.softmax_layer_indices())
    if converted and target.attention.rotary != source.rotary:
        different.append(
            f"attention.rotary ({target.attention.rotary!r}): converted layers keep the source's rotary "
            f"positions, so it must equal model.rotary of the source ({source.rotary!r})"
        )
    if different:
        raise ConfigError(f"{where}: the model cannot start from its source: model." + "; model.".join(different))
    source_softmax = set(source.softmax_layer_indices())
    back = sorted(set(target.softmax_layer_indices()) - source_softmax)
    if back:
        raise ConfigError(
            f"{where}: layers {back} are linear attention in the source and softmax in model.softmax_layers; "
            "a conversion turns softmax layers into linear ones, not back"
        )


def convert_language_model(source: LanguageModel, target: ModelConfig, seed: int) -> LanguageModel:
    """A model of config `target` starting from `source`: every parameter they share by name and
    shape is copied (embeddings, norms, MLPs, layers whose kind does not change); a softmax layer
    that `target` makes linear gets its q, k and v from the rows of the fused qkv projection and
    its output projection as it was. The parameters the conversion adds (gates, the output norm,
    an output gate) keep the init the target model is built with (seed `seed`): matrices
    N(0, init_std), gate biases at their plugin's bias_init, norm weights 1 — the same start those
    parameters have in a run from scratch."""
    check_compatible(source.config, target, "model.init")
    model = build_model(replace(target, vocab_size=source.config.vocab_size), source.config.vocab_size, seed)
    state = source.state_dict()
    mine = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if name in mine and mine[name].shape == tensor.shape:
                mine[name].copy_(tensor)
        for old, new in zip(source.blocks, model.blocks):
            if isinstance(old.attn, SoftmaxAttention) and isinstance(new.attn, LinearAttention):
                q, k, v = old.attn.qkv_proj.weight.chunk(3, dim=0)  # the rows SoftmaxAttention splits
                new.attn.q_proj.weight.copy_(q)
                new.attn.k_proj.weight.copy_(k)
                new.attn.v_proj.weight.copy_(v)
                new.attn.o_proj.weight.copy_(old.attn.o_proj.weight)
    return model
