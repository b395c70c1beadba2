"""Long-format results: one row per (run, stage, metric, step, ...), written atomically as Parquet.

Long rows let a new stage add metrics without a schema change. Each row carries the run's
identity, its grid axes (one column each), the full spec as JSON, and the environment it ran in.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .atomic import atomic_write_bytes, set_aside
from .spec import RunSpec
from .stages import STAGES

#: fixed columns, in order; grid axes follow as extra string columns
CORE_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("run_name", pa.string()),
        ("grid", pa.string()),
        ("stage", pa.string()),
        ("stage_id", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("step", pa.int64()),
        ("split", pa.string()),
        ("task", pa.string()),
        ("shots", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("extra", pa.string()),
        ("spec_json", pa.string()),
        ("git_sha", pa.string()),
        ("torch", pa.string()),
        ("triton", pa.string()),
        ("fla", pa.string()),
        ("lm_eval", pa.string()),
        ("device", pa.string()),
        ("python", pa.string()),
        ("created", pa.string()),
    ]
)
CORE_COLUMNS = tuple(CORE_SCHEMA.names)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        sha = out.stdout.strip()
        # Dirty means the code differs from the commit; rewritten result files do not count.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)results"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str | None = None) -> dict[str, str | None]:
    """Versions and device recorded with every row."""
    if device is None:
        device = (
            torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        )
    return {
        "git_sha": _git_sha(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fla": _version("fla-core") or _version("flash-linear-attention"),
        "lm_eval": _version("lm_eval") or _version("lm-eval"),
        "device": device,
        "python": platform.python_version(),
    }


def make_rows(
    spec: RunSpec, stage: str, records: Iterable[dict[str, Any]], env: dict[str, Any], created: str
) -> list[dict[str, Any]]:
    """Complete metric records ({metric, value, step, ...}) into full result rows."""
    base = {
        "run_id": spec.run_id,
        "run_name": spec.name,
        "grid": spec.grid,
        "stage": stage,
        "stage_id": spec.stage_id(stage),
        "spec_json": spec.to_json(),
        "created": created,
        **env,
    }
    rows = []
    for record in records:
        unknown = set(record) - set(CORE_COLUMNS)
        if unknown:
            raise ValueError(f"result record has unknown fields {sorted(unknown)}; allowed: {', '.join(CORE_COLUMNS)}")
        row = {**base, "status": "ok", **record}
        row.update({f"axis:{k}": str(v) for k, v in spec.axes.items()})
        rows.append(row)
    return rows


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    axis_columns = sorted({k for row in rows for k in row if k.startswith("axis:")})
    schema = pa.schema(list(CORE_SCHEMA) + [(c, pa.string()) for c in axis_columns])
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    table = rows_to_table(rows)
    atomic_write_bytes(path, lambda tmp: pq.write_table(table, tmp))


def read_rows(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def read_rows_or_set_aside(path: Path) -> pd.DataFrame | None:
    """The rows of a per-stage result file, or None after setting aside a file that cannot be read
    (truncated, not Parquet, wrong schema): its stage then runs again."""
    try:
        frame = read_rows(path)
        missing = [c for c in ("run_id", "stage_id", "status", "task", "error") if c not in frame.columns]
        if missing:
            raise ValueError(f"missing columns {missing}")
        return frame
    except (OSError, ValueError, pa.ArrowException) as exc:
        set_aside(path, f"{type(exc).__name__}: {exc}")
        return None


def advice_of(extra: Any) -> str:
    """The advice a failure row carries in its `extra` JSON (empty where it has none)."""
    if not isinstance(extra, str):
        return ""
    try:
        fields = json.loads(extra)
    except ValueError:
        return ""
    return str(fields.get("advice", "")) if isinstance(fields, dict) else ""


def stage_failures(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows recording that a whole stage failed (a failed row not tied to an evaluation task)."""
    return frame[(frame["status"] == "failed") & frame["task"].isna()]


def current_rows(frame: pd.DataFrame, runs: Iterable[RunSpec]) -> pd.DataFrame:
    """Only the rows of these specs' runs and of their stages' current settings: results left in
    the runs folder by older versions of a grid do not leak into its report."""
    keys = {(spec.run_id, spec.stage_id(stage)) for spec in runs for stage in STAGES}
    mask = [(run_id, stage_id) in keys for run_id, stage_id in zip(frame["run_id"], frame["stage_id"])]
    return frame[mask]


def load(grid: str, runs_dir: str | Path = "runs") -> pd.DataFrame:
    """All result rows of a grid as one DataFrame (axis columns named `axis:<name>`)."""
    root = Path(runs_dir) / grid
    files = sorted(root.glob("*/*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no results for grid {grid!r} under {str(root)!r}; run `python run_ablations.py run {grid}` first"
        )
    frames = [frame for frame in map(read_rows_or_set_aside, files) if frame is not None]
    if not frames:
        raise FileNotFoundError(f"no readable results for grid {grid!r} under {str(root)!r}")
    return pd.concat(frames, ignore_index=True, sort=False)
