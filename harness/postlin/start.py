"""Where a run with `model.init` starts, and how its trained model is kept and read back.

A run's source is one of three things (`InitConfig.from_pretrained`):
- `run:<name>`: the trained model of another run of the grid, at `<runs>/<grid>/<its id>/model`;
- a local directory: a harness checkpoint (config.json with `regla_format`) or a transformers one;
- a hub name: a transformers model downloaded by transformers (GPT-NeoX/Pythia, GPT-2, Llama).

A harness source converts into an ordinary `LanguageModel` (harness.postlin.own), saved and loaded
as every harness checkpoint. A transformers source converts into a `ConvertedLM`
(harness.postlin.pretrained), saved as `postlin.json` (how to rebuild it: source, revision,
attention, hybrid layers) beside `model.safetensors` (every weight after training); reading it
back converts the source again and loads the weights over it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from ..atomic import atomic_write_bytes, atomic_write_text, file_digest
from ..checkpoint_io import CONFIG_FILE, load_checkpoint, read_checkpoint_config, save_checkpoint
from ..config import AttentionConfig, ConfigError, InitConfig, ModelConfig, from_dict, to_dict
from ..data.tokenization import PRETRAINED_PREFIX, Tokenizer
from ..model import LanguageModel, build_model
from .own import convert_language_model
from .pretrained import ConvertedLM, convert_pretrained, load_pretrained, random_pretrained

CONVERTED_FILE = "postlin.json"
WEIGHTS_FILE = "model.safetensors"
#: the weight files whose content identifies a local transformers checkpoint
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


class SourceMissing(FileNotFoundError):
    """The source run of a conversion has no trained model yet."""


def is_harness_checkpoint(directory: Path) -> bool:
    path = directory / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return "regla_format" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def local_digest(directory: Path) -> str:
    """The content digest of a local checkpoint: its config and weight files, by name and content."""
    files = sorted({p for pattern in (CONFIG_FILE, *WEIGHT_PATTERNS) for p in directory.glob(pattern)})
    if not any(p.name != CONFIG_FILE for p in files):
        raise ConfigError(f"model.init.from_pretrained: {directory} holds no weights (*.safetensors or *.bin)")
    joined = "\n".join(f"{p.name} {file_digest(p)}" for p in files)
    return "sha256:" + hashlib.sha256(joined.encode()).hexdigest()[:16]


def source_identity(init: InitConfig) -> str:
    """What identifies a hub or local source in the run id (a `run:` source gets its run's id from
    the grid): the content digest of a local directory, else the hub name and revision."""
    path = Path(init.from_pretrained).expanduser()
    if path.is_dir():
        return local_digest(path)
    if init.from_pretrained.startswith((".", "/", "~")) or init.from_pretrained.count("/") > 1:
        # Hub names are `name` or `owner/name`: anything else is meant as a directory.
        raise ConfigError(f"model.init.from_pretrained: directory {init.from_pretrained!r} does not exist")
    return f"hub:{init.from_pretrained}@{init.revision or 'main'}"


def source_directory(init: InitConfig, runs_dir: Path) -> Path | None:
    """The directory a source loads from (None for a hub name)."""
    if init.source_run is not None:
        if not init.source_id:
            raise ConfigError(f"model.init: the source run {init.source_run!r} was not resolved by its grid")
        path = runs_dir / init.source_id / "model"
        if not (path / CONFIG_FILE).is_file():
            raise SourceMissing(
                f"the source run {init.source_run!r} ({init.source_id}) has no trained model at {path}: run it "
                "first (`run` trains source runs first; a --where or --only-run that leaves it out needs it done)"
            )
        return path
    path = Path(init.from_pretrained).expanduser()
    return path if path.is_dir() else None


def initial_model(model_config: ModelConfig, tokenizer: Tokenizer, seed: int, runs_dir: Path) -> nn.Module:
    """The model a run starts from: a fresh one, or its source converted (`model.init`).
    `runs_dir`: the grid's runs folder, where `run:` sources lie."""
    init = model_config.init
    if init is None:
        return build_model(model_config, tokenizer.vocab_size, seed)
    directory = source_directory(init, Path(runs_dir))
    if directory is not None and is_harness_checkpoint(directory):
        source, source_tokenizer = load_checkpoint(directory)
        check_same_tokenizer(source_tokenizer, tokenizer, directory)
        return convert_language_model(source, model_config, seed).train()
    return convert_transformers(init, model_config, tokenizer, seed)


def convert_transformers(init: InitConfig, model_config: ModelConfig, tokenizer: Tokenizer, seed: int) -> ConvertedLM:
    hf_model, source_tokenizer = load_pretrained(init.from_pretrained, init.revision)
    expected = PRETRAINED_PREFIX + init.from_pretrained
    if tokenizer.name != expected:
        raise ConfigError(
            f"model.init: a transformers model reads its own tokenizer: set data.tokenizer to {expected!r} "
            f"(it is {tokenizer.name!r})"
        )
    return _converted(hf_model, init, model_config, seed).train()


