"""The probe and profile stages on a tiny grid: rows land in Parquet, plots in the report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from harness import results as results_io
from harness.grid import expand_grid
from harness.report import plot_profile, write_report
from harness.runner import run_grid

from .pipeline_helpers import tiny_grid


def test_probe_and_profile_stages(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    data = tiny_grid(corpus, steps=10, eval_every=5)
    data["stages"] = ["train", "probe", "profile"]
    data["base"]["probe"] = {"batches": 1, "batch_size": 4, "bins": 10}
    data["base"]["profile"] = {
        "seq_lens": [16, 32],
        "batch_size": 2,
        "generation_lengths": [4, 8],
        "warmup": 1,
        "repeats": 2,
    }
    grid = expand_grid(data)
    outcome = run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False)
    assert {r.status for r in outcome} == {"ok"}
    frame = results_io.load("tiny", tmp_path / "runs")

    probe = frame[(frame.stage == "probe") & (frame.run_name == "regla")]
    hist = probe[probe.metric == "gate/hist"]
    for (step, gate), group in hist.groupby(
        [hist.step, hist.extra.map(lambda e: (json.loads(e)["layer"], json.loads(e)["gate"]))]
    ):
        assert abs(group.value.sum() - 1.0) < 1e-5, (step, gate)  # fractions of all activations
    assert set(hist.step) == {0, 10}
    gates = {json.loads(e)["gate"] for e in probe.extra}
    assert gates == {"g", "r", "F"}
    grads = probe[probe.metric == "gate/grad_abs_mean"]
    assert len(grads) and (grads.value > 0).all()
    assert frame[(frame.stage == "probe") & (frame.run_name == "softmax")].metric.tolist() == ["gate/none"]

    profile = frame[frame.stage == "profile"]
    for run_name in ("softmax", "regla"):
        rows = profile[profile.run_name == run_name]
        throughput = rows[rows.metric == "profile/train_tokens_per_second"]
        assert sorted(json.loads(e)["seq_len"] for e in throughput.extra) == [16, 32]
        assert (throughput.value > 0).all()
        saved = rows[rows.metric == "profile/train_saved_for_backward_mib"].sort_values("extra")
        saved = {json.loads(e)["seq_len"]: v for e, v in zip(saved.extra, saved.value)}
        assert 0 < saved[16] < saved[32]  # activations kept for the backward grow with the length
        generation = rows[rows.metric == "profile/generate_total_ms"]
        assert sorted(json.loads(e)["generated"] for e in generation.extra) == [4, 8]
        assert not any(json.loads(e)["cuda_graphs"] for e in generation.extra)  # CPU: the plain loop

    out = write_report("tiny", tmp_path / "runs", tmp_path / "results")
    assert (out / "gate_saturation.png").stat().st_size > 0
    assert "Gate saturation" in (out / "RESULTS.md").read_text()


def test_eval_stage_scores_the_trained_model_and_reports_per_task(corpus, tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    import pytest

    from harness.config import ConfigError

    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    fixtures = Path(__file__).resolve().parent / "fixtures" / "lm_eval" / "paper"
    data_dir = tmp_path / "eval-data"
    for task in ("piqa", "boolq"):  # arc_easy's files are deliberately absent
        shutil.copytree(fixtures / task, data_dir / task)
    data = tiny_grid(corpus, steps=10, eval_every=5)
    data["stages"] = ["train", "eval"]
    data["base"]["eval"] = {
        "tasks": ["piqa", "boolq", "arc_eazy"],
        "limit": 4,
        "batch_size": 4,
        "data_dir": str(data_dir),
    }
    with pytest.raises(ConfigError, match="unknown evaluation task 'arc_eazy'"):
        expand_grid(data)
    data["base"]["eval"]["tasks"] = ["piqa", "boolq", "arc_easy"]
    grid = expand_grid(data)
    outcome = run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False)
    # Training succeeded; evaluation ran but one task had no data: partial, naming the task.
    assert {(r.stage, r.status) for r in outcome} == {("train", "ok"), ("eval", "partial")}, [r.error for r in outcome]
    assert all("arc_easy" in r.error for r in outcome if r.stage == "eval")
    frame = results_io.load("tiny", tmp_path / "runs")
    evals = frame[frame.stage == "eval"]
    for run_name in ("softmax", "regla"):
        rows = evals[evals.run_name == run_name]
        ok = rows[rows.status == "ok"]
        assert set(ok.task) == {"piqa", "boolq"}
        acc = ok[ok.metric == "acc"]
        assert len(acc) == 2 and ((acc.value >= 0) & (acc.value <= 1)).all()
        assert ok.extra.map(lambda e: "lm_eval_version" in e).all()
        missing = rows[rows.status == "failed"]
        assert set(missing.task) == {"arc_easy"} and missing.error.str.contains("arc_easy").all()
    out = write_report("tiny", tmp_path / "runs", tmp_path / "results")
    text = (out / "RESULTS.md").read_text()
    assert "piqa acc 0-shot" in text and "boolq acc 0-shot" in text
    # lm-eval's own results JSON of each scored (task, shots) is kept beside the rows.
    spec = grid.runs[0]
    raw = tmp_path / "runs" / "tiny" / spec.run_id / f"eval-{spec.stage_id('eval')}-lm_eval"
    assert sorted(p.name for p in raw.iterdir()) == ["boolq-0shot.json", "piqa-0shot.json"]
    assert "acc,none" in json.loads((raw / "piqa-0shot.json").read_text())["results"]["piqa"]
    # Every failed task is listed with its run and reason, not silently left out.
    assert "## Failures (2)" in text
    assert "| softmax | eval | arc_easy (0-shot) | task arc_easy: TaskDataMissing" in text
    assert "| regla | eval | arc_easy (0-shot) |" in text
    # A stage with failed tasks is kept as it is, and re-run on request once the data is there.
    again = run_grid(grid, grid.runs, stages=["eval"], runs_dir=tmp_path / "runs", progress=False)
    assert {r.status for r in again} == {"skipped-partial"} and all("arc_easy" in r.error for r in again)
    shutil.copytree(fixtures / "arc_easy", data_dir / "arc_easy")
    retried = run_grid(grid, grid.runs, stages=["eval"], runs_dir=tmp_path / "runs", progress=False, retry_failed=True)
    assert {r.status for r in retried} == {"ok"}
    frame = results_io.load("tiny", tmp_path / "runs")
    assert (frame[(frame.stage == "eval")].status == "ok").all()


def profiled_tiny_grid(corpus, **profile):
    data = tiny_grid(corpus, steps=10, eval_every=5)
    data["stages"] = ["profile"]
    data["base"]["profile"] = {"seq_lens": [16, 32], "batch_size": 2, "generation_lengths": [4], "warmup": 1}
    data["base"]["profile"].update(repeats=2, **profile)
    return data


def test_profile_train_cuda_graph_must_be_a_boolean():
    from harness.config import ConfigError, ProfileConfig

    with pytest.raises(ConfigError, match=r"profile.train_cuda_graph must be true or false; got 'yes'"):
        ProfileConfig(train_cuda_graph="yes")


def test_the_replayed_training_step_is_timed_on_cuda_only(corpus, tmp_path, monkeypatch):
    """On the CPU the setting times nothing more and fails nothing: a graph needs CUDA."""
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    grid = expand_grid(profiled_tiny_grid(corpus, train_cuda_graph=True))
    outcome = run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False, device="cpu")
    assert {r.status for r in outcome} == {"ok"}
    metrics = set(results_io.load("tiny", tmp_path / "runs").metric)
    assert "profile/train_tokens_per_second" in metrics
    assert not {m for m in metrics if m.startswith("profile/train_graph")}


def test_the_profile_plot_draws_replayed_throughput_beside_the_eager(tmp_path):
    throughputs = {"profile/train_tokens_per_second": 100.0, "profile/train_graph_tokens_per_second": 200.0}
    rows = [
        {"run_name": "gla", "stage": "profile", "status": "ok", "metric": metric, "value": per_token * t}
        | {"extra": json.dumps({"seq_len": t})}
        for t in (16, 32)
        for metric, per_token in throughputs.items()
    ]
    assert plot_profile(pd.DataFrame(rows), tmp_path / "profile.png")
    assert (tmp_path / "profile.png").stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_replayed_training_step_is_timed_beside_the_eager_one(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    grid = expand_grid(profiled_tiny_grid(corpus, train_cuda_graph=True))
    outcome = run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False, device="cuda")
    assert {r.status for r in outcome} == {"ok"}
    frame = results_io.load("tiny", tmp_path / "runs")
    for run_name in ("softmax", "regla"):
        rows = frame[(frame.run_name == run_name) & (frame.metric == "profile/train_graph_tokens_per_second")]
        assert sorted(json.loads(e)["seq_len"] for e in rows.extra) == [16, 32]
        assert (rows.value > 0).all()
        steps = frame[(frame.run_name == run_name) & (frame.metric == "profile/train_graph_step_ms")]
        assert len(steps) == 2 and (steps.value > 0).all() and (steps.status == "ok").all()
    out = write_report("tiny", tmp_path / "runs", tmp_path / "results")
    assert "train_graph_tokens_per_second @ 32" in (out / "RESULTS.md").read_text()
