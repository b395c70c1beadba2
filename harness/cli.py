"""Command line: run grids, list variants and grids, write reports, prepare data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from variants import REGISTRIES, import_plugin_modules

from .cluster import ClusterOptions, pending_runs, submit, submitted_outcome
from .config import ConfigError
from .data import DataError, prepare_data
from .distributed import finish_distributed
from .executor import WorkerOptions, outcome, run_on_devices
from .grid import filter_runs, load_grid, load_grid_data, sources_first
from .report import write_report
from .runner import StageResult, preflight, restore_results, run_grid, stage_status
from .stages import STAGES
from .tracking import TrackingOptions, check_available

ROOT = Path(__file__).resolve().parent.parent

#: exit codes of `run`: every stage ok; some stage failed or was partial; the grid or the
#: command line itself is invalid (nothing ran)
EXIT_OK, EXIT_RUNS_FAILED, EXIT_INVALID = 0, 1, 2
GRIDS_DIR = ROOT / "grids"
DEFAULT_GRID = "smoke"

EPILOG = """examples:
  python run_ablations.py run                      # the default smoke grid (CPU, a few minutes)
  python run_ablations.py run smoke --dry-run      # show the runs and their status, train nothing
  python run_ablations.py run grids/paper/ablation.yaml --where component=regla,gla_gate
  python run_ablations.py list                     # every feature map, norm, gate and grid
  python run_ablations.py list gate 'fa*'          # wildcard listing
  python run_ablations.py report smoke             # tables and plots from existing results
  python run_ablations.py prepare-data --source offline-english --tokenizer bpe-4096
"""


def resolve_grid_path(name_or_path: str) -> Path:
    """A grid by name (grids/<name>.yaml, grids/paper/<name>.yaml) or by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"grid file {str(path)!r} does not exist")
        return path
    for candidate in (GRIDS_DIR / f"{name_or_path}.yaml", GRIDS_DIR / "paper" / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"unknown grid {name_or_path!r}; available: {', '.join(available_grids())} (or give a path to a .yaml file)"
    )


def available_grids() -> list[str]:
    return sorted(str(p.relative_to(GRIDS_DIR).with_suffix("")) for p in GRIDS_DIR.rglob("*.yaml"))


def reference_of_grid_named(name: str) -> dict | None:
    """The `reference` section (published numbers) of the grid file in grids/ that expands to the grid
    `name` (its `name:`, or that name with a scale's suffix, `-gpu`); None when no file does. A report
    written from a results.parquet finds the paper's numbers this way, as the rows name only the grid."""
    for path in sorted(GRIDS_DIR.rglob("*.yaml")):
        data = load_grid_data(path)
        base = data.get("name", path.stem)
        if name == base or name in {f"{base}-{scale}" for scale in data.get("scales") or {}}:
            return data.get("reference")
    return None


def tracking_options(args: argparse.Namespace) -> TrackingOptions | None:
    """`--track NAME [--track-dir DIR]`: the tracker and where its files go (default
    <runs dir>/tracking)."""
    if not args.track:
        return None
    return TrackingOptions(args.track, Path(args.track_dir or Path(args.runs_dir) / "tracking"))


def rerun_command(grid: str, scale: str | None, stages: str | None = None) -> str:
    """The command line a report names to regenerate its results (scale and stages included)."""
    command = f"python run_ablations.py run {grid}"
    if scale:
        command += f" --scale {scale}"
    if stages:
        command += f" --stages {stages}"
    return command


