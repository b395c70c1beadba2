"""Wall time of one grid run sequentially on one GPU vs in parallel over several (`run --gpus N
--runs-per-gpu K`), and whether the parallel runs give the same results.

Every configuration runs the same runs from an empty runs folder, back to back on the same
machine, after a short warm-up run that fills Triton's compile cache (so no configuration pays
for compiling the kernels). Each configuration is a separate `run_ablations.py run` process, timed
from start to exit, exactly as a user would run it.

    python benchmarks/bench_executor.py paper/saturation --scale gpu --set train.steps=150 \\
        --where gate=gla,refined --configs 1x1,2x1,2x2 --out /tmp/bench-executor

Writes `executor_timing.parquet` (one row per configuration: wall seconds, runs, exit code, the
largest relative difference of each run's final validation loss from the first configuration's)
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import results as results_io  # noqa: E402
from harness.cli import resolve_grid_path  # noqa: E402
from harness.grid import filter_runs, load_grid  # noqa: E402


def parse_value(text: str):
    """`--set key=value` values as YAML scalars (numbers, booleans, null), like a grid file's."""
    return yaml.safe_load(text)


def scaled_grid(grid: str, scale: str, overrides: dict, out: Path) -> Path:
    """The grid file with `overrides` added to the chosen scale's base (one seed), written to `out`."""
    data = yaml.safe_load(resolve_grid_path(grid).read_text())
    scales = data.get("scales") or {}
    if scale not in scales:
        raise SystemExit(f"grid {grid!r} has no scale {scale!r}; its scales: {', '.join(scales) or 'none'}")
    scales[scale] = {**scales[scale], "seeds": 1, "base": {**(scales[scale].get("base") or {}), **overrides}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{Path(grid).name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_grid(grid_path: Path, scale: str, runs_dir: Path, where: list[str], gpus: int, per_gpu: int) -> dict:
    command = [sys.executable, str(ROOT / "run_ablations.py"), "run", str(grid_path), "--scale", scale]
    command += ["--device", "cuda", "--runs-dir", str(runs_dir), "--results-dir", str(runs_dir / "report")]
    command += ["--no-progress", "--gpus", str(gpus), "--runs-per-gpu", str(per_gpu)]
    for condition in where:
        command += ["--where", condition]
    start = time.perf_counter()
    code = subprocess.run(command, cwd=ROOT).returncode
    return {"wall_s": time.perf_counter() - start, "exit_code": code}


def final_losses(grid_name: str, runs_dir: Path) -> pd.Series:
    frame = results_io.load(grid_name, runs_dir)
    final = frame[frame.metric == "final/val_loss"]
    return final.set_index("run_name")["value"].sort_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", help="a grid name or path, e.g. paper/saturation")
    parser.add_argument("--scale", default="gpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in the scale's base")
    parser.add_argument("--where", action="append", default=[], help="as `run --where`")
    parser.add_argument(
        "--configs",
        default="1x1,2x1",
        help="GPUSxRUNS_PER_GPU, comma-separated; the first is the baseline",
    )
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key] = parse_value(value)
    configs = []
    for item in args.configs.split(","):
        gpus, _, per_gpu = item.partition("x")
        configs.append((int(gpus), int(per_gpu or 1)))

    args.out.mkdir(parents=True, exist_ok=True)
    grid_path = scaled_grid(args.grid, args.scale, overrides, args.out)
    grid = load_grid(grid_path, scale=args.scale)
    runs = len(filter_runs(grid.runs, args.where))

    # Warm-up: every run for two steps, so each kernel configuration is compiled once beforehand.
    warm = scaled_grid(
        args.grid,
        args.scale,
        {**overrides, "train.steps": 2, "train.eval_every": 1, "train.warmup_steps": 1, "train.checkpoint_every": 1},
        args.out / "warm",
    )
    shutil.rmtree(args.out / "warm-runs", ignore_errors=True)
    max_gpus = max(g for g, _ in configs)
    run_grid(warm, args.scale, args.out / "warm-runs", args.where, max_gpus, 4)

    rows, baseline = [], None
    for gpus, per_gpu in configs:
        runs_dir = args.out / f"runs-{gpus}x{per_gpu}"
        shutil.rmtree(runs_dir, ignore_errors=True)
        timing = run_grid(grid_path, args.scale, runs_dir, args.where, gpus, per_gpu)
        losses = final_losses(grid.name, runs_dir)
        if baseline is None:
            baseline = losses
        difference = ((losses - baseline).abs() / baseline.abs()).max()
        rows.append(
            {
                "gpus": gpus,
                "runs_per_gpu": per_gpu,
                "runs": len(losses),
                **timing,
                "max_rel_diff_final_val_loss": float(difference),
            }
        )
        print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    frame["speedup"] = frame.wall_s.iloc[0] / frame.wall_s
    frame.to_parquet(args.out / "executor_timing.parquet", index=False)
    print(f"grid {grid.name}, {runs} runs selected by {args.where or 'all'}; overrides {overrides}")
    print(frame.to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
