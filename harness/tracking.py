"""Optional experiment tracking: mirror a run's training curves and final metrics to a tracker
people already read (TensorBoard), off by default. Parquet stays the source of truth; a tracker
only gets copies of the metric records the training loop writes anyway.

A tracker that breaks mid-run never fails the run: the first error is reported as a warning and
the tracker is switched off for the rest of that run (`Guarded`). A tracker whose package is
missing is reported before any training starts (`check_available`, called by the CLI).

Adding a tracker: subclass `Tracker` (log / close), register it in `TRACKERS` under a name (a lazy
"module:Class" entry keeps its package an optional import), and name its install extra.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry import Registry


class Tracker:
    """Receives metric records ({"metric", "value", "step", ...}) as training writes them."""

    def start(self, step: int) -> None:
        """Training starts (or resumes) at `step`: what a tracker logged after it is stale."""

    def log(self, records: Iterable[dict[str, Any]]) -> None:
        raise NotImplementedError

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """End of the run (or of this process's part of it): flush; `summary` is the run's
        switches and identity, recorded once."""


class NullTracker(Tracker):
    def start(self, step: int) -> None:
        pass

    def log(self, records: Iterable[dict[str, Any]]) -> None:
        pass

    def close(self, summary: dict[str, Any] | None = None) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files through torch's SummaryWriter: one scalar series per metric, the run's switches
    as text. A resumed run purges events after its resume step, so curves are not doubled."""

    #: the package the tracker needs, and the extra that installs it
    requires = ("tensorboard", "tracking")

    def __init__(self, log_dir: Path):
        self.log_dir, self.writer = Path(log_dir), None

    def start(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency (extra: tracking)

        # Events at steps up to `step` are in the resume point and kept; later ones are stale.
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step + 1 if step else None)

    def log(self, records: Iterable[dict[str, Any]]) -> None:
        if self.writer is None:
            self.start(0)
        for record in records:
            value = record.get("value")
            if isinstance(value, (int, float)):
                self.writer.add_scalar(record["metric"], float(value), global_step=int(record.get("step") or 0))

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self.writer is None:
            return
        if summary:
            self.writer.add_text("run", "```\n" + json.dumps(summary, indent=2, default=str) + "\n```")
        self.writer.close()


TRACKERS: Registry = Registry("tracker")
TRACKERS.register("tensorboard", TensorBoardTracker)


class Guarded(Tracker):
    """A tracker whose failures warn once and switch it off, so tracking never stops a run."""

    def __init__(self, inner: Tracker, name: str):
        self.inner, self.name, self.failed = inner, name, False

    def _call(self, method: str, *args: Any) -> None:
        if self.failed:
            return
        try:
            getattr(self.inner, method)(*args)
        except Exception as exc:  # noqa: BLE001 - any tracker error is reported, never raised
            self.failed = True
            warnings.warn(
                f"tracker {self.name!r} failed ({type(exc).__name__}: {exc}); the run goes on without it "
                "(its results are in the run's Parquet rows as always)",
                RuntimeWarning,
                stacklevel=3,
            )

    def start(self, step: int) -> None:
        self._call("start", step)

    def log(self, records: Iterable[dict[str, Any]]) -> None:
        self._call("log", list(records))

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self._call("close", summary)


@dataclass(frozen=True)
class TrackingOptions:
    """`run --track NAME [--track-dir DIR]`: which tracker, and where its files go (default:
    `<runs dir>/tracking/<grid>/<run name>-<run id>`, one readable folder per run)."""

    name: str
    root: Path

    def log_dir(self, grid: str, run_name: str, run_id: str) -> Path:
        return self.root / grid / f"{run_name.replace('/', '-')}-{run_id}"


def check_available(name: str) -> None:
    """Raise a ValueError naming the extra to install when tracker `name` is unknown or its
    package is missing (before any run starts)."""
    tracker = TRACKERS[name]  # unknown names get the registry's did-you-mean error
    package, extra = getattr(tracker, "requires", (None, None))
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(
            f"tracker {name!r} needs the {package!r} package, which is not installed: "
            f"pip install 'regla-harness[{extra}]' (or pip install {package})"
        )


def open_tracker(options: TrackingOptions | None, grid: str, run_name: str, run_id: str) -> Tracker:
    """The run's tracker (a NullTracker when tracking is off); errors while opening it warn and
    give a NullTracker, like errors later on."""
    if options is None:
        return NullTracker()
    try:
        tracker = TRACKERS[options.name](options.log_dir(grid, run_name, run_id))
    except Exception as exc:  # noqa: BLE001 - see Guarded
        message = f"tracker {options.name!r} could not start ({exc}); the run goes on without it"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return NullTracker()
    return Guarded(tracker, options.name)
