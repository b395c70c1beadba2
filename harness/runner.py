"""Runs a grid's stages over its RunSpecs: idempotent, resumable, failure-tolerant.

Layout of a run directory (`<runs_dir>/<grid>/<run_id>/`):
    spec.json                    the normalised spec
    <stage>-<stage_id>.parquet   that stage's rows (its presence means the stage ended, ok or failed)
    <stage>-<stage_id>.log       the traceback of a failed stage
    training_state.pt            the resume point while training is unfinished
    model/                       the trained model (config.json + model.pt)
"""

from __future__ import annotations

import datetime as dt
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .distributed import distributed_context
from .grid import Grid
from .results import environment, make_rows, read_rows, stage_failures, write_rows
from .spec import RunSpec
from .stages import STAGES, StageContext


@dataclass(frozen=True)
class StageResult:
    run: RunSpec
    stage: str
    status: str  # ok | failed | skipped-done | skipped-partial | skipped-failed | skipped-rank
    error: str = ""


def run_dir(runs_dir: Path, spec: RunSpec) -> Path:
    return Path(runs_dir) / spec.grid / spec.run_id


def stage_path(runs_dir: Path, spec: RunSpec, stage: str) -> Path:
    return run_dir(runs_dir, spec) / f"{stage}-{spec.stage_id(stage)}.parquet"


def stage_status(runs_dir: Path, spec: RunSpec, stage: str) -> tuple[str, str]:
    """("done" | "partial" | "failed" | "pending", error text) from the stage's result file;
    "partial": the stage ran but some of its tasks failed (e.g. an evaluation task without data)."""
    path = stage_path(runs_dir, spec, stage)
    if not path.is_file():
        return "pending", ""
    frame = read_rows(path)
    failed = stage_failures(frame)
    if len(failed):
        return "failed", str(failed["error"].iloc[0])
    failed_tasks = frame[frame["status"] == "failed"]
    if len(failed_tasks):
        return "partial", "; ".join(sorted(set(failed_tasks["error"].astype(str))))
    return "done", ""


def describe_failure(exc: BaseException) -> str:
    """One line a researcher can act on: divergence, out-of-memory, or the exception."""
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"


def run_grid(
    grid: Grid,
    runs: Iterable[RunSpec],
    *,
    stages: Iterable[str] | None = None,
    runs_dir: str | Path = "runs",
    force: bool = False,
    retry_failed: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> list[StageResult]:
    """Run each stage of each spec unless its result already exists."""
    runs = list(runs)
    stages = list(stages or grid.stages)
    runs_dir = Path(runs_dir)
    # Under torchrun every rank walks the same grid; only rank 0 writes, and the ranks meet after
    # each stage so that all of them read the same results when deciding what to skip.
    dist = distributed_context()
    progress = progress and dist.is_main
    env = environment()
    data_cache: dict = {}
    results: list[StageResult] = []
    bar = tqdm(runs, desc=f"grid {grid.name}", unit="run", disable=not progress, dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        directory = run_dir(runs_dir, spec)
        if dist.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(directory / "spec.json", spec.to_json())
        ctx = StageContext(directory, device, progress, data_cache, is_main=dist.is_main)
        for stage_name in stages:
            result = _run_stage(
                STAGES[stage_name], spec, ctx, runs_dir, force, retry_failed, env, progress, dist.is_main
            )
            results.append(result)
            dist.barrier()
    return results


def _run_stage(
    stage,
    spec: RunSpec,
    ctx: StageContext,
    runs_dir: Path,
    force: bool,
    retry_failed: bool,
    env: dict,
    progress: bool,
    is_main: bool,
) -> StageResult:
    """One stage of one run: skipped when its result exists, else run and recorded (ok or failed)."""
    stage_name = stage.name
    status, error = stage_status(runs_dir, spec, stage_name)
    if status == "done" and not force:
        return StageResult(spec, stage_name, "skipped-done")
    if status == "partial" and not (force or retry_failed):
        return StageResult(spec, stage_name, "skipped-partial", error)
    if status == "failed" and not (force or retry_failed):
        return StageResult(spec, stage_name, "skipped-failed", error)
    if not is_main and not stage.distributed:
        return StageResult(spec, stage_name, "skipped-rank")
    missing = [r for r in stage.requires if stage_status(runs_dir, spec, r)[0] != "done"]
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    try:
        if missing:
            raise RuntimeError(f"stage {stage_name!r} needs {', '.join(missing)} to have succeeded first")
        records = stage.run(spec, ctx)
        result = StageResult(spec, stage_name, "ok")
    except Exception as exc:  # a failed cell is recorded and the grid goes on
        error = describe_failure(exc)
        if is_main:
            atomic_write_text(stage_path(runs_dir, spec, stage_name).with_suffix(".log"), traceback.format_exc())
        records = [{"metric": "error", "status": "failed", "error": error}]
        result = StageResult(spec, stage_name, "failed", error)
        if progress:
            tqdm.write(f"[failed] {spec.name} {stage_name}: {error}")
    if is_main:
        write_rows(stage_path(runs_dir, spec, stage_name), make_rows(spec, stage_name, records, env, created))
    return result
