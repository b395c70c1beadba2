"""A grid over several GPUs of one machine: independent runs in parallel, one (or a few) per GPU.

Each run goes to a worker process of its own (`run <grid> --only-run <run id>`), which sees one
GPU (CUDA_VISIBLE_DEVICES) and goes through exactly the code path of a sequential run: the same
stages, skipping, resume, failure rows and per-run lock. When a worker finishes, the next pending
run starts on its GPU. Workers write only their own run's files; this process alone reads the
outcome back and writes the report, so results have one writer as before. A run that needs
several GPUs itself still goes through torchrun (DDP), not through this executor.

Small models leave most of an H200 idle (their kernels are launch-bound), so `runs_per_device`
can put several runs on each GPU at once; each worker still sees exactly one GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .grid import source_run_id
from .progress import bar as progress_bar
from .progress import say
from .runner import StageResult, stage_outcome
from .spec import RunSpec

ENTRY_POINT = Path(__file__).resolve().parent.parent / "run_ablations.py"


@dataclass(frozen=True)
class WorkerOptions:
    """What every worker is told besides its run: the command line of the parent `run`."""

    grid_path: str
    stages: tuple[str, ...]
    runs_dir: str
    device: str = "auto"
    force: bool = False
    retry_failed: bool = False
    plugins: tuple[str, ...] = ()
    scale: str | None = None
    #: `--track NAME` and its folder (None: tracking off)
    track: str | None = None
    track_dir: str | None = None

    def command(self, run_id: str) -> list[str]:
        command = [sys.executable, str(ENTRY_POINT)]
        for plugin in self.plugins:
            command += ["--plugin", plugin]
        command += ["run", self.grid_path, "--only-run", run_id, "--stages", ",".join(self.stages)]
        command += ["--runs-dir", self.runs_dir, "--device", self.device, "--no-report", "--no-progress"]
        if self.force:
            command.append("--force")
        if self.retry_failed:
            command.append("--retry-failed")
        if self.scale:
            command += ["--scale", self.scale]
        if self.track:
            command += ["--track", self.track]
            if self.track_dir:
                command += ["--track-dir", self.track_dir]
        return command


def visible_devices(devices: int) -> list[str]:
    """The first `devices` GPUs this process may use, as CUDA_VISIBLE_DEVICES names them: the
    workers get GPUs from that list (`CUDA_VISIBLE_DEVICES=2,3 run --gpus 2` uses GPUs 2 and 3,
    not 0 and 1), or 0 … devices − 1 where the variable is unset."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None or not listed.strip():
        return [str(i) for i in range(devices)]
    names = [name.strip() for name in listed.split(",") if name.strip()]
    if len(names) < devices:
        raise ValueError(
            f"--gpus {devices} needs {devices} GPUs, and CUDA_VISIBLE_DEVICES={listed!r} makes "
            f"{len(names)} visible; ask for at most {len(names)} or widen CUDA_VISIBLE_DEVICES"
        )
    return names[:devices]


def run_on_devices(
    runs: Iterable[RunSpec],
    options: WorkerOptions,
    devices: int,
    *,
    runs_per_device: int = 1,
    progress: bool = True,
) -> list[StageResult]:
    """Run each spec in a worker process, at most `devices * runs_per_device` at a time; worker
    slot i sees GPU i % devices. Returns the stage results read back from the run directories."""
    if devices < 1:
        raise ValueError(f"--gpus must be a positive number of GPUs; got {devices}")
    if runs_per_device < 1:
        raise ValueError(f"--runs-per-gpu must be a positive number of runs; got {runs_per_device}")
    runs = list(runs)
    visible = visible_devices(devices)
    pending = list(runs)
    active: dict[int, tuple[subprocess.Popen, RunSpec]] = {}
    exit_codes: dict[str, int] = {}
    bar = progress_bar(total=len(runs), desc="runs", unit="run", enabled=progress)
    while pending or active:
        for slot in range(devices * runs_per_device):
            if slot in active:
                continue
            spec = next_ready(pending, active)
            if spec is not None:
                pending.remove(spec)
                gpu = visible[slot % devices]
                # The worker sees one GPU, as cuda:0; CPU-only machines ignore the variable.
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
                active[slot] = (subprocess.Popen(options.command(spec.run_id), env=env), spec)
                if progress:
                    say(f"[gpu {gpu}] {spec.name} ({spec.run_id})")
        for slot, (process, spec) in list(active.items()):
            code = process.poll()
            if code is not None:
                exit_codes[spec.run_id] = code
                del active[slot]
                bar.update(1)
        time.sleep(0.2)
    bar.close()
    return [result for spec in runs for result in outcome(spec, options, exit_codes.get(spec.run_id, 0))]


def next_ready(pending: list[RunSpec], active: dict[int, tuple[subprocess.Popen, RunSpec]]) -> RunSpec | None:
    """The first pending run whose source run (model.init: run:<name>) is neither pending nor
    still running: a converted run starts once its source has finished."""
    unfinished = {spec.run_id for spec in pending} | {spec.run_id for _, spec in active.values()}
    return next((spec for spec in pending if source_run_id(spec) not in unfinished), None)


def outcome(spec: RunSpec, options: WorkerOptions, exit_code: int) -> list[StageResult]:
    """A finished worker's stages as the runner would have reported them, read from its files."""
    results = []
    runs_dir = Path(options.runs_dir)
    for stage in options.stages:
        status, error, advice = stage_outcome(runs_dir, spec, stage)
        if status == "done":
            results.append(StageResult(spec, stage, "ok"))
        elif status in ("partial", "failed"):
            results.append(StageResult(spec, stage, status, error, advice))
        else:
            reason = f"its worker process exited with code {exit_code} before this stage wrote a result"
            results.append(StageResult(spec, stage, "failed", reason, "run the grid again: finished stages are kept"))
    return results
