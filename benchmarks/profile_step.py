"""Where one training step's time goes, kernel by kernel: torch.profiler over a few training steps
(forward, backward, AdamW) of the runs of a grid, the models built exactly as the grid's profile
stage builds them (random weights, bf16 autocast on CUDA).

The model-level profile (`run paper/efficiency`) says how fast a step is; this says which kernels
make it so, which is what a claim like "the fused op's backward costs X" needs (a profile of the
slowest kernel, not a guess). On CUDA the rows are the GPU kernels (self device time, so nothing is
counted twice); on CPU, where the test suite runs it at tiny sizes, the operators' self CPU time.

    python3 benchmarks/profile_step.py --grid paper/efficiency --scale small --where depth=6 \\
        --seq-len 512 --batch 32 --out DIR

It writes `profile_step.parquet` (run, kernel, calls, ms per step, share of the step's total),
`profile_step_summary.parquet` (per run: the step's wall time, timed without the profiler, beside
the kernels' summed time and launches: on a GPU, wall time well above kernel time means the host
cannot launch fast enough, which no kernel tuning fixes; with `--cuda-graph` also the step
replayed from a CUDA graph, the step without the host), `profile_step_host.parquet` (the host's
side: per operator, autograd node and runtime call, its inclusive and self CPU time per step, which
says where a host-bound step spends its time) and `profile_step.log` (the profiler's tables per run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cli import resolve_grid_path  # noqa: E402
from harness.grid import filter_runs, load_grid  # noqa: E402
from harness.postlin.start import architecture_model  # noqa: E402
from harness.spec import RunSpec  # noqa: E402


def training_step(
    model: torch.nn.Module, tokens: torch.Tensor, optimizer: torch.optim.Optimizer, captured: bool = False
) -> None:
    """One step as the profile stage times it: loss, backward, AdamW, gradients dropped. A step to
    capture in a CUDA graph (`captured`) keeps its gradients (the backward writes them in place on
    every replay) and turns autocast's cache of cast weights off, as graph capture requires."""
    with torch.autocast(
        tokens.device.type, dtype=torch.bfloat16, enabled=tokens.device.type == "cuda", cache_enabled=not captured
    ):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    if not captured:
        optimizer.zero_grad(set_to_none=True)


def capture_training_step(model: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    """The training step captured in a CUDA graph (PyTorch's whole-network capture): replaying it
    launches every kernel of forward, backward and AdamW with no host work between them, so its
    time is the step's GPU time plus one launch. Against the eager step, the difference is what
    the host costs (`--cuda-graph`). AdamW runs `capturable` (its step count on the GPU); warm-up
    steps on a side stream compile and tune every kernel before the capture, as capture allows no
    compilation, autotuning or host synchronisation."""
    device = tokens.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, capturable=True)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            training_step(model, tokens, optimizer, captured=True)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # the backward then allocates .grad in the graph's pool
    with torch.cuda.graph(graph):
        training_step(model, tokens, optimizer, captured=True)
    return graph.replay


