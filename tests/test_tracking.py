"""`run --track tensorboard`: training curves and final metrics mirrored to TensorBoard event files,
equal to the run's Parquet rows; off by default; a broken tracker never fails a run."""

from __future__ import annotations

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from harness import results as results_io
from harness import tracking
from harness.cli import EXIT_INVALID, EXIT_OK
from harness.cli import main as cli_main

from .pipeline_helpers import tiny_grid


def scalars(log_dir) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture
def grid_file(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    data = tiny_grid(corpus, steps=10, eval_every=5, log_every=5)
    data["axes"]["variant"].pop("softmax")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(path, tmp_path, *extra) -> int:
    return cli_main(
        ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
        + ["--device", "cpu", "--no-progress", *extra]
    )


def test_tensorboard_curves_equal_the_parquet_rows(grid_file, tmp_path):
    assert run(grid_file, tmp_path, "--track", "tensorboard") == EXIT_OK
    folders = list((tmp_path / "runs" / "tracking" / "tiny").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("regla-")  # readable: run name, then id
    logged = scalars(folders[0])
    rows = results_io.load("tiny", tmp_path / "runs")
    for metric in ("train/loss", "train/lr", "val/loss", "val/bits_per_byte"):
        expected = rows[rows.metric == metric].set_index("step")["value"]
        assert set(logged[metric]) == set(expected.index), metric
        for step, value in expected.items():
            assert logged[metric][step] == pytest.approx(value, rel=1e-6), (metric, step)
    final = rows[rows.metric == "final/val_bits_per_byte"]["value"].item()
    assert logged["final/val_bits_per_byte"][10] == pytest.approx(final, rel=1e-6)
    assert set(logged["train/step_tokens_per_second"]) == {5, 10}  # per-step throughput: tracker only
    average = rows[rows.metric == "train/tokens_per_second"]["value"].item()  # the rows keep the average
    assert logged["train/tokens_per_second"] == {10: pytest.approx(average, rel=1e-6)}
    # The steady throughput leaves out the process's first step (kernel compilation, a capture).
    value = rows.set_index("metric")["value"]
    tokens_per_step = average * value["train/seconds"] / 10
    later_seconds = value["train/seconds"] - value["train/first_step_seconds"]
    assert value["train/steady_tokens_per_second"] == pytest.approx(tokens_per_step * 9 / later_seconds, rel=1e-6)


def test_off_by_default_and_checked_before_anything_runs(grid_file, tmp_path, capsys, monkeypatch):
    assert run(grid_file, tmp_path) == EXIT_OK
    assert not (tmp_path / "runs" / "tracking").exists()
    assert run(grid_file, tmp_path, "--track", "tensorbord") == EXIT_INVALID
    assert "Did you mean 'tensorboard'" in capsys.readouterr().err
    # A tracker whose package is missing is named with its extra, and nothing trains.
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    assert run(grid_file, tmp_path, "--track", "tensorboard", "--force") == EXIT_INVALID
    assert "pip install 'regla-harness[tracking]'" in capsys.readouterr().err


def test_a_tracker_that_fails_mid_run_warns_once_and_the_run_goes_on(grid_file, tmp_path, monkeypatch):
    calls = []

    class Breaks(tracking.Tracker):
        def __init__(self, log_dir):
            pass

        def log(self, records):
            calls.append(records)
            raise OSError("disk full")

    tracking.TRACKERS.register("breaks", Breaks)
    try:
        with pytest.warns(RuntimeWarning, match="tracker 'breaks' failed .*disk full.*goes on") as caught:
            assert run(grid_file, tmp_path, "--track", "breaks") == EXIT_OK
    finally:
        tracking.TRACKERS.unregister("breaks")
    assert len(calls) == 1  # switched off after its first failure
    assert len([w for w in caught if "breaks" in str(w.message)]) == 1
    rows = results_io.load("tiny", tmp_path / "runs")
    assert set(rows.status) == {"ok"}


def test_a_resumed_run_does_not_double_its_curves(tmp_path):
    """purge_step: events after the resume step, written by the interrupted attempt, are dropped."""
    first = tracking.TensorBoardTracker(tmp_path)
    first.start(0)
    first.log([{"metric": "train/loss", "value": float(step), "step": step} for step in (5, 10, 15)])
    first.close()
    resumed = tracking.TensorBoardTracker(tmp_path)
    resumed.start(10)
    resumed.log([{"metric": "train/loss", "value": 100.0 + step, "step": step} for step in (15, 20)])
    resumed.close()
    assert scalars(tmp_path)["train/loss"] == {5: 5.0, 10: 10.0, 15: 115.0, 20: 120.0}


def test_workers_of_gpus_pass_the_tracker_on():
    from harness.executor import WorkerOptions

    command = WorkerOptions("g.yaml", ("train",), "runs", track="tensorboard", track_dir="/t").command("abc")
    assert command[-4:] == ["--track", "tensorboard", "--track-dir", "/t"]
