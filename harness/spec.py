"""Run specifications: what one cell of a grid trains, and the identities derived from it.

A RunSpec is frozen and fully normalised (every default filled in), so two grid files that
describe the same run produce the same `run_id`. The id hashes what determines the trained
weights — model, data, training settings and the versions of the plugins used — and nothing
else: changing evaluation tasks or profiler shapes never retrains (those stages hash their own
settings on top of the run id).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

import torch

from variants import FEATURE_MAPS, GATES, NORMS

from . import __version__
from .config import (
    STAGES_THAT_TRAIN_THEIR_OWN_MODEL,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from .data import get_source
from .data.tokenization import check_tokenizer_name
from .model import LanguageModel
from .postlin.start import source_identity, with_source_id

#: bump when the meaning of a spec field changes in a way that invalidates old runs
SPEC_FORMAT = 2


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
    #: processes that train it together (torchrun's WORLD_SIZE): `train.batch_size` is per
    #: process, so the global batch, and with it the run, depends on it
    processes: int = 1

    def plugin_versions(self) -> dict[str, dict[str, Any]]:
        """The plugins this run uses (softmax-only models use none), each with what changes its
        math: the decorator's version, the version of the package that ships it, and its option
        values with the defaults filled in (a changed default changes the run)."""
        if len(self.model.softmax_layer_indices()) == self.model.n_layers:
            return {}
        attention = self.model.attention
        used = (
            ("feature_map", FEATURE_MAPS, attention.feature_map, attention.feature_map_options),
            ("norm", NORMS, attention.norm, attention.norm_options),
            ("gate", GATES, attention.gate, attention.gate_options),
        )
        return {
            f"{axis}:{name}": {
                "version": str(registry.version_of(name)),
                "package": package_of(registry.get(name)),
                "options": to_dict({**registry.options_of(name), **options}),
            }
            for axis, registry, name, options in used
        }

    def identity(self) -> dict[str, Any]:
        """Everything that determines the trained weights, normalised."""
        model = without_unset_additions(to_dict(self.model))
        if not self.plugin_versions():
            # A softmax-only model never builds the linear-attention plugins: their settings
            # must not make two identical softmax runs look different.
            model.pop("attention")
        data = to_dict(self.data)
        if data["packing"] == "windows":
            data.pop("packing")  # the default, as before the option existed: existing run ids stay valid
        train = to_dict(self.train)
        if not train["cuda_graph"]:
            # The default, as before the option existed: existing run ids stay valid. A run replayed
            # from a graph is its own run (capturable AdamW may round differently in the last bits).
            train.pop("cuda_graph")
        identity = {
            "format": SPEC_FORMAT,
            "model": model,
            "data": data,
            "train": train,
            "plugins": self.plugin_versions(),
            "processes": self.processes,
        }
        # A stage that trains a model of its own (mqar) makes its settings part of what is trained:
        # two runs that differ in them (an `mqar.lr` axis) are two runs. Added only when set, so
        # every other run's id stays what it was.
        own = {stage: self.stages[stage] for stage in STAGES_THAT_TRAIN_THEIR_OWN_MODEL if self.stages.get(stage)}
        if own:
            identity["stage_models"] = own
        return identity

    @property
    def run_id(self) -> str:
        return stable_hash(self.identity())

    def stage_id(self, stage: str) -> str:
        """Identity of a stage's result: the run plus the stage's own settings."""
        return stable_hash({"run": self.run_id, "stage": stage, "settings": self.stages.get(stage, {})})

    def to_json(self) -> str:
        return json.dumps(to_dict(self), sort_keys=True)


def without_unset_additions(model: dict[str, Any]) -> dict[str, Any]:
    """The model settings added after SPEC_FORMAT 2 (`init`, `softmax_short_conv`,
    `attention.rotary`, `attention.fused_epilogue`, `attention.short_conv`) enter the run id only
    when they differ from their default, so that every run id from before they existed stays what
    it was. `fused_epilogue` is where the fused op computes the norm, not what it computes: its
    default (on) has the id every run had before, when the norm ran as separate passes; off, a run
    gets an id of its own. Each run records which path its layers took
    (`attention/layers_fused_epilogue`)."""
    if model.get("init") is None:
        model.pop("init", None)
    if not model.get("softmax_short_conv", 0):
        model.pop("softmax_short_conv", None)
    attention = model.get("attention", {})
    for switch in ("rotary", "short_conv"):
        if not attention.get(switch, True):  # False or 0: unset
            attention.pop(switch)
    if attention.get("fused_epilogue", False) is True:  # the default
        attention.pop("fused_epilogue")
    return model


#: top-level packages of this project
PROJECT_PACKAGES = frozenset({"harness", "variants", "kernels", "registry"})


def package_of(cls: type) -> str | None:
    """ "distribution==version" of the installed package a class comes from, or None for a module
    that is not part of an installed distribution (e.g. a plugin file on PYTHONPATH)."""
    top_level = cls.__module__.split(".")[0]
    if top_level in PROJECT_PACKAGES:
        # The project's own plugins: the same identity whether it is installed or run from a
        # checkout (the GPU machine runs the working tree without installing it).
        return f"regla-harness=={__version__}"
    distributions = _distributions().get(top_level)
    if not distributions:
        return None
    name = sorted(set(distributions))[0]
    return f"{name}=={metadata.version(name)}"


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    # Scanning every installed distribution takes ~0.1 s: once per process.
    return metadata.packages_distributions()


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
    processes: int = 1,
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
        processes=processes,
    )
    check_names(spec)
    init = spec.model.init
    if init is not None and init.source_run is None:
        # A hub or local source: its name and revision, or its content, enter the run id. (A
        # `run:` source gets its run's id when the grid resolves it.)
        try:
            spec = replace(spec, model=with_source_id(spec.model, source_identity(init)))
        except ConfigError as exc:
            raise ConfigError(f"run {name!r}: {exc}") from exc
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
    if spec.train.seq_len > spec.model.max_seq_len:
        raise ConfigError(
            f"{where}: train.seq_len ({spec.train.seq_len}) is longer than model.max_seq_len "
            f"({spec.model.max_seq_len}), the longest input the model is scored on; raise model.max_seq_len "
            f"or lower train.seq_len"
        )
    check_model_builds(spec)


def check_model_builds(spec: RunSpec) -> None:
    """Build the run's model on the meta device (no memory, no compute): every plugin checks its
    option values and every layer its constraints now, when the grid loads, not when the run
    starts training. The vocabulary, unknown before the tokenizer exists, does not matter here."""
    config = spec.model if spec.model.vocab_size is not None else replace(spec.model, vocab_size=256)
    try:
        with torch.device("meta"):
            LanguageModel(config)
    except (ValueError, TypeError) as exc:  # ConfigError and RegistryError are ValueErrors
        raise ConfigError(f"run {spec.name!r}: the model cannot be built: {exc}") from exc
