"""The harness's language model as a Hugging Face transformers model: an export layer over the
training model (`harness.model.LanguageModel`), not a second implementation of it.

    import harness.hf  # registers model_type "regla" with AutoConfig / AutoModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("runs/<grid>/<run_id>/model")
    tokenizer = AutoTokenizer.from_pretrained("runs/<grid>/<run_id>/model")
    out = model.generate(**tokenizer("The", return_tensors="pt"), max_new_tokens=20, do_sample=True)

A harness checkpoint (harness.checkpoint_io) is a transformers checkpoint as it is: config.json
with model_type "regla", model.safetensors with the weights under "model.", tokenizer.json. Every
registered variant works, hybrids included, since the wrapped module is the harness's own.
`generate()` (greedy, sampling, beams) runs over the model's own decoding state: the recurrent
state of each linear layer and the KV cache of each softmax layer, in `regla_state`. Its loop is
transformers': each step goes through the layers (the fused decoding step on CUDA included), but
the step is not captured as a CUDA graph as `LanguageModel.generate` does (harness.decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .checkpoint_io import CHECKPOINT_FORMAT, MODEL_TYPE, checkpoint_config, model_config_of, save_checkpoint
from .config import ModelConfig
from .data.tokenization import Tokenizer
from .layers import KVCache, LinearState
from .model import LanguageModel

__all__ = ["ReGLAConfig", "ReGLAForCausalLM", "ReGLAOutput"]


class ReGLAConfig(PretrainedConfig):
    """transformers' view of a harness checkpoint's config.json: `model` holds the strict harness
    ModelConfig as plain data, `tokenizer` the tokenizer's name."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        tokenizer: str = "",
        regla_format: int = CHECKPOINT_FORMAT,
        **kwargs: Any,
    ):
        self.model = dict(model or {})
        self.tokenizer = tokenizer
        self.regla_format = regla_format
        if self.model:
            harness = self.harness_config()
            kwargs.setdefault("vocab_size", harness.vocab_size)
            kwargs.setdefault("tie_word_embeddings", harness.tie_embeddings)
        super().__init__(**kwargs)

    def harness_config(self) -> ModelConfig:
        return model_config_of({"model": self.model}, Path("config.json"))


@dataclass
class ReGLAOutput(ModelOutput):
    """The loss (when labels are given), the logits [B, T, vocab], and the decoding state: one entry
    per layer (a linear layer's recurrent state or a softmax layer's KV cache)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    regla_state: list[LinearState | KVCache] | None = None


class ReGLAForCausalLM(PreTrainedModel, GenerationMixin):
    """A `LanguageModel` inside transformers' model API (`self.model` is the harness module)."""

    config_class = ReGLAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: ReGLAConfig):
        super().__init__(config)
        self.model = LanguageModel(config.harness_config())
        self.post_init()

    # The wrapped module initialises its own weights (GPT-2 init; gates their biases).
    def _init_weights(self, module: torch.nn.Module) -> None:
        return

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The decoding state is the model's own (recurrent states, KV caches), not a transformers Cache.
        return False

    # -- conversion both ways ------------------------------------------------------------------
    @classmethod
    def from_harness(cls, model: LanguageModel, tokenizer: Tokenizer) -> ReGLAForCausalLM:
        """Wrap a trained harness model (its weights are shared, not copied)."""
        config = ReGLAConfig(**checkpoint_config(model.config, tokenizer))
        wrapped = cls(config)
        wrapped.model = model
        return wrapped

    def to_harness(self) -> LanguageModel:
        return self.model

    def save_checkpoint(self, directory: str | Path, tokenizer: Tokenizer) -> Path:
        """The harness checkpoint format (weights, tokenizer and config in one directory)."""
        return save_checkpoint(self.model, tokenizer, directory)

    # -- the transformers model API ------------------------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        regla_state: list | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> ReGLAOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "ReGLAForCausalLM has no padding mask: a recurrent state cannot skip pad tokens. Generate "
                "prompts of equal length together (or one at a time) without padding."
            )
        logits, state = self.model(input_ids, regla_state, use_cache=bool(use_cache))
        loss = None
        if labels is not None:
            # transformers' convention: labels are the inputs; position t predicts token t + 1.
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return ReGLAOutput(loss=loss, logits=logits, regla_state=state)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        regla_state: list | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # With a state, only the newest token is new: the state holds the rest of the sequence.
        if regla_state is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "regla_state": regla_state, "use_cache": True, "attention_mask": None}

    def _update_model_kwargs_for_generation(
        self, outputs: ReGLAOutput, model_kwargs: dict[str, Any], is_encoder_decoder: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, **kwargs)
        model_kwargs["regla_state"] = outputs.regla_state
        return model_kwargs

    def _reorder_cache(self, regla_state: list, beam_idx: torch.Tensor) -> list:
        """Beam search: every state follows its beam."""
        return [reorder_state(s, beam_idx) for s in regla_state]


def reorder_state(state: LinearState | KVCache, index: torch.Tensor) -> LinearState | KVCache:
    if isinstance(state, KVCache):
        conv_inputs = None if state.conv_inputs is None else state.conv_inputs.index_select(0, index)
        return KVCache(state.keys.index_select(0, index), state.values.index_select(0, index), conv_inputs)
    key_feature = state.key_feature.index_select(0, index) if torch.is_tensor(state.key_feature) else state.key_feature
    conv_inputs = None if state.conv_inputs is None else state.conv_inputs.index_select(0, index)
    return LinearState(
        state.memory.index_select(0, index),
        key_feature,
        state.last_input.index_select(0, index),
        state.position,
        conv_inputs=conv_inputs,
    )


AutoConfig.register(MODEL_TYPE, ReGLAConfig)
AutoModelForCausalLM.register(ReGLAConfig, ReGLAForCausalLM)
