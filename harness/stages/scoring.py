"""The eval stage: scores the trained model with lm-eval (harness.evaluate)."""

from __future__ import annotations

import json
from typing import Any

from ..config import EvalConfig
from ..distributed import distributed_context, pick_device
from ..postlin.start import load_trained
from ..spec import RunSpec
from .base import Stage, StageContext

#: result columns an evaluation row fills itself; anything else goes into the `extra` JSON column
ROW_FIELDS = frozenset({"metric", "value", "stderr", "step", "split", "task", "shots", "status", "error"})


class EvalStage(Stage):
    name = "eval"
    requires = ("train",)
    config_class = EvalConfig

    def run(self, spec: RunSpec, ctx: StageContext) -> list[dict[str, Any]]:
        # lm-eval's model and task machinery take ~2 s to import: only processes that score pay it.
        from ..evaluate import evaluate_model

        device = pick_device(distributed_context(), ctx.device)
        model, _ = load_trained(ctx.model_dir, map_location=device)
        tokenizer = ctx.data_for(spec).tokenizer
        raw_dir = ctx.run_dir / f"eval-{spec.stage_id(self.name)}-lm_eval" if ctx.is_main else None
        rows = evaluate_model(model.to(device), tokenizer, self.settings(spec), raw_dir=raw_dir)
        return [eval_record(row) for row in rows]


def eval_record(row: dict[str, Any]) -> dict[str, Any]:
    """An evaluation row as a result record: unknown keys go into the `extra` JSON column."""
    record = {k: row[k] for k in ROW_FIELDS if k in row}
    extra = {k: v for k, v in row.items() if k not in ROW_FIELDS}
    if extra:
        record["extra"] = json.dumps(extra, sort_keys=True, default=str)
    if record.get("metric") is None:
        record["metric"] = "error" if row.get("status") == "failed" else "value"
    return record