def _converted(hf_model: nn.Module, init: InitConfig, model_config: ModelConfig, seed: int) -> ConvertedLM:
    n_layers = hf_model.config.num_hidden_layers
    if n_layers != model_config.n_layers:
        raise ConfigError(
            f"model.n_layers ({model_config.n_layers}) must equal the layers of {init.from_pretrained!r} "
            f"({n_layers}): model.softmax_layers is read against it"
        )
    return convert_pretrained(hf_model, model_config.attention, model_config.softmax_layers, seed)


def is_transformers_source(init: InitConfig) -> bool:
    """Whether a conversion starts from a transformers model (a hub name or a local transformers
    directory) rather than a harness model (a `run:` source or a local harness checkpoint)."""
    if init.source_run is not None:
        return False
    path = Path(init.from_pretrained).expanduser()
    return not (path.is_dir() and is_harness_checkpoint(path))


def architecture_model(model_config: ModelConfig, vocab_size: int | None, seed: int, min_seq_len: int) -> nn.Module:
    """A model of the run's architecture, as training gets it, with random weights and room for
    `min_seq_len` positions (for stages that time or probe the architecture, not the weights).

    From scratch, or converted from a harness model: the harness model of `model_config` (a
    conversion builds exactly that model and copies weights into it). Converted from a
    transformers model: that family's modules at the source's sizes (vocabulary, MLP, norms,
    positions) converted as the run converts them (kept softmax layers, the family's rotary);
    only the source's config is read, so this works without its weights. `vocab_size`: the
    tokenizer's, for a harness model (a transformers source has its own; None is fine there)."""
    init = model_config.init
    if init is None or not is_transformers_source(init):
        if vocab_size is None:
            raise ValueError("architecture_model: a harness model needs the tokenizer's vocab_size")
        longer = replace(model_config, max_seq_len=max(model_config.max_seq_len, min_seq_len))
        return build_model(longer, vocab_size, seed)
    hf_model = random_pretrained(init.from_pretrained, init.revision, min_seq_len, seed)
    return _converted(hf_model, init, model_config, seed)


def check_same_tokenizer(source: Tokenizer, data: Tokenizer, directory: Path) -> None:
    if source.name != data.name or source.vocab_size != data.vocab_size:
        raise ConfigError(
            f"model.init: the source at {directory} was trained with tokenizer {source.name!r} "
            f"({source.vocab_size} tokens); this run's data.tokenizer is {data.name!r} ({data.vocab_size}): "
            "they must be the same"
        )


def new_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the conversion adds: every parameter of a linear-attention layer except its
    q/k/v/o projections (gates, output norm, output gate, feature-map weights)."""
    found = []
    for layer in model.linear_attention_layers():
        for name, parameter in layer.named_parameters():
            if name.split(".")[0] not in ("q_proj", "k_proj", "v_proj", "o_proj"):
                found.append(parameter)
    return found


def save_trained(model: nn.Module, tokenizer: Tokenizer, directory: Path, model_config: ModelConfig) -> Path:
    """A trained model's directory: a harness checkpoint, or for a converted transformers model its
    recipe (postlin.json) and weights."""
    if isinstance(model, LanguageModel):
        return save_checkpoint(model, tokenizer, directory)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # save_model drops the second name of a tied weight (safetensors stores each tensor once).
    atomic_write_bytes(directory / WEIGHTS_FILE, lambda tmp: safetensors.torch.save_model(model, tmp))
    recipe = {"init": to_dict(model_config.init), "attention": to_dict(model_config.attention)}
    recipe["softmax_layers"] = to_dict(model_config.softmax_layers)
    recipe["n_layers"] = model_config.n_layers
    atomic_write_text(directory / CONVERTED_FILE, json.dumps(recipe, indent=2))
    return directory


def load_trained(directory: str | Path, map_location: Any = "cpu") -> tuple[nn.Module, Tokenizer]:
    """(model in eval mode, tokenizer) from a directory written by `save_trained`."""
    directory = Path(directory)
    recipe_path = directory / CONVERTED_FILE
    if not recipe_path.is_file():
        read_checkpoint_config(directory)  # the harness checkpoint's own error when it is neither
        return load_checkpoint(directory, map_location)
    recipe = json.loads(recipe_path.read_text())
    init = from_dict(InitConfig, recipe["init"], "model.init")
    attention = from_dict(AttentionConfig, recipe["attention"], "model.attention")
    hf_model, tokenizer = load_pretrained(init.from_pretrained, init.revision)
    model = convert_pretrained(hf_model, attention, recipe["softmax_layers"])
    safetensors.torch.load_model(model, directory / WEIGHTS_FILE)
    return model.to(map_location).eval(), tokenizer


def with_source_id(model_config: ModelConfig, source_id: str) -> ModelConfig:
    return replace(model_config, init=replace(model_config.init, source_id=source_id))
