"""The stages a grid can run on each RunSpec. Each stage reads the spec (and what earlier
stages left in the run directory) and returns metric records; the runner turns them into rows.

Adding a stage: subclass `Stage`, give it a `config_class` (its settings in the grid file, under
the stage's name, hashed into its own stage id), and `register_stage` an instance. It only adds
rows; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spec import RunSpec, TrainConfig


@dataclass
class StageContext:
    """What the runner hands every stage: where to write, which device, shared caches."""

    run_dir: Path
    device: str = "auto"
    progress: bool = True
    data_cache: dict = field(default_factory=dict)
    #: False on the non-zero ranks of a torchrun job: they compute but write nothing
    is_main: bool = True

    def data_for(self, spec: RunSpec) -> Any:
        """Prepared data, shared by all runs of a grid with the same source and tokenizer."""
        from .data import prepare_data

        key = (spec.data.source, spec.data.tokenizer, repr(sorted(spec.data.options.items())))
        if key not in self.data_cache:
            self.data_cache[key] = prepare_data(spec.data.source, spec.data.tokenizer, dict(spec.data.options))
        return self.data_cache[key]

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


class Stage:
    name: str = ""
    #: the stage's settings, read strictly from the grid file under the stage's name
    config_class: type = type(None)
    #: stages whose successful result this stage needs
    requires: tuple[str, ...] = ()
    #: True when every rank of a torchrun job takes part (DDP training); else rank 0 runs it alone
    distributed: bool = False

    def settings(self, spec: RunSpec) -> Any:
        from .config import from_dict

        return from_dict(self.config_class, spec.stages.get(self.name, {}), self.name)

    def run(self, spec: RunSpec, ctx: StageContext) -> list[dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError


class TrainStage(Stage):
    """Trains the model; its settings are the spec's `train:` section (part of the run id)."""

    name = "train"
    config_class = TrainConfig
    distributed = True

    def settings(self, spec: RunSpec) -> TrainConfig:
        return spec.train

    def run(self, spec: RunSpec, ctx: StageContext) -> list[dict[str, Any]]:
        from .checkpoint_io import save_checkpoint
        from .train import train

        data = ctx.data_for(spec)
        model, records = train(spec, data, ctx.run_dir, device=ctx.device, progress=ctx.progress)
        if ctx.is_main:
            save_checkpoint(model, spec.data.tokenizer, ctx.model_dir, tokenizer_source=spec.data.source)
            (ctx.run_dir / "training_state.pt").unlink(missing_ok=True)
        return records


class LazyConfigStage(Stage):
    """A stage whose settings class lives in a module that is only imported when needed."""

    config_module: str = ""
    config_name: str = ""

    @property
    def config_class(self) -> type:  # type: ignore[override]
        import importlib

        return getattr(importlib.import_module(self.config_module), self.config_name)


class EvalStage(LazyConfigStage):
    """Scores the trained model with lm-eval (harness.evaluate)."""

    name = "eval"
    requires = ("train",)
    config_module, config_name = "harness.evaluate", "EvalConfig"

    def run(self, spec: RunSpec, ctx: StageContext) -> list[dict[str, Any]]:
        from .checkpoint_io import load_checkpoint
        from .evaluate import evaluate_model
        from .train import distributed_context, pick_device

        device = pick_device(distributed_context(), ctx.device)
        model, _ = load_checkpoint(ctx.model_dir, map_location=device)
        tokenizer = ctx.data_for(spec).tokenizer
        rows = evaluate_model(model.to(device), tokenizer, self.settings(spec))
        return [_eval_record(row) for row in rows]


def _eval_record(row: dict[str, Any]) -> dict[str, Any]:
    """An evaluation row as a result record: unknown keys go into the `extra` JSON column."""
    import json

    core = {"metric", "value", "stderr", "step", "split", "task", "shots", "status", "error"}
    record = {k: row[k] for k in core if k in row}
    extra = {k: v for k, v in row.items() if k not in core}
    if extra:
        record["extra"] = json.dumps(extra, sort_keys=True, default=str)
    if record.get("metric") is None:
        record["metric"] = "error" if row.get("status") == "failed" else "value"
    return record


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    if stage.name in STAGES:
        raise ValueError(f"duplicate stage name {stage.name!r}")
    STAGES[stage.name] = stage
    return stage


register_stage(TrainStage())
register_stage(EvalStage())

# Stages kept in modules of their own import this one, so they are registered once it is complete.
from . import probes  # noqa: E402

register_stage(probes.ProbeStage())

from . import profile  # noqa: E402

register_stage(profile.ProfileStage())
