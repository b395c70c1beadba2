"""A grid's pending runs as a Slurm job array, through submitit (the optional `cluster` extra).

Each array task runs exactly one run with the same command a `--gpus` worker uses
(`run <grid> --only-run <run id>`), so skipping, resume, failure rows and the per-run lock are
those of a sequential run, and the results land in the same runs folder (which must be on a
filesystem the cluster's nodes share). Once the array is done, `report <grid>` (or `run <grid>`
again, which skips what is done) writes the report.

    python run_ablations.py run paper/ablation --submit slurm --slurm-partition gpu \\
        --slurm-time 240 --gpus-per-run 1 --array-parallelism 8

`--submit local` runs the same array on this machine through submitit's local executor (what
the tests use).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .executor import WorkerOptions, outcome
from .grid import source_run_id
from .runner import StageResult, stage_status
from .spec import RunSpec


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how the array runs; the Slurm fields are ignored by the local executor."""

    backend: str = "slurm"  # slurm | local
    folder: str = "runs/submitit"  # submitit's logs and pickles
    partition: str | None = None
    time_minutes: int = 240
    gpus_per_run: int = 1
    cpus_per_run: int = 8
    parallelism: int = 16  # tasks of the array running at once


def run_worker(command: list[str]) -> int:
    """One array task: one run through the `run` command line; its exit code."""
    return subprocess.run(command, check=False).returncode


def pending_runs(runs: Iterable[RunSpec], options: WorkerOptions) -> list[RunSpec]:
    """Runs with a stage not done yet (or every run, with --force / --retry-failed as asked)."""
    wanted = []
    for spec in runs:
        states = [stage_status(Path(options.runs_dir), spec, stage)[0] for stage in options.stages]
        if options.force or any(s == "pending" for s in states):
            wanted.append(spec)
        elif options.retry_failed and any(s in ("failed", "partial") for s in states):
            wanted.append(spec)
    return wanted


def check_no_source_in_array(runs: list[RunSpec]) -> None:
    """An array's tasks start in any order: a run starting from another run of the same array
    (model.init: run:<name>) could start before its source has trained, so it is refused."""
    ids = {spec.run_id for spec in runs}
    waiting = [spec.name for spec in runs if source_run_id(spec) in ids]
    if waiting:
        raise ValueError(
            f"runs {', '.join(waiting)} start from other runs of this array (model.init: run:...), and array "
            "tasks start in any order: submit their source runs first (e.g. --where init=scratch), then the rest"
        )


def submit(runs: Iterable[RunSpec], options: WorkerOptions, cluster: ClusterOptions, *, wait: bool) -> list:
    """Submit one array task per pending run; with `wait`, block until every task has ended."""
    runs = list(runs)
    check_no_source_in_array(runs)
    try:
        import submitit  # optional: pip install -e '.[cluster]'
    except ImportError as exc:
        raise ValueError("--submit needs submitit: pip install -e '.[cluster]' (or pip install submitit)") from exc
    if cluster.backend not in ("slurm", "local"):
        raise ValueError(f"--submit must be slurm or local; got {cluster.backend!r}")
    if cluster.backend == "local":
        executor = submitit.LocalExecutor(folder=cluster.folder)
        executor.update_parameters(timeout_min=cluster.time_minutes)
    else:
        executor = submitit.AutoExecutor(folder=cluster.folder, cluster="slurm")
        executor.update_parameters(
            timeout_min=cluster.time_minutes,
            gpus_per_node=cluster.gpus_per_run,
            cpus_per_task=cluster.cpus_per_run,
            slurm_array_parallelism=cluster.parallelism,
            **({"slurm_partition": cluster.partition} if cluster.partition else {}),
        )
    jobs = executor.map_array(run_worker, [options.command(spec.run_id) for spec in runs])
    if wait:
        for job in jobs:
            job.result()
    return jobs


def submitted_outcome(runs: Iterable[RunSpec], options: WorkerOptions, jobs: list) -> list[StageResult]:
    """The finished array's stages, read from the run directories (as `--gpus` reads them)."""
    codes = [job.result() for job in jobs]
    return [result for spec, code in zip(runs, codes) for result in outcome(spec, options, code)]
