"""A model checkpoint as a directory: `config.json` (model config + tokenizer name) and `model.pt`.

The config is stored as plain JSON so a checkpoint can be inspected (and its model rebuilt with
the strict `from_dict`) without unpickling anything; the weights are a plain state_dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .atomic import atomic_write_bytes, atomic_write_text
from .config import ModelConfig, from_dict, to_dict
from .model import LanguageModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"


def save_checkpoint(
    model: LanguageModel, tokenizer_name: str, directory: str | Path, tokenizer_source: str | None = None
) -> Path:
    """`tokenizer_source`: the corpus a trained tokenizer (bpe-N) was fitted on, needed to rebuild it."""
    directory = Path(directory)
    config = {"model": to_dict(model.config), "tokenizer": tokenizer_name, "tokenizer_source": tokenizer_source}
    # Each file is written atomically, so a crash never leaves a truncated one that later loads.
    atomic_write_bytes(directory / WEIGHTS_FILE, lambda p: torch.save(model.state_dict(), p))
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2))
    return directory


def read_checkpoint_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[LanguageModel, str]:
    """(model in eval mode, tokenizer name) from a directory written by `save_checkpoint`."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it")
    config = read_checkpoint_config(directory)
    model = LanguageModel(from_dict(ModelConfig, config["model"], "model"))
    state = torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval(), config["tokenizer"]
