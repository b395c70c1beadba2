"""Runs a grid's stages over its RunSpecs: idempotent, resumable, failure-tolerant.

Layout of a run directory (`<runs_dir>/<grid>/<run_id>/`):
    spec.json                    the normalised spec
    <stage>-<stage_id>.parquet   that stage's rows (its presence means the stage ended, ok or failed)
    <stage>-<stage_id>.log       the traceback of a failed stage
    training_state.pt            the resume point while training is unfinished
    model/                       the trained model (config.json + model.pt)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from registry import RegistryError

from .atomic import atomic_write_bytes, atomic_write_text
from .config import ConfigError
from .data import DataError, hub_downloads
from .distributed import DistributedContext, distributed_context, pick_device
from .grid import Grid, sources_first
from .measure import release_device_memory
from .postlin.start import SourceMissing
from .progress import bar as progress_bar
from .progress import say
from .results import advice_of, environment, make_rows, read_rows_or_set_aside, stage_failures, write_rows
from .spec import RunSpec
from .stages import STAGES, StageContext, StageNotApplicable
from .tracking import TrackingOptions
from .train import Diverged


@dataclass(frozen=True)
class StageResult:
    run: RunSpec
    stage: str
    #: ok | partial | failed | skipped-done | skipped-partial | skipped-failed | skipped-rank | skipped-busy
    status: str
    error: str = ""
    #: what to do about a failure (fits its cause: fix the grid, provide data, or retry)
    advice: str = ""

    @property
    def needs_attention(self) -> bool:
        """Failed or partial, now or in an earlier invocation: what makes `run` exit non-zero."""
        return self.status in ("failed", "partial", "skipped-failed", "skipped-partial")


def run_dir(runs_dir: Path, spec: RunSpec) -> Path:
    return Path(runs_dir) / spec.grid / spec.run_id


def result_path(runs_dir: Path, grid: str, run_id: str, stage: str, stage_id: str) -> Path:
    """Where a stage's result file lives (the layout in this module's docstring)."""
    return Path(runs_dir) / grid / run_id / f"{stage}-{stage_id}.parquet"


def stage_path(runs_dir: Path, spec: RunSpec, stage: str) -> Path:
    return result_path(runs_dir, spec.grid, spec.run_id, stage, spec.stage_id(stage))


@dataclass(frozen=True)
class Restored:
    grids: tuple[str, ...]
    runs: int
    written: int
    kept: int


def restore_results(parquet: Path, runs_dir: Path) -> Restored:
    """Write the rows of a report's results.parquet back into run folders: one result file per
    (run, stage) and each run's spec.json, as the runs wrote them. A grid finished in part on one
    machine then resumes on another (`run` skips the restored stages; a stage that needs a
    trained model still needs its run folder's model, which rows do not carry). Result files that
    already exist are kept, never overwritten."""
    table = pq.read_table(parquet)  # pyarrow, not pandas: the row types round-trip unchanged
    missing = [c for c in ("run_id", "grid", "stage", "stage_id", "spec_json") if c not in table.column_names]
    if missing:
        raise ValueError(f"{parquet} is not a results file of this harness: it has no column(s) {', '.join(missing)}")
    keys = table.select(["grid", "run_id", "stage", "stage_id"]).to_pandas().drop_duplicates()
    written = kept = 0
    for grid, run_id, stage, stage_id in keys.itertuples(index=False):
        path = result_path(runs_dir, grid, run_id, stage, stage_id)
        if path.exists():
            kept += 1
            continue
        mask = pc.and_(pc.equal(table["run_id"], run_id), pc.equal(table["stage_id"], stage_id))
        rows = table.filter(pc.and_(mask, pc.equal(table["stage"], stage)))
        # Axis columns of other runs (all null here) are left out, as in the run's own file.
        rows = rows.select([c for c in rows.column_names if not c.startswith("axis:") or rows[c].null_count == 0])
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path.parent / "spec.json").exists():
            atomic_write_text(path.parent / "spec.json", rows["spec_json"][0].as_py())
        atomic_write_bytes(path, lambda tmp, rows=rows: pq.write_table(rows, tmp))
        written += 1
    grids = tuple(sorted(set(keys["grid"])))
    return Restored(grids, keys["run_id"].nunique(), written, kept)


#: what to do about a stage whose evaluation tasks partly failed
PARTIAL_ADVICE = "--retry-failed runs its failed tasks again"


def stage_status(runs_dir: Path, spec: RunSpec, stage: str) -> tuple[str, str]:
    """("done" | "partial" | "failed" | "pending", error text) from the stage's result file;
    "partial": the stage ran but some of its tasks failed (e.g. an evaluation task without data).
    A result file that cannot be read is set aside (renamed, kept) and the stage is pending again."""
    status, error, _ = stage_outcome(runs_dir, spec, stage)
    return status, error


def stage_outcome(runs_dir: Path, spec: RunSpec, stage: str) -> tuple[str, str, str]:
    """`stage_status` and the advice recorded with a failure, from one read of the result file."""
    path = stage_path(runs_dir, spec, stage)
    if not path.is_file():
        return "pending", "", ""
    frame = read_rows_or_set_aside(path)
    if frame is None:
        return "pending", "", ""
    failed = stage_failures(frame)
    if len(failed):
        return "failed", str(failed["error"].iloc[0]), advice_of(failed["extra"].iloc[0])
    failed_tasks = frame[frame["status"] == "failed"]
    if len(failed_tasks):
        return "partial", "; ".join(sorted(set(failed_tasks["error"].astype(str)))), PARTIAL_ADVICE
    return "done", "", ""


def describe_failure(exc: BaseException) -> str:
    """One line a researcher can act on: divergence, out-of-memory, or the exception."""
    if is_out_of_memory(exc):
        return f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def failure_advice(exc: BaseException, log: Path) -> tuple[str, str]:
    """(kind, advice) for a failed stage: what to do about it depends on its cause, since
    `--retry-failed` only helps where the same settings can succeed on a second try."""
    if isinstance(exc, StageNotApplicable):
        return "not applicable", exc.advice
    if isinstance(exc, (ConfigError, RegistryError)) or type(exc) is ValueError:
        return "configuration", "fix the grid file (the error names the setting), then run again"
    if isinstance(exc, DataError):
        return "data", "provide the data the error names (make data, or the source's options), then --retry-failed"
    if isinstance(exc, (Diverged, FloatingPointError)):
        settings = getattr(exc, "settings", "train.lr or raise train.warmup_steps")
        return "diverged", (
            f"the loss became non-finite: lower {settings} in the grid (the same settings diverge again)"
        )
    if is_out_of_memory(exc):
        return "out of memory", (
            "lower train.batch_size (raise train.grad_accum to keep the batch) or use a larger device, "
            "then --retry-failed"
        )
    if isinstance(exc, MissingPrerequisite):
        return "prerequisite", "run the stages it needs first (they failed or have not run)"
    if isinstance(exc, SourceMissing):
        return "prerequisite", "train the source run it starts from first (the error names it), then --retry-failed"
    return "error", f"--retry-failed runs it again; the traceback is in {log}"


class MissingPrerequisite(RuntimeError):
    """A stage whose required stages have not succeeded."""


@contextlib.contextmanager
def run_lock(directory: Path, dist: DistributedContext) -> Iterator[bool]:
    """Hold `<run dir>/.lock` while this process works on the run; yields False when another
    process holds it (two `run`s of one grid then share the runs instead of training each twice).
    Under torchrun rank 0 takes the lock and tells the other ranks whether it got it."""
    handle = None
    held = True
    if dist.is_main:
        handle = open(directory / ".lock", "w")  # closed in the finally below
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = False
    if dist.world_size > 1:
        decision = [held]
        torch.distributed.broadcast_object_list(decision, src=0)
        held = decision[0]
    try:
        yield held
    finally:
        if handle is not None:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def check_writable(directory: str | Path, what: str) -> None:
    """An output directory (or, before it exists, the nearest existing folder above it) must be
    writable: found before anything trains, not after the whole grid has. Writes nothing."""
    directory = Path(directory).absolute()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == directory else f" ({str(existing)!r}, where it would be created)"
        raise ConfigError(
            f"{what} {str(directory)!r} is not writable{where}; choose another with --{what.split()[0]}-dir"
        )


def check_data_fits(spec: RunSpec, data: Any, stages: Iterable[str]) -> None:
    """Every split a stage reads holds at least one window of `train.seq_len + 1` tokens, checked
    before anything trains, naming the split, its size and the fix."""
    window = spec.train.seq_len + 1
    needed = {"train": "training batches", "validation": "validation loss"}
    if "probe" in stages:
        needed["validation"] += " and gate probes"
    for split, use in needed.items():
        tokens = len(data.split(split))
        if tokens < window:
            raise DataError(
                f"run {spec.name!r}: the {split} split of data source {spec.data.source!r} "
                f"{dict(spec.data.options) or ''} has {tokens} tokens, but {use} need one window of "
                f"train.seq_len + 1 = {window} tokens. Give the source more text (`text-files` holds out "
                f"about 1 file in 10 for validation and test, so it needs at least 3 files) or lower train.seq_len."
            )


def preflight(
    runs: Iterable[RunSpec],
    stages: Iterable[str],
    *,
    runs_dir: str | Path,
    results_dir: str | Path | None,
    device: str,
    data_cache: dict,
    dry_run: bool = False,
) -> list[str]:
    """Everything that can be checked before compute: output directories, the device, and that
    every run's data fills the windows its stages read. Data prepared here is kept in
    `data_cache` for the run itself. Raises ConfigError / DataError naming the problem.

    `dry_run`: download nothing. Data that preparing would download from the Hugging Face hub (a
    hub tokenizer or dataset) is not checked; the returned notes say which, and why (empty when
    every run's data was checked). A real run checks it all, strictly."""
    stages = list(stages)
    check_writable(runs_dir, "runs directory")
    if results_dir is not None:
        check_writable(results_dir, "results directory")
    pick_device(distributed_context(), device)
    if not {"train", "probe"} & set(stages):
        return []
    unchecked: dict[str, list[str]] = {}
    for spec in runs:
        downloads = hub_downloads(spec.data.source, spec.data.tokenizer, dict(spec.data.options)) if dry_run else []
        if downloads:
            unchecked.setdefault(" and ".join(downloads), []).append(spec.name)
            continue
        context = StageContext(Path(runs_dir), device, False, data_cache)
        check_data_fits(spec, context.data_for(spec), stages)
    return [
        f"data not checked for {len(names)} run(s) ({', '.join(names)}): preparing it downloads {what} from "
        "the Hugging Face hub, which a dry run does not do; `run` (or prepare-data) checks it before training"
        for what, names in unchecked.items()
    ]


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
    data_cache: dict | None = None,
    tracking: TrackingOptions | None = None,
) -> list[StageResult]:
    """Run each stage of each spec unless its result already exists.

    `data_cache`: prepared data by source and tokenizer, shared with `preflight`. `tracking`:
    mirror training curves to a tracker (harness.tracking); off by default."""
    # A run that starts from another run's model (model.init: run:<name>) waits for it.
    runs = sources_first(list(runs))
    stages = list(stages or grid.stages)
    runs_dir = Path(runs_dir)
    # Under torchrun every rank walks the same grid; only rank 0 writes, and the ranks meet after
    # each stage so that all of them read the same results when deciding what to skip.
    dist = distributed_context()
    progress = progress and dist.is_main
    env = environment()
    data_cache = {} if data_cache is None else data_cache
    results: list[StageResult] = []
    bar = progress_bar(runs, desc=f"grid {grid.name}", unit="run", enabled=progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        directory = run_dir(runs_dir, spec)
        if dist.is_main:
            directory.mkdir(parents=True, exist_ok=True)
        with run_lock(directory, dist) as held:
            if not held:
                # Another process (another `run` of this grid) is on this run: leave it to it.
                results += [StageResult(spec, s, "skipped-busy") for s in stages]
                if progress:
                    say(f"[busy] {spec.name}: another process is running it; skipped here")
                continue
            if dist.is_main:
                atomic_write_text(directory / "spec.json", spec.to_json())
            ctx = StageContext(directory, device, progress, data_cache, is_main=dist.is_main, tracking=tracking)
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
    status, error, advice = stage_outcome(runs_dir, spec, stage_name)
    if status == "done" and not force:
        return StageResult(spec, stage_name, "skipped-done")
    if status == "partial" and not (force or retry_failed):
        return StageResult(spec, stage_name, "skipped-partial", error, advice)
    if status == "failed" and not (force or retry_failed):
        return StageResult(spec, stage_name, "skipped-failed", error, advice)
    if not is_main and not stage.distributed:
        return StageResult(spec, stage_name, "skipped-rank")
    missing = [r for r in stage.requires if stage_status(runs_dir, spec, r)[0] != "done"]
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    try:
        if missing:
            raise MissingPrerequisite(f"stage {stage_name!r} needs {', '.join(missing)} to have succeeded first")
        records = stage.run(spec, ctx)
        failed_tasks = sorted({str(r.get("error")) for r in records if r.get("status") == "failed"})
        result = (
            StageResult(spec, stage_name, "partial", "; ".join(failed_tasks), "see each task's error")
            if failed_tasks
            else StageResult(spec, stage_name, "ok")
        )
    except Exception as exc:  # a failed cell is recorded and the grid goes on
        error = describe_failure(exc)
        log = stage_path(runs_dir, spec, stage_name).with_suffix(".log")
        kind, advice = failure_advice(exc, log)
        if is_main:
            atomic_write_text(log, traceback.format_exc())
        extra = json.dumps({"failure_kind": kind, "advice": advice})
        records = [{"metric": "error", "status": "failed", "error": error, "extra": extra}]
        result = StageResult(spec, stage_name, "failed", error, advice)
        if progress:
            say(f"[failed] {spec.name} {stage_name}: {error} ({kind}: {advice})")
    # Outside the handler, where the exception and its frames are unreachable: free them now, not
    # when the collector next runs, so that the next stage or run gets the memory back.
    release_device_memory()
    if is_main:
        write_rows(stage_path(runs_dir, spec, stage_name), make_rows(spec, stage_name, records, env, created))
    return result