def _cmd_run(args: argparse.Namespace) -> int:
    if args.runs_per_gpu < 1:
        raise ConfigError(f"--runs-per-gpu must be a positive number of runs; got {args.runs_per_gpu}")
    if args.runs_per_gpu > 1 and not args.gpus:
        raise ConfigError("--runs-per-gpu needs --gpus N: it says how many runs share each of the N GPUs")
    if args.track:
        check_available(args.track)  # before anything runs: a missing package is named with its extra
    grid = load_grid(resolve_grid_path(args.grid), tuple(args.plugin), args.scale)
    runs = filter_runs(grid.runs, args.where)
    if not runs:
        raise ConfigError(
            f"--where {' '.join(args.where)} matches none of the {len(grid.runs)} runs of grid "
            f"{grid.name!r}; see them with --dry-run"
        )
    if args.only_run:
        unknown = sorted(set(args.only_run) - {spec.run_id for spec in runs})
        if unknown:
            raise ConfigError(f"--only-run: no run of grid {grid.name!r} has id {', '.join(unknown)}")
        runs = tuple(spec for spec in runs if spec.run_id in args.only_run)
    stages = args.stages.split(",") if args.stages else list(grid.stages)
    for stage in stages:
        if stage not in STAGES:
            raise ConfigError(f"--stages: {STAGES.unknown(stage)}")
    # Checked before compute, the dry run included: output directories, device, data sizes (a dry
    # run downloads nothing: data from the hub is left to the run itself, and the notes say so).
    data_cache: dict = {}
    unchecked = preflight(
        runs,
        stages,
        runs_dir=args.runs_dir,
        results_dir=None if args.dry_run else args.results_dir,
        device=args.device,
        data_cache=data_cache,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        header = ["run_id", "run_name", *stages]
        print(" | ".join(header))
        for spec in sources_first(list(runs)):  # the order `run` takes them in
            states = [stage_status(Path(args.runs_dir), spec, s)[0] for s in stages]
            print(" | ".join([spec.run_id, spec.name, *states]))
        print(f"{len(runs)} runs, stages: {', '.join(stages)}")
        for note in unchecked:
            print(f"note: {note}")
        return 0
    options = WorkerOptions(
        grid_path=str(resolve_grid_path(args.grid).resolve()),
        stages=tuple(stages),
        runs_dir=str(Path(args.runs_dir).resolve()),
        device=args.device,
        force=args.force,
        retry_failed=args.retry_failed,
        plugins=tuple(args.plugin),
        scale=args.scale,
        track=args.track,
        track_dir=str(Path(args.track_dir).resolve()) if args.track_dir else None,
    )
    if args.submit:
        cluster = ClusterOptions(
            backend=args.submit,
            folder=args.submit_folder or str(Path(args.runs_dir) / "submitit"),
            partition=args.slurm_partition,
            time_minutes=args.slurm_time,
            gpus_per_run=args.gpus_per_run,
            parallelism=args.array_parallelism,
        )
        todo = pending_runs(runs, options)
        if not todo:
            print("every run of the grid is done; nothing to submit")
            results = [r for spec in runs for r in outcome(spec, options, 0)]
        else:
            jobs = submit(todo, options, cluster, wait=args.submit == "local")
            if args.submit == "slurm":
                print(f"submitted {len(jobs)} array task(s) to Slurm: {', '.join(str(j.job_id) for j in jobs)}")
                print(f"logs in {cluster.folder}; when they are done: python run_ablations.py report {args.grid}")
                return EXIT_OK
            done = {spec.run_id for spec in todo}
            results = submitted_outcome(todo, options, jobs)
            results += [r for spec in runs if spec.run_id not in done for r in outcome(spec, options, 0)]
    elif args.gpus:
        results = run_on_devices(
            runs, options, args.gpus, runs_per_device=args.runs_per_gpu, progress=not args.no_progress
        )
    else:
        results = run_grid(
            grid,
            runs,
            stages=stages,
            runs_dir=args.runs_dir,
            force=args.force,
            retry_failed=args.retry_failed,
            device=args.device,
            progress=not args.no_progress,
            data_cache=data_cache,
            tracking=tracking_options(args),
        )
    if not finish_distributed():
        return EXIT_OK  # under torchrun, rank 0 alone summarises and reports
    if not args.no_report:
        command = rerun_command(args.grid, args.scale, args.stages)
        out = write_report(grid.name, args.runs_dir, args.results_dir, command, grid.reference, grid.runs)
        print(f"report: {out}/RESULTS.md (with results.parquet and plots beside it)")
    return print_summary(results)


def print_summary(results: list[StageResult]) -> int:
    """Counts per status, then every failed or partial stage with its reason and what to do;
    returns the exit code (EXIT_RUNS_FAILED when any stage failed or was partial)."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    print("stages: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    attention = [r for r in results if r.needs_attention]
    for r in attention:
        when = " (in an earlier run)" if r.status.startswith("skipped-") else ""
        status = r.status.removeprefix("skipped-")
        print(f"  {status}{when}: {r.run.name} [{r.stage}] {r.error}")
        if r.advice:
            print(f"      -> {r.advice}")
    busy = counts.get("skipped-busy", 0)
    if busy:
        print(f"  {busy} stage(s) skipped: another process holds their run (run again once it is done)")
    if attention:
        print(f"{len(attention)} stage(s) failed or partial: exit code {EXIT_RUNS_FAILED}")
        return EXIT_RUNS_FAILED
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    import_plugin_modules(args.plugin)
    axes = [args.axis] if args.axis else [*REGISTRIES, "grids"]
    for axis in axes:
        if axis == "grids":
            print("grids:")
            for grid in available_grids():
                print(f"  {grid}")
            continue
        if axis not in REGISTRIES:
            raise ConfigError(f"unknown axis {axis!r}; choose one of {', '.join([*REGISTRIES, 'grids'])}")
        registry = REGISTRIES[axis]
        print(f"{registry.axis}s:")
        for name in registry.names(args.pattern):
            options = ", ".join(f"{k}={v!r}" for k, v in registry.options_of(name).items())
            print(f"  {name:14s} v{registry.version_of(name)}  {options}")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    path = Path(args.parquet)
    if not path.is_file():
        raise FileNotFoundError(f"no results file {str(path)!r}; give a report's results.parquet")
    done = restore_results(path, Path(args.runs_dir))
    print(
        f"restored {done.written} stage result(s) of {done.runs} run(s) of grid {', '.join(done.grids)} under "
        f"{args.runs_dir} ({done.kept} already there, kept); `run` now skips them"
    )
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    """A grid file (by name or path) reports its current runs; a grid name with results under
    the runs folder but no grid file here (a user's grid run from elsewhere) reports every run
    recorded under that name. `--from-parquet` reports the rows of a results.parquet instead
    (regenerating a committed report without the runs folder or a GPU)."""
    if args.from_parquet:
        frame = pd.read_parquet(args.from_parquet)
        note = (
            f"Written from the rows in `{args.from_parquet}` by `python run_ablations.py report {args.grid} "
            f"--from-parquet {args.from_parquet}` (`make reports` rewrites every committed report this way); "
            f"the grid that produced them is named in each row's `spec_json`."
        )
        out = write_report(
            args.grid,
            args.runs_dir,
            args.results_dir,
            reference=reference_of_grid_named(args.grid),
            frame=frame,
            source_note=note,
        )
        print(f"report: {out}/RESULTS.md (from {args.from_parquet})")
        return EXIT_OK
    try:
        path = resolve_grid_path(args.grid)
    except ConfigError:
        if not (Path(args.runs_dir) / args.grid).is_dir():
            raise
        out = write_report(args.grid, args.runs_dir, args.results_dir, None)
        print(f"report: {out}/RESULTS.md (every run recorded under {Path(args.runs_dir) / args.grid}; no grid file)")
        return EXIT_OK
    grid = load_grid(path, tuple(args.plugin), args.scale)
    out = write_report(
        grid.name,
        args.runs_dir,
        args.results_dir,
        rerun_command(args.grid, args.scale),
        grid.reference,
        grid.runs,
    )
    print(f"report: {out}/RESULTS.md")
    return EXIT_OK


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    data = prepare_data(args.source, args.tokenizer)
    for split in ("train", "validation", "test"):
        print(f"{split}: {len(data.split(split)):,} tokens, {data.bytes_per_token[split]:.3f} bytes/token")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_ablations.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Ablation and benchmark harness for gated linear attention (ReGLA). A grid file expands "
        "into small language models that are trained, scored and reported as Parquet + plots.",
    )
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module that registers extra variants (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a grid (default: smoke); finished stages are skipped")
    run.add_argument("grid", nargs="?", default=DEFAULT_GRID, help="grid name or path to a .yaml file")
    run.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="AXIS=LEVEL[,LEVEL]",
        help="only runs whose axis has one of these levels (repeatable)",
    )
    run.add_argument("--stages", help="comma-separated stages to run instead of the grid's own")
    run.add_argument("--scale", help="one of the grid's scales (e.g. gpu, paper); default: the grid as written (smoke)")
    run.add_argument("--force", action="store_true", help="re-run stages that already have results")
    run.add_argument("--retry-failed", action="store_true", help="re-run stages that failed before")
    run.add_argument("--dry-run", action="store_true", help="print the expanded runs and their status")
    run.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    run.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where run artefacts go (default: runs/)")
    run.add_argument("--results-dir", default=str(ROOT / "results"), help="where reports go (default: results/)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--gpus",
        type=int,
        default=0,
        metavar="N",
        help="run independent runs in parallel, one worker process per GPU, N at a time (without GPUs: N CPU "
        "workers); results and the report as with one process",
    )
    run.add_argument(
        "--runs-per-gpu",
        type=int,
        default=1,
        metavar="K",
        help="with --gpus: put K runs on each GPU at once (small models leave a GPU mostly idle)",
    )
    run.add_argument(
        "--track",
        metavar="TRACKER",
        help="also mirror training curves and final metrics to a tracker: tensorboard "
        "(pip install -e '.[tracking]'); Parquet stays the record",
    )
    run.add_argument("--track-dir", help="the tracker's folder (default: <runs-dir>/tracking)")
    run.add_argument("--only-run", action="append", default=[], metavar="RUN_ID", help=argparse.SUPPRESS)
    cluster = run.add_argument_group("cluster (submitit; pip install -e '.[cluster]')")
    cluster.add_argument(
        "--submit",
        choices=("slurm", "local"),
        help="send the pending runs as a job array, one run per task (local: on this machine, and wait)",
    )
    cluster.add_argument("--slurm-partition", help="Slurm partition")
    cluster.add_argument("--slurm-time", type=int, default=240, metavar="MINUTES", help="time limit per run")
    cluster.add_argument("--gpus-per-run", type=int, default=1, metavar="N", help="GPUs per array task")
    cluster.add_argument("--array-parallelism", type=int, default=16, metavar="N", help="array tasks at once")
    cluster.add_argument("--submit-folder", help="submitit's logs (default: <runs-dir>/submitit)")
    run.add_argument("--no-report", action="store_true", help="write no report (a worker of --gpus)")
    run.set_defaults(func=_cmd_run)

    listing = sub.add_parser("list", help="list registered variants per axis, and the grids")
    listing.add_argument("axis", nargs="?", help=f"one of {', '.join([*REGISTRIES, 'grids'])}")
    listing.add_argument("pattern", nargs="?", default="*", help="wildcard, e.g. 'safe*'")
    listing.set_defaults(func=_cmd_list)

    report = sub.add_parser("report", help="write tables and plots for a grid's existing results")
    report.add_argument(
        "grid",
        nargs="?",
        default=DEFAULT_GRID,
        help="grid name or path to a .yaml file; or the name of a grid with results under --runs-dir",
    )
    report.add_argument("--scale", help="the scale the grid ran at (as given to run)")
    report.add_argument("--from-parquet", metavar="FILE", help="report these rows (e.g. a committed results.parquet)")
    report.add_argument("--runs-dir", default=str(ROOT / "runs"))
    report.add_argument("--results-dir", default=str(ROOT / "results"))
    report.set_defaults(func=_cmd_report)

    restore = sub.add_parser(
        "restore",
        help="write a results.parquet's rows back into run folders, so a grid resumes on another machine",
    )
    restore.add_argument("parquet", help="a report's results.parquet (e.g. results/paper-ablation-gpu/results.parquet)")
    restore.add_argument("--runs-dir", default=str(ROOT / "runs"))
    restore.set_defaults(func=_cmd_restore)

    prepare = sub.add_parser("prepare-data", help="tokenize a corpus into the on-disk cache")
    prepare.add_argument("--source", default="offline-english")
    prepare.add_argument("--tokenizer", default="bpe-4096")
    prepare.set_defaults(func=_cmd_prepare_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        import_plugin_modules(args.plugin)
        return args.func(args)
    # ConfigError and the registries' and sources' errors are ValueErrors: bad input, not a crash.
    except (ValueError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
