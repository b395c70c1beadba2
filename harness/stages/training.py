"""The train stage: trains the model (harness.train) and saves it for the stages after it."""

from __future__ import annotations

from typing import Any

from ..config import TrainConfig
from ..postlin.start import save_trained
from ..spec import RunSpec
from ..train import digest_path, train
from .base import Stage, StageContext


class TrainStage(Stage):
    """Its settings are the spec's `train:` section (part of the run id, not a stage id)."""

    name = "train"
    config_class = TrainConfig
    distributed = True

    def settings(self, spec: RunSpec) -> TrainConfig:
        return spec.train

    def run(self, spec: RunSpec, ctx: StageContext) -> list[dict[str, Any]]:
        data = ctx.data_for(spec)
        tracker = ctx.tracker_for(spec)
        try:
            model, records = train(spec, data, ctx.run_dir, device=ctx.device, progress=ctx.progress, tracker=tracker)
        finally:
            tracker.close(summary={"run": spec.name, "run_id": spec.run_id, "switches": spec.to_json()})
        if ctx.is_main:
            save_trained(model, data.tokenizer, ctx.model_dir, spec.model)
            state = ctx.run_dir / "training_state.pt"
            state.unlink(missing_ok=True)
            digest_path(state).unlink(missing_ok=True)
        return records