def kernel_rows(prof: profile, steps: int, device: torch.device) -> pd.DataFrame:
    """Per kernel (CUDA) or operator (CPU): calls and self time per step, and its share of the sum."""
    rows = []
    for event in prof.key_averages():
        if device.type == "cuda":
            # User annotations (e.g. `Optimizer.step#AdamW.step`) are ranges on the GPU timeline
            # that span kernels already counted, not kernels.
            if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
                continue
            self_us = event.self_device_time_total
        else:
            self_us = event.self_cpu_time_total
        if self_us > 0:
            rows.append({"kernel": event.key, "calls": event.count // steps, "ms_per_step": self_us / 1e3 / steps})
    frame = pd.DataFrame(rows, columns=["kernel", "calls", "ms_per_step"])
    frame["share"] = frame.ms_per_step / frame.ms_per_step.sum()
    return frame.sort_values("ms_per_step", ascending=False, ignore_index=True)


def host_rows(prof: profile, steps: int, limit: int = 80) -> pd.DataFrame:
    """The host's side of the step: per CPU event (operator, autograd node, custom Function, CUDA
    runtime call), calls and inclusive and self CPU time per step, the `limit` longest inclusive.
    Under the profiler the host runs slower than without; compare rows with each other."""
    rows = [
        {
            "op": event.key,
            "calls": event.count // steps,
            "host_ms_per_step": event.cpu_time_total / 1e3 / steps,
            "self_host_ms_per_step": event.self_cpu_time_total / 1e3 / steps,
        }
        for event in prof.key_averages()
        if event.device_type == torch.autograd.DeviceType.CPU and event.cpu_time_total > 0
    ]
    frame = pd.DataFrame(rows, columns=["op", "calls", "host_ms_per_step", "self_host_ms_per_step"])
    return frame.sort_values("host_ms_per_step", ascending=False, ignore_index=True).head(limit)


class RunProfile(NamedTuple):
    kernels: pd.DataFrame  # kernel_rows
    host: pd.DataFrame  # host_rows
    table: str  # the profiler's own tables, for the log


def step_wall_ms(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """The median wall time of `step`, each call timed from a synchronised start to a synchronised
    end, without the profiler (whose own overhead would slow the host)."""
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return float(pd.Series(times).median())


def warm_model(spec: RunSpec, vocab: int, seq_len: int, batch: int, device: torch.device):
    """(model, tokens, optimizer) of `spec`'s architecture, after the steps that compile, tune and
    grow the allocator (which stay out of every measurement)."""
    model = architecture_model(spec.model, vocab, spec.train.seed, seq_len).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    for _ in range(2):
        training_step(model, tokens, optimizer)
    return model, tokens, optimizer


def time_run(
    spec: RunSpec, vocab: int, seq_len: int, batch: int, steps: int, device: torch.device, cuda_graph: bool = False
) -> tuple[float, float]:
    """The median wall ms of a training step of `spec`'s architecture, eager, and replayed from a
    CUDA graph with `cuda_graph` (NaN without). `main` times every run before it profiles any:
    timed after another run's profile in the same process, the steps on an H200 read 1.7-1.9x the
    profile stage's time of the same step, the run timed before any profile 1.08x
    (results/paper-efficiency-small/COMMAND.md): tracing leaves the host slower."""
    model, tokens, optimizer = warm_model(spec, vocab, seq_len, batch, device)
    eager = step_wall_ms(lambda: training_step(model, tokens, optimizer), steps, device)
    graphed = step_wall_ms(capture_training_step(model, tokens), steps, device) if cuda_graph else float("nan")
    return eager, graphed


def profile_run(spec: RunSpec, vocab: int, seq_len: int, batch: int, steps: int, device: torch.device) -> RunProfile:
    """The profile of `steps` training steps of `spec`'s architecture."""
    model, tokens, optimizer = warm_model(spec, vocab, seq_len, batch, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            training_step(model, tokens, optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort_by, row_limit=25)
    if device.type == "cuda":
        table += "\nthe host's side, by inclusive CPU time:\n" + averages.table(sort_by="cpu_time_total", row_limit=40)
    return RunProfile(kernel_rows(prof, steps, device), host_rows(prof, steps), table)


def summary_row(run: str, rows: pd.DataFrame, wall_ms: float, graph_ms: float, device: torch.device) -> dict:
    """One run's step: wall time (eager; replayed from a CUDA graph, NaN unless timed), the summed
    kernel (CUDA) or operator (CPU) time, the launches, and on a GPU the fraction of the eager step
    the GPU was busy (kernels on one stream do not overlap)."""
    busy_ms = float(rows.ms_per_step.sum())
    return {
        "run": run,
        "step_wall_ms": wall_ms,
        "graph_step_ms": graph_ms,
        "kernel_ms": busy_ms,
        "launches": int(rows.calls.sum()),
        "gpu_busy": busy_ms / wall_ms if device.type == "cuda" else float("nan"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--grid", default="paper/efficiency", help="a grid name or file (its runs are profiled)")
    parser.add_argument("--scale", default=None, help="the grid's scale")
    parser.add_argument("--where", action="append", default=[], help="axis=level[,level] (repeatable), as `run`")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="profiled training steps per run")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the model's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the Parquet and the log")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also time the step captured in a CUDA graph (graph_step_ms): what the step costs without the host",
    )
    args = parser.parse_args(argv)
    for name in ("seq_len", "batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}")
    if args.cuda_graph and not str(args.device).startswith("cuda"):
        parser.error(f"--cuda-graph captures the step in a CUDA graph and needs a CUDA device; got {args.device}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    grid = load_grid(resolve_grid_path(args.grid), scale=args.scale)
    runs = filter_runs(grid.runs, args.where)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames, hosts, summaries, log = [], [], [], []
    vocabs = {spec.name: args.vocab or spec.model.vocab_size for spec in runs}
    for name, vocab in vocabs.items():
        if vocab is None:
            raise SystemExit(f"{name}: the model names no vocab_size; give --vocab")
    shape = (args.seq_len, args.batch, args.steps, device)
    # Every run timed before any is profiled (see time_run): (eager ms, graph ms) per run.
    walls = {spec.name: time_run(spec, vocabs[spec.name], *shape, cuda_graph=args.cuda_graph) for spec in runs}
    for spec in runs:
        run = profile_run(spec, vocabs[spec.name], *shape)
        rows, (wall_ms, graph_ms), table = run.kernels, walls[spec.name], run.table
        summaries.append(summary_row(spec.name, rows, wall_ms, graph_ms, device))
        frames.append(rows.assign(run=spec.name)[["run", *rows.columns]])
        hosts.append(run.host.assign(run=spec.name)[["run", *run.host.columns]])
        s = summaries[-1]
        graphed = f" ({graph_ms:.2f} ms from a CUDA graph)" if args.cuda_graph else ""
        log.append(f"===== {spec.name}: step {wall_ms:.2f} ms wall{graphed}, {s['kernel_ms']:.2f} ms of "
                   f"{'kernel' if device.type == 'cuda' else 'CPU'} time in {s['launches']} "
                   f"{'launches' if device.type == 'cuda' else 'operator calls'} "
                   f"(B {args.batch}, T {args.seq_len}, {args.steps} steps)\n{table}")  # fmt: skip
        print(log[-1].splitlines()[0], flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = pd.concat(frames, ignore_index=True).assign(device=device_name)
    summary = pd.DataFrame(summaries).assign(device=device_name, seq_len=args.seq_len, batch=args.batch)
    result.to_parquet(out / "profile_step.parquet", index=False)
    hosts = pd.concat(hosts, ignore_index=True).assign(device=device_name)
    hosts.to_parquet(out / "profile_step_host.parquet", index=False)
    summary.to_parquet(out / "profile_step_summary.parquet", index=False)
    (out / "profile_step.log").write_text("\n\n".join(log) + "\n")
    print(summary.drop(columns=["device"]).to_string(index=False))
    written = "profile_step.parquet, profile_step_summary.parquet, profile_step_host.parquet and profile_step.log"
    print(f"wrote {written} to {out}")


if __name__ == "__main__":
    main()
