"""Grid files -> RunSpecs.

    name: smoke                  # defaults to the file name
    description: ...
    plugins: [my_pkg.plugins]    # modules to import before building (third-party variants)
    stages: [train, eval]        # which stages `run` executes, in order
    base: {model: {...}, data: {...}, train: {...}, eval: {...}}
    axes:                        # cartesian product of all axes
      variant:                   # named levels: each a mapping of dotted-key overrides
        softmax: {model.softmax_layers: all}
        regla: {model.attention.feature_map: safe_exp, model.attention.gate: refined}
      train.seed: [0, 1]         # a dotted key with a list of values
    zip:                         # groups of dotted keys that vary together (equal lengths)
      - {train.lr: [1e-3, 3e-3], train.warmup_steps: [10, 20]}
    exclude:                     # drop cells matching every entry of one of these
      - {variant: softmax, train.seed: 1}

Overrides deep-merge into `base`; every key is then checked strictly against the dataclasses.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from variants import import_plugin_modules

from .config import ConfigError
from .postlin.own import check_compatible
from .postlin.start import is_transformers_source, with_source_id
from .spec import RunSpec, spec_from_dict
from .stages import STAGES

GRID_KEYS = ("name", "description", "plugins", "stages", "base", "axes", "zip", "exclude", "reference", "scales")
SCALE_KEYS = ("description", "seeds", "base")
REFERENCE_KEYS = ("source", "metric", "values")
RESERVED_AXIS_NAMES = {
    "run_id",
    "run_name",
    "grid",
    "stage",
    "metric",
    "value",
    "stderr",
    "step",
    "status",
    "error",
    "split",
    "task",
    "shots",
}


@dataclass(frozen=True)
class Grid:
    name: str
    description: str
    stages: tuple[str, ...]
    runs: tuple[RunSpec, ...]
    axis_names: tuple[str, ...]
    path: str = ""
    #: published numbers to show beside ours: {source, metric, values: {run_name: number}}
    reference: dict | None = None


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree["a"]["b"] = value for "a.b"; mappings deep-merge into what is already there."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is a value ({child!r}), not a section")
        node = child
    last = keys[-1]
    if isinstance(value, Mapping) and isinstance(node.get(last), dict):
        for k, v in value.items():
            set_dotted(node[last], k, v)
    else:
        node[last] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)


def _axis_levels(name: str, levels: Any) -> list[tuple[str, dict]]:
    """An axis as (label, overrides) pairs."""
    if isinstance(levels, Mapping):
        out = []
        for label, overrides in levels.items():
            if overrides is None:
                overrides = {}
            if not isinstance(overrides, Mapping):
                raise ConfigError(
                    f"axis {name!r}: level {label!r} must map dotted keys to values, "
                    f"e.g. {{model.attention.gate: refined}}; got {overrides!r}"
                )
            out.append((str(label), dict(overrides)))
        return out
    if isinstance(levels, list) and levels:
        return [(_label(v), {name: v}) for v in levels]
    raise ConfigError(
        f"axis {name!r} must be a non-empty list of values for the dotted key {name!r}, "
        f"or a mapping of level names to overrides"
    )


def _label(value: Any) -> str:
    """A level's display name: strings as they are, anything else as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _zip_levels(index: int, group: Any) -> tuple[str, list[tuple[str, dict]]]:
    if not isinstance(group, Mapping) or not group:
        raise ConfigError(f"zip entry {index} must map dotted keys to equal-length lists of values")
    lengths = {k: len(v) if isinstance(v, list) else -1 for k, v in group.items()}
    if len(set(lengths.values())) != 1 or -1 in lengths.values():
        raise ConfigError(f"zip entry {index}: every key needs a list, all of the same length; got lengths {lengths}")
    n = next(iter(lengths.values()))
    keys = list(group)
    name = "+".join(keys)
    levels = [(",".join(_label(group[k][i]) for k in keys), {k: group[k][i] for k in keys}) for i in range(n)]
    return name, levels


def load_grid_data(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"grid file {str(path)!r} must be a mapping with keys {', '.join(GRID_KEYS)}")
    return dict(data)


