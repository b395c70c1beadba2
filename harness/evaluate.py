"""Score a live model with lm-eval and flatten the results into long rows.

    rows = evaluate_model(model, tokenizer, EvalConfig(tasks=["table5"], num_fewshot=[0, 5]))

Each (task, shots) pair is its own lm-eval run, so a task whose data cannot be loaded becomes one
row with status "failed" -- naming the task and how to provide its data -- while the others go on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval.tasks import TaskManager

from .atomic import atomic_write_text
from .config import EvalConfig
from .data.tokenization import Tokenizer
from .lm_eval_model import ReGLALM
from .model import LanguageModel
from .tasks import (
    PAPER_TASKS,
    data_layout,
    offline_suite_dir,
    write_offline_task_yaml,
    write_paper_task_yaml,
)


def evaluate_model(
    model: LanguageModel, tokenizer: Tokenizer, config: EvalConfig, raw_dir: Path | None = None
) -> list[dict[str, Any]]:
    """One row per (task, shots, metric); one failed row per (task, shots) that could not run.

    `raw_dir`: where lm-eval's own results JSON of each (task, shots) goes, `<task>-<shots>shot.json`
    (with the per-sample log when `config.log_samples`), beside the rows made from it."""
    lm = ReGLALM(model=model, tokenizer=tokenizer, batch_size=config.batch_size)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="regla-lm-eval-tasks-") as tmp:
        yaml_dir = Path(tmp)
        setup_errors = write_task_yamls(config, yaml_dir)
        # Only the generated files are indexed: scanning lm-eval's whole task tree costs ~11 s.
        manager = TaskManager(include_path=str(yaml_dir), include_defaults=False)
        for task in config.resolved_tasks():
            for shots in config.shots_for(task):
                if task in setup_errors:
                    rows.append(failed_row(task, shots, setup_errors[task], config))
                    continue
                try:
                    results = run_lm_eval(lm, manager, task, shots, config)
                except Exception as exc:  # noqa: BLE001 -- any task failure becomes a row; the grid goes on
                    rows.append(failed_row(task, shots, describe_task_failure(task, exc, config), config))
                    continue
                if raw_dir is not None:
                    raw = json.dumps(results, indent=1, sort_keys=True, default=str)
                    atomic_write_text(Path(raw_dir) / f"{task}-{shots}shot.json", raw)
                rows.extend(result_rows(results, task, shots, config))
    return rows


def write_task_yamls(config: EvalConfig, yaml_dir: Path) -> dict[str, str]:
    """Write each task's YAML into yaml_dir; returns {task: error} for those that cannot be set up."""
    errors: dict[str, str] = {}
    suite_dir = None
    for task in config.resolved_tasks():
        try:
            if task in PAPER_TASKS:
                write_paper_task_yaml(task, yaml_dir, Path(config.data_dir) if config.data_dir else None)
            else:
                suite_dir = suite_dir or offline_suite_dir(config.data_dir)
                write_offline_task_yaml(task, yaml_dir, suite_dir)
        except Exception as exc:  # noqa: BLE001 -- reported as the task's failed row
            errors[task] = describe_task_failure(task, exc, config)
    return errors


def describe_task_failure(task: str, exc: BaseException, config: EvalConfig) -> str:
    message = f"task {task}: {type(exc).__name__}: {exc}"
    if task in PAPER_TASKS and f"{PAPER_TASKS[task].folder}/" not in str(exc):
        message += (
            f". To score it from local files, set data_dir (the grid file's `eval: {{data_dir: ...}}`) and "
            f"{data_layout(PAPER_TASKS[task], config.data_dir or '<data-dir>')}"
        )
    return message


@contextlib.contextmanager
def _bootstrap_in_process() -> Iterator[None]:
    # lm-eval resamples perplexities in a pool of cpu_count() processes; for the few hundred items
    # scored here starting the pool costs more than the resampling itself.
    previous = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = previous


def run_lm_eval(lm: ReGLALM, manager: TaskManager, task: str, shots: int, config: EvalConfig) -> dict:
    with _bootstrap_in_process():
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=manager,
            num_fewshot=shots,
            limit=config.limit,
            bootstrap_iters=config.bootstrap_iters,
            log_samples=config.log_samples,
            random_seed=config.seed,
            numpy_random_seed=config.seed,
            torch_random_seed=config.seed,
            fewshot_random_seed=config.seed,
        )


def _common(task: str, shots: int, config: EvalConfig) -> dict[str, Any]:
    return {
        "task": task,
        "requested_shots": shots,
        "limit": config.limit,
        "seed": config.seed,
        "lm_eval_version": lm_eval.__version__,
    }


def result_rows(results: dict, task: str, shots: int, config: EvalConfig) -> list[dict[str, Any]]:
    metrics = results["results"][task]
    base = {
        **_common(task, shots, config),
        # lm-eval keeps a task's own num_fewshot when it pins it to 0 (truthfulqa): report what ran.
        "shots": results["n-shot"].get(task, shots),
        "task_version": results["versions"].get(task),
        "max_length": results["config"].get("max_length"),
        "tokenizer": results["config"].get("tokenizer"),
        "samples": results.get("n-samples", {}).get(task, {}).get("effective"),
        "status": "ok",
        "error": None,
    }
    rows = []
    for key, value in metrics.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filter_name = key.split(",", 1)
        stderr = metrics.get(f"{metric}_stderr,{filter_name}")
        rows.append(
            {
                **base,
                "metric": metric if filter_name == "none" else key,
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
            }
        )
    return rows


def failed_row(task: str, shots: int, error: str, config: EvalConfig) -> dict[str, Any]:
    return {
        **_common(task, shots, config),
        "shots": shots,
        "task_version": None,
        "max_length": None,
        "tokenizer": None,
        "samples": None,
        "status": "failed",
        "error": error,
        "metric": None,
        "value": None,
        "stderr": None,
    }
