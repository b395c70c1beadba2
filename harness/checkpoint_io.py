"""A trained model as a self-contained directory that other tools read without this repository's
corpora or grids:

    config.json            the model's settings (the strict harness ModelConfig under "model"),
                           the tokenizer's name, in the layout transformers reads (model_type "regla")
    model.safetensors      the weights (no pickle is loaded), keys prefixed "model." as the
                           transformers export (harness.hf) names them; a tied LM head is not stored
    tokenizer.json         the tokenizer in the `tokenizers` JSON format
    tokenizer_config.json  its end-of-text token, so transformers loads it as PreTrainedTokenizerFast

Every file is written atomically. Loading checks each file and names the one that is missing,
unreadable or does not fit the config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import tokenizers
import torch

from .atomic import atomic_write_bytes, atomic_write_text
from .config import ConfigError, ModelConfig, from_dict, to_dict
from .data.tokenization import EOT_TEXT, HFTokenizer, Tokenizer
from .model import LanguageModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
#: bump when the layout changes; loading refuses other formats by name
CHECKPOINT_FORMAT = 2
#: the prefix of every weight's key (the module path inside the transformers export)
WEIGHT_PREFIX = "model."
MODEL_TYPE = "regla"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and why."""


def checkpoint_config(model_config: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json's content: the harness settings plus the keys transformers reads."""
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["ReGLAForCausalLM"],
        "regla_format": CHECKPOINT_FORMAT,
        "model": to_dict(model_config),
        "tokenizer": tokenizer.name,
        "vocab_size": model_config.vocab_size,
        "eos_token_id": tokenizer.eot_id,
        "bos_token_id": tokenizer.eot_id,
        "tie_word_embeddings": model_config.tie_embeddings,
    }


def save_checkpoint(model: LanguageModel, tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write `model` and the `tokenizer` it was trained with to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the embedding, stored once
    tensors = {WEIGHT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_bytes(
        directory / WEIGHTS_FILE, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"})
    )
    atomic_write_text(directory / TOKENIZER_FILE, tokenizer.to_tokenizers().to_str(pretty=True))
    special = {
        "eos_token": EOT_TEXT,
        "bos_token": EOT_TEXT,
        "unk_token": None,
        "model_max_length": model.config.max_seq_len,
    }
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    atomic_write_text(directory / TOKENIZER_CONFIG_FILE, json.dumps(tokenizer_config, indent=2))
    # Written last: a directory with config.json is complete.
    atomic_write_text(directory / CONFIG_FILE, json.dumps(checkpoint_config(model.config, tokenizer), indent=2))
    return directory


def read_checkpoint_config(directory: str | Path) -> dict:
    """config.json of a checkpoint, checked to be one this version reads."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {Path(directory)} is not a checkpoint (expected {CONFIG_FILE}, {WEIGHTS_FILE}, "
            f"{TOKENIZER_FILE})"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON: {exc}") from exc
    found = config.get("regla_format") if isinstance(config, dict) else None
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is checkpoint format {found!r}; this version reads format {CHECKPOINT_FORMAT} "
            f"(re-run the train stage with --force to write one)"
        )
    return config


def model_config_of(config: dict, path: Path) -> ModelConfig:
    try:
        return from_dict(ModelConfig, config.get("model"), "model")
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its model settings do not fit this version: {exc}") from exc


def load_weights(model: LanguageModel, path: Path) -> None:
    """Load model.safetensors into `model` (on the CPU), naming what does not fit."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        tensors = safetensors.torch.load_file(path)
    except (OSError, safetensors.SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"{path} cannot be read (truncated or not safetensors): {exc}") from exc
    state = {k.removeprefix(WEIGHT_PREFIX): v for k, v in tensors.items()}
    expected = model.state_dict()
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise CheckpointError(f"{path} does not fit the model in config.json ({details})")
    model.load_state_dict(state, strict=False)  # only the tied head is absent, and it is the embedding


def load_tokenizer(directory: str | Path, name: str) -> HFTokenizer:
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return HFTokenizer(name, tokenizers.Tokenizer.from_file(str(path)))
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise CheckpointError(f"{path} cannot be read as a tokenizers JSON file: {exc}") from exc


def load_checkpoint(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[LanguageModel, HFTokenizer]:
    """(model in eval mode, tokenizer) from a directory written by `save_checkpoint`; needs
    neither the corpus nor the grid the model was trained from."""
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    model = LanguageModel(model_config_of(config, directory / CONFIG_FILE))
    load_weights(model, directory / WEIGHTS_FILE)
    tokenizer = load_tokenizer(directory, str(config.get("tokenizer", "")))
    return model.to(map_location).eval(), tokenizer
