"""`run --gpus N`: independent runs in worker processes, one per GPU slot, N at a time, with the
results and report of a sequential run. Tested with CPU workers standing in for GPUs."""

from __future__ import annotations

import pytest
import yaml

from harness import results as results_io
from harness.cli import EXIT_INVALID, EXIT_OK, EXIT_RUNS_FAILED
from harness.cli import main as cli_main
from harness.executor import WorkerOptions, run_on_devices
from harness.grid import expand_grid

from .pipeline_helpers import tiny_grid


def three_run_grid(corpus) -> dict:
    data = tiny_grid(corpus, steps=6, eval_every=3, checkpoint_every=3)
    data["stages"] = ["train", "probe"]
    data["axes"]["variant"]["gla"] = {"model.attention": {"feature_map": "identity", "gate": "gla"}}
    return data


def final_losses(runs_dir) -> dict[str, float]:
    frame = results_io.load("tiny", runs_dir)
    final = frame[frame.metric == "final/val_loss"]
    assert not final.duplicated("run_name").any()  # each run trained (and recorded) once
    return dict(zip(final.run_name, final.value))


def test_parallel_workers_give_the_results_of_a_sequential_run(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(three_run_grid(corpus)))
    common = ["--device", "cpu", "--no-progress", "--results-dir", str(tmp_path / "results")]
    assert cli_main(["run", str(path), "--runs-dir", str(tmp_path / "sequential"), *common]) == EXIT_OK
    capsys.readouterr()
    assert cli_main(["run", str(path), "--runs-dir", str(tmp_path / "parallel"), "--gpus", "2", *common]) == EXIT_OK
    out = capsys.readouterr().out
    assert "stages: ok 6" in out and "report:" in out
    sequential, parallel = final_losses(tmp_path / "sequential"), final_losses(tmp_path / "parallel")
    assert set(parallel) == {"softmax", "regla", "gla"}
    for run, value in sequential.items():
        assert abs(parallel[run] - value) <= 1e-5 * abs(value), run
    frame = results_io.load("tiny", tmp_path / "parallel")
    assert set(frame[frame.stage == "probe"].run_name) == {"softmax", "regla", "gla"}
    # A second parallel run finds everything done.
    assert cli_main(["run", str(path), "--runs-dir", str(tmp_path / "parallel"), "--gpus", "2", *common]) == EXIT_OK
    assert "stages: ok 6" in capsys.readouterr().out


def test_workers_get_one_gpu_slot_each_and_failures_come_back(corpus, tmp_path, monkeypatch):
    """The scheduling itself, with the worker processes replaced by stand-ins that record the GPU
    slot they were given and write nothing (so every stage comes back as failed)."""
    import subprocess

    started: list[tuple[str, str]] = []

    class FakeWorker:
        def __init__(self, command, env):
            run_id = command[command.index("--only-run") + 1]
            started.append((run_id, env["CUDA_VISIBLE_DEVICES"]))
            self.polls = 0

        def poll(self):
            self.polls += 1
            return 3 if self.polls > 1 else None

    monkeypatch.setattr(subprocess, "Popen", FakeWorker)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    grid = expand_grid(three_run_grid(corpus))
    options = WorkerOptions(str(tmp_path / "tiny.yaml"), ("train",), str(tmp_path / "runs"), device="cpu")
    results = run_on_devices(grid.runs, options, devices=2, progress=False)
    assert [run_id for run_id, _ in started] == [spec.run_id for spec in grid.runs]
    assert [slot for _, slot in started] == ["0", "1", "0"]  # the third waits for a free slot
    assert {r.status for r in results} == {"failed"}
    assert all("exited with code 3" in r.error for r in results)


def test_several_runs_share_a_gpu_with_runs_per_gpu(corpus, tmp_path, monkeypatch):
    import subprocess

    started: list[str] = []
    running: set[int] = set()
    most_at_once = 0

    class FakeWorker:
        def __init__(self, command, env):
            nonlocal most_at_once
            started.append(env["CUDA_VISIBLE_DEVICES"])
            self.id, self.polls = len(started), 0
            running.add(self.id)
            most_at_once = max(most_at_once, len(running))

        def poll(self):
            self.polls += 1
            if self.polls > 1:
                running.discard(self.id)
                return 0
            return None

    monkeypatch.setattr(subprocess, "Popen", FakeWorker)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    grid = expand_grid(three_run_grid(corpus))
    runs = grid.runs * 2  # six workers
    options = WorkerOptions(str(tmp_path / "tiny.yaml"), ("train",), str(tmp_path / "runs"), device="cpu")
    run_on_devices(runs, options, devices=2, runs_per_device=2, progress=False)
    assert started[:4] == ["0", "1", "0", "1"]  # four slots over two GPUs, filled at once
    assert most_at_once == 4
    assert len(started) == 6


def test_runs_per_gpu_is_checked(tmp_path, capsys):
    assert cli_main(["run", "smoke", "--runs-per-gpu", "2", "--runs-dir", str(tmp_path)]) == EXIT_INVALID
    assert "--runs-per-gpu needs --gpus" in capsys.readouterr().err
    assert cli_main(["run", "smoke", "--gpus", "2", "--runs-per-gpu", "0", "--runs-dir", str(tmp_path)]) == EXIT_INVALID
    assert "positive number of runs" in capsys.readouterr().err


