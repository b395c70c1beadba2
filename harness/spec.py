"""Run specifications: what one cell of a grid trains, and the identities derived from it.

A RunSpec is frozen and fully normalised (every default filled in), so two grid files that
describe the same run produce the same `run_id`. The id hashes what determines the trained
weights — model, data, training settings and the versions of the plugins used — and nothing
else: changing evaluation tasks or profiler shapes never retrains (those stages hash their own
settings on top of the run id).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from variants import FEATURE_MAPS, GATES, NORMS

from .config import ConfigError, DataConfig, ModelConfig, TrainConfig, from_dict, to_dict
from .data import get_source
from .data.tokenization import check_tokenizer_name

#: bump when the meaning of a spec field changes in a way that invalidates old runs
SPEC_FORMAT = 1


@dataclass(frozen=True)
class RunSpec:
    """One trained model of a grid, plus the settings of the stages that run on it."""

    name: str
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    #: stage name -> that stage's settings (validated by the stage); not part of the run id
    stages: dict = field(default_factory=dict)
    #: axis name -> this run's level (for tables and plots)
    axes: dict = field(default_factory=dict)
    grid: str = ""
    plugins: tuple = ()

    def plugin_versions(self) -> dict[str, str]:
        """The plugins this run uses with their versions (softmax-only models use none)."""
        if len(self.model.softmax_layer_indices()) == self.model.n_layers:
            return {}
        attention = self.model.attention
        return {
            f"feature_map:{attention.feature_map}": str(FEATURE_MAPS.version_of(attention.feature_map)),
            f"norm:{attention.norm}": str(NORMS.version_of(attention.norm)),
            f"gate:{attention.gate}": str(GATES.version_of(attention.gate)),
        }

    def identity(self) -> dict[str, Any]:
        """Everything that determines the trained weights, normalised."""
        model = to_dict(self.model)
        if not self.plugin_versions():
            # A softmax-only model never builds the linear-attention plugins: their settings
            # must not make two identical softmax runs look different.
            model.pop("attention")
        return {
            "format": SPEC_FORMAT,
            "model": model,
            "data": to_dict(self.data),
            "train": to_dict(self.train),
            "plugins": self.plugin_versions(),
        }

    @property
    def run_id(self) -> str:
        return stable_hash(self.identity())

    def stage_id(self, stage: str) -> str:
        """Identity of a stage's result: the run plus the stage's own settings."""
        return stable_hash({"run": self.run_id, "stage": stage, "settings": self.stages.get(stage, {})})

    def to_json(self) -> str:
        return json.dumps(to_dict(self), sort_keys=True)


def stable_hash(data: Any, length: int = 12) -> str:
    """Hash of canonical JSON (sorted keys, no whitespace): stable across runs and machines."""
    text = json.dumps(to_dict(data), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def spec_from_dict(
    data: Mapping[str, Any],
    *,
    name: str,
    grid: str = "",
    axes: Mapping | None = None,
    plugins: tuple = (),
    stages: Mapping[str, Any] | None = None,
) -> RunSpec:
    """Strictly build a RunSpec from the `model`, `data` and `train` sections of merged grid data.

    `stages`: each stage's settings, already validated and normalised (the grid does that, as it
    knows the registered stages); they are not part of the run id.
    """
    unknown = sorted(set(data) - {"model", "data", "train"})
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {', '.join(map(repr, unknown))} in run {name!r}; allowed: data, model, train"
        )
    spec = RunSpec(
        name=name,
        model=from_dict(ModelConfig, data.get("model"), "model"),
        data=from_dict(DataConfig, data.get("data"), "data"),
        train=from_dict(TrainConfig, data.get("train"), "train"),
        stages=dict(stages or {}),
        axes=dict(axes or {}),
        grid=grid,
        plugins=tuple(plugins),
    )
    check_names(spec)
    return spec


def check_names(spec: RunSpec) -> None:
    """Plugin options, data source (and its options) and tokenizer, checked when the grid loads
    rather than after data preparation in every run."""
    where = f"run {spec.name!r}"
    if spec.plugin_versions():
        attention = spec.model.attention
        FEATURE_MAPS.check_options(attention.feature_map, dict(attention.feature_map_options))
        NORMS.check_options(attention.norm, dict(attention.norm_options))
        GATES.check_options(attention.gate, dict(attention.gate_options))
    try:
        get_source(spec.data.source, **spec.data.options)
        check_tokenizer_name(spec.data.tokenizer)
    except ValueError as exc:
        raise ConfigError(f"{where}: data: {exc}") from exc
