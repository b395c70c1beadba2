"""Saving and loading a trained model as a small self-describing directory:

    <dir>/config.json   {"model": ModelConfig as data, "data": DataConfig as data, "tokenizer": name}
    <dir>/model.pt      the state_dict

Both files are written atomically, model.pt first, so a directory with a config.json is complete.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, from_dict, to_dict
from .model import LanguageModel
from .results import atomic_write_bytes, atomic_write_text


def save_checkpoint(model: LanguageModel, directory: str | Path, *, tokenizer: str,
                    data: Any = None) -> Path:
    directory = Path(directory)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / "model.pt", lambda tmp: torch.save(state, tmp))
    meta = {"model": to_dict(model.config), "tokenizer": tokenizer, "data": to_dict(data) if data is not None else None}
    atomic_write_text(directory / "config.json", json.dumps(meta, indent=1, sort_keys=True))
    return directory


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[LanguageModel, dict]:
    """The model (in eval mode) and the metadata dict (tokenizer name, data config)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a model checkpoint: no config.json "
                                f"(a checkpoint holds config.json and model.pt, written by training)")
    meta = json.loads(config_path.read_text())
    model = LanguageModel(from_dict(ModelConfig, meta["model"], "model"))
    model.load_state_dict(torch.load(directory / "model.pt", map_location=map_location, weights_only=True))
    return model.eval(), meta