def test_a_failed_run_in_a_worker_is_reported_and_sets_the_exit_code(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    data = tiny_grid(corpus, steps=4, eval_every=2)
    data["axes"]["variant"]["diverges"] = {"model.attention": {"feature_map": "identity", "gate": "gla"}}
    data["axes"]["variant"]["diverges"]["train.lr"] = 1e12
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    command = ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    assert cli_main([*command, "--gpus", "3", "--device", "cpu", "--no-progress"]) == EXIT_RUNS_FAILED
    out = capsys.readouterr().out
    assert "failed: diverges [train] Diverged" in out and "lower train.lr" in out


def test_worker_command_line():
    options = WorkerOptions("g.yaml", ("train", "eval"), "runs", device="cuda", force=True, plugins=("lab.maps",))
    command = options.command("abc123")
    assert command[2:4] == ["--plugin", "lab.maps"]
    assert command[4:] == [
        "run", "g.yaml", "--only-run", "abc123", "--stages", "train,eval", "--runs-dir", "runs",
        "--device", "cuda", "--no-report", "--no-progress", "--force",
    ]  # fmt: skip


def test_a_grid_as_a_job_array_through_submitit_local_executor(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(three_run_grid(corpus)))
    command = ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    command += ["--device", "cpu", "--no-progress"]
    # One run done beforehand: only the two pending ones are submitted.
    assert cli_main([*command, "--where", "variant=softmax"]) == EXIT_OK
    capsys.readouterr()
    assert cli_main([*command, "--submit", "local", "--submit-folder", str(tmp_path / "submitit")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "stages: ok 6" in out and "report:" in out
    logs = sorted(p.name for p in (tmp_path / "submitit").glob("*_result.pkl"))
    assert len(logs) == 2, logs  # two array tasks, one per pending run
    assert set(final_losses(tmp_path / "runs")) == {"softmax", "regla", "gla"}
    assert cli_main([*command, "--submit", "local", "--submit-folder", str(tmp_path / "submitit")]) == EXIT_OK
    assert "nothing to submit" in capsys.readouterr().out


def test_a_report_names_the_scale_it_was_run_at():
    from harness.cli import rerun_command

    assert rerun_command("paper/ablation", "gpu") == "python run_ablations.py run paper/ablation --scale gpu"
    assert rerun_command("smoke", None, "eval") == "python run_ablations.py run smoke --stages eval"


def test_a_grid_resumes_elsewhere_from_its_committed_results_parquet(corpus, tmp_path, capsys, monkeypatch):
    """`restore` writes a report's results.parquet back into run folders: `run` on another machine
    (another runs folder) then skips every restored stage, and the report has the same rows."""
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_grid(corpus, steps=4, eval_every=2)))
    first = ["--runs-dir", str(tmp_path / "first"), "--results-dir", str(tmp_path / "results")]
    assert cli_main(["run", str(path), *first, "--device", "cpu", "--no-progress"]) == EXIT_OK
    committed = tmp_path / "results" / "tiny" / "results.parquet"
    before = results_io.load("tiny", tmp_path / "first")
    capsys.readouterr()

    elsewhere = tmp_path / "elsewhere"
    assert cli_main(["restore", str(committed), "--runs-dir", str(elsewhere)]) == EXIT_OK
    assert "restored 2 stage result(s) of 2 run(s) of grid tiny" in capsys.readouterr().out
    assert cli_main(["restore", str(committed), "--runs-dir", str(elsewhere)]) == EXIT_OK
    assert "(2 already there, kept)" in capsys.readouterr().out  # nothing overwritten
    command = ["run", str(path), "--runs-dir", str(elsewhere), "--results-dir", str(tmp_path / "results2")]
    assert cli_main([*command, "--device", "cpu", "--no-progress"]) == EXIT_OK
    assert not list(elsewhere.glob("tiny/*/model"))  # nothing trained again
    after = results_io.load("tiny", elsewhere)
    columns = ["run_id", "stage_id", "metric", "step", "value"]
    key = ["run_id", "metric", "step"]
    assert (
        after[columns]
        .sort_values(key)
        .reset_index(drop=True)
        .equals(before[columns].sort_values(key).reset_index(drop=True))
    )


def test_restore_refuses_a_file_that_is_not_a_results_file(tmp_path, capsys):
    import pandas as pd

    other = tmp_path / "other.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(other)
    assert cli_main(["restore", str(other), "--runs-dir", str(tmp_path / "runs")]) == EXIT_INVALID
    assert "not a results file of this harness" in capsys.readouterr().err
    assert cli_main(["restore", str(tmp_path / "missing.parquet")]) == EXIT_INVALID


def test_workers_get_the_gpus_cuda_visible_devices_allows(monkeypatch):
    """A grid started on GPU 1 alone (CUDA_VISIBLE_DEVICES=1, --gpus 1) must not put its workers
    on GPU 0, where another job may be running."""
    from harness.executor import visible_devices

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert visible_devices(1) == ["1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5,6")
    assert visible_devices(2) == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(ValueError, match=r"--gpus 2 needs 2 GPUs, and CUDA_VISIBLE_DEVICES='1' makes 1 visible"):
        visible_devices(2)