def split_sections(merged: Mapping[str, Any], run_name: str) -> tuple[dict, dict[str, Any]]:
    """Merged grid data as (the run's model/data/train sections, each stage's normalised settings).

    Stage settings are checked here, strictly, against each stage's settings class, so a typo
    fails when the grid loads, not after an hour of training. The train stage's settings are the
    `train:` section itself (part of the run id)."""
    run_keys = {"model", "data", "train"}
    allowed = run_keys | set(STAGES)
    unknown = sorted(set(merged) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {', '.join(map(repr, unknown))} in run {run_name!r}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    stage_settings = {
        stage: STAGES[stage].validate(settings) for stage, settings in merged.items() if stage not in run_keys
    }
    return {k: v for k, v in merged.items() if k in run_keys}, stage_settings


def apply_scale(data: Mapping[str, Any], scale: str | None) -> tuple[dict, str]:
    """The grid at one of its `scales` (its base overridden, seeds as an axis), and the suffix its
    name takes. A scale is `{description, seeds: N, base: {dotted.key: value}}`; without one the
    grid is as written (its smallest size, by convention the CPU `smoke` scale)."""
    data = dict(data)
    scales = data.get("scales") or {}
    if not isinstance(scales, Mapping):
        raise ConfigError("grid key 'scales' must map scale names to {description, seeds, base}")
    if scale is None or scale == "smoke" and "smoke" not in scales:
        return data, ""
    if scale not in scales:
        raise ConfigError(
            f"unknown scale {scale!r} for this grid; its scales: {', '.join(['smoke', *scales]) if scales else 'none'}"
        )
    spec = scales[scale] or {}
    unknown = sorted(set(spec) - set(SCALE_KEYS))
    if not isinstance(spec, Mapping) or unknown:
        raise ConfigError(f"scale {scale!r}: unknown key(s) {unknown}; allowed: {', '.join(SCALE_KEYS)}")
    base = copy.deepcopy(dict(data.get("base") or {}))
    for dotted, value in (spec.get("base") or {}).items():
        set_dotted(base, dotted, value)
    data["base"] = base
    seeds = spec.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, int) or seeds < 1:
            raise ConfigError(f"scale {scale!r}: seeds must be a positive integer; got {seeds!r}")
        data["axes"] = {**(data.get("axes") or {}), "seed": {str(i): {"train.seed": i} for i in range(seeds)}}
    return data, f"-{scale}"


def expand_grid(
    data: Mapping[str, Any],
    default_name: str = "grid",
    path: str = "",
    extra_plugins: tuple[str, ...] = (),
    scale: str | None = None,
) -> Grid:
    """Expand a grid mapping (as read from YAML) into RunSpecs, at one of its scales if given."""
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"unknown grid key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(GRID_KEYS)}")
    data, suffix = apply_scale(data, scale)
    name = str(data.get("name") or default_name) + suffix
    plugins = tuple(data.get("plugins") or ()) + tuple(extra_plugins)
    import_plugin_modules(plugins)
    stages = tuple(data.get("stages") or ("train",))
    for stage in stages:
        if stage not in STAGES:
            raise ConfigError(f"grid {name!r}: {STAGES.unknown(stage)}")

    axes: list[tuple[str, list[tuple[str, dict]]]] = [
        (axis, _axis_levels(axis, levels)) for axis, levels in (data.get("axes") or {}).items()
    ]
    axes += [_zip_levels(i, group) for i, group in enumerate(data.get("zip") or [])]
    names = [a for a, _ in axes]
    clash = sorted(set(names) & RESERVED_AXIS_NAMES)
    if clash:
        raise ConfigError(f"axis name(s) {clash} clash with result columns; rename them")
    excludes = data.get("exclude") or []
    for entry in excludes:
        if not isinstance(entry, Mapping) or not set(entry) <= set(names):
            raise ConfigError(f"exclude entry {entry!r} must map axis names ({', '.join(names)}) to levels")

    base = data.get("base") or {}
    if not isinstance(base, Mapping):
        raise ConfigError("grid key 'base' must be a mapping (model, data, train, and stage settings)")
    runs, seen = [], {}
    for combo in itertools.product(*(levels for _, levels in axes)):
        labels = {axis: label for (axis, _), (label, _) in zip(axes, combo)}
        if any(all(str(labels[k]) == _label(v) for k, v in entry.items()) for entry in excludes):
            continue
        merged = copy.deepcopy(dict(base))
        for _, overrides in combo:
            for dotted, value in overrides.items():
                set_dotted(merged, dotted, value)
        run_name = "/".join(labels.values()) or name
        sections, stage_settings = split_sections(merged, run_name)
        spec = spec_from_dict(
            sections,
            name=run_name,
            grid=name,
            axes=labels,
            plugins=plugins,
            stages=stage_settings,
            # torchrun's world size: a run trained by N processes has N times the batch
            processes=int(os.environ.get("WORLD_SIZE", "1")),
        )
        if spec.run_id in seen:
            raise ConfigError(
                f"runs {seen[spec.run_id]!r} and {run_name!r} of grid {name!r} are the same "
                f"run (identical settings); make the axes differ or exclude one"
            )
        seen[spec.run_id] = run_name
        runs.append(spec)
    if not runs:
        raise ConfigError(f"grid {name!r} expands to no runs (check its exclude entries)")
    runs = resolve_source_runs(runs, name)
    reference = _check_reference(data.get("reference"), {variant_name(r.axes) or r.name for r in runs})
    return Grid(name, str(data.get("description") or ""), stages, tuple(runs), tuple(names), path, reference)


