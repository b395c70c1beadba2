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

from .config import ConfigError, ModelConfig, from_dict, to_dict

#: bump when the meaning of a spec field changes in a way that invalidates old runs
SPEC_FORMAT = 1


@dataclass(frozen=True)
class DataConfig:
    """Which corpus and tokenizer; `options` go to the source (e.g. data_dir, glob)."""

    source: str = "offline-english"
    tokenizer: str = "bpe-4096"
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """nanoGPT-style training: AdamW, linear warm-up then cosine decay, clipping, accumulation."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 50
    seed: int = 0
    #: "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    precision: str = "auto"

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "log_every",
            "checkpoint_every",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{name} must be a positive integer; got {value!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be one of auto, fp32, bf16; got {self.precision!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"train.warmup_steps must be between 0 and train.steps ({self.steps}); got {self.warmup_steps}"
            )


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
    data: Mapping[str, Any], *, name: str, grid: str = "", axes: Mapping | None = None, plugins: tuple = ()
) -> RunSpec:
    """Strictly build a RunSpec from merged grid data (keys: model, data, train, and stage names)."""
    from .stages import STAGES  # stages import this module; resolve at call time

    allowed = {"model", "data", "train", *STAGES}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {', '.join(map(repr, unknown))} in run {name!r}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    stages = {}
    for stage, settings in data.items():
        # The train stage's settings are the `train:` section itself, part of the run id.
        if stage in STAGES and stage != "train":
            # Validate now so a typo fails at grid load, not after an hour of training.
            config = from_dict(STAGES[stage].config_class, settings, stage)
            stages[stage] = to_dict(config)
    spec = RunSpec(
        name=name,
        model=from_dict(ModelConfig, data.get("model"), "model"),
        data=from_dict(DataConfig, data.get("data"), "data"),
        train=from_dict(TrainConfig, data.get("train"), "train"),
        stages=stages,
        axes=dict(axes or {}),
        grid=grid,
        plugins=tuple(plugins),
    )
    check_names(spec)
    return spec


def check_names(spec: RunSpec) -> None:
    """Plugin options, data source (and its options) and tokenizer, checked when the grid loads
    rather than after data preparation in every run."""
    from .data import get_source
    from .data.tokenization import check_tokenizer_name

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