def resolve_source_runs(runs: list[RunSpec], grid_name: str) -> list[RunSpec]:
    """Each `model.init.from_pretrained: run:<name>` pointed at that run of the grid (with seeds,
    the same seed's run when the name leaves the seed out): its run id enters the run's id, and
    the two models are checked to fit (same shape and tokenizer) now, before anything trains."""
    by_name = {spec.name: spec for spec in runs}
    resolved = []
    for spec in runs:
        init = spec.model.init
        if init is None or init.source_run is None:
            resolved.append(spec)
            continue
        where = f"run {spec.name!r}: model.init.from_pretrained {init.from_pretrained!r}"
        candidates = [init.source_run, f"{init.source_run}/{spec.axes.get(SEED_AXIS, '')}"]
        source = next((by_name[c] for c in candidates if c in by_name), None)
        if source is None:
            known = ", ".join(by_name)
            raise ConfigError(f"{where}: the grid {grid_name!r} has no run of that name; its runs: {known}")
        if source.model.init is not None and source.model.init.source_run is not None:
            raise ConfigError(f"{where}: its source starts from another run itself; chains of runs are not supported")
        if source.model.init is not None and is_transformers_source(source.model.init):
            # Such a run is saved as its recipe over the transformers model (harness.postlin.start),
            # which a second conversion cannot start from.
            raise ConfigError(
                f"{where}: its source is converted from the transformers model "
                f"{source.model.init.from_pretrained!r}; a `run:` source must be a harness model (trained "
                "from scratch or converted from one). Start from that model.init.from_pretrained instead"
            )
        check_compatible(source.model, spec.model, where)
        if (source.data.source, source.data.tokenizer) != (spec.data.source, spec.data.tokenizer):
            raise ConfigError(f"{where}: data.source and data.tokenizer must be the source run's (its tokenizer)")
        resolved.append(replace(spec, model=with_source_id(spec.model, source.run_id)))
    ids = [spec.run_id for spec in resolved]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"grid {grid_name!r}: two runs are the same run once their sources are resolved")
    return resolved


def sources_first(runs: list[RunSpec]) -> list[RunSpec]:
    """The runs in their order, except that a run starting from another run comes after it."""
    return sorted(runs, key=lambda spec: spec.model.init is not None and spec.model.init.source_run is not None)


def source_run_id(spec: RunSpec) -> str | None:
    """The id of the run that `spec` starts from, when it starts from one."""
    init = spec.model.init
    return init.source_id if init is not None and init.source_run is not None else None


#: the axis a scale's `seeds` adds; reports average over it
SEED_AXIS = "seed"


def variant_name(axes: Mapping[str, str]) -> str:
    """A run's name without its seed: what seeds of one configuration share (and what a grid's
    reference values are keyed by)."""
    return "/".join(str(level) for axis, level in axes.items() if axis != SEED_AXIS)


def _check_reference(reference: Any, run_names: set[str]) -> dict | None:
    if reference is None:
        return None
    if not isinstance(reference, Mapping) or set(reference) != set(REFERENCE_KEYS):
        raise ConfigError(f"grid key 'reference' must have exactly the keys {', '.join(REFERENCE_KEYS)}")
    values = reference["values"]
    if not isinstance(values, Mapping) or not all(isinstance(v, (int, float)) for v in values.values()):
        raise ConfigError("reference.values must map run names to numbers")
    unknown = sorted(set(values) - run_names)
    if unknown:
        raise ConfigError(
            f"reference.values names runs {unknown} that the grid does not have; "
            f"its runs: {', '.join(sorted(run_names))}"
        )
    return dict(reference)


def load_grid(path: str | Path, extra_plugins: tuple[str, ...] = (), scale: str | None = None) -> Grid:
    path = Path(path)
    return expand_grid(load_grid_data(path), path.stem, str(path), extra_plugins, scale)


def filter_runs(runs: tuple[RunSpec, ...], where: list[str]) -> tuple[RunSpec, ...]:
    """Keep runs whose axes match every `axis=level` (levels may be comma-separated alternatives)."""
    conditions = []
    for clause in where:
        if "=" not in clause:
            raise ConfigError(f"--where expects axis=level (e.g. variant=regla); got {clause!r}")
        axis, levels = clause.split("=", 1)
        conditions.append((axis.strip(), set(levels.split(","))))
    axis_names = set().union(*(r.axes for r in runs)) if runs else set()
    for axis, _ in conditions:
        if axis not in axis_names:
            raise ConfigError(f"--where: unknown axis {axis!r}; this grid's axes: {', '.join(sorted(axis_names))}")
    return tuple(r for r in runs if all(str(r.axes.get(a)) in levels for a, levels in conditions))
