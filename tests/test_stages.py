"""The probe and profile stages on a tiny grid: rows land in Parquet, plots in the report."""
from __future__ import annotations

import json

from harness import results as results_io
from harness.grid import expand_grid
from harness.report import write_report
from harness.runner import run_grid

from .test_pipeline import corpus, tiny_grid  # noqa: F401  (fixture reuse)


def test_probe_and_profile_stages(corpus, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    data = tiny_grid(corpus, steps=10, eval_every=5)
    data["stages"] = ["train", "probe", "profile"]
    data["base"]["probe"] = {"batches": 1, "batch_size": 4, "bins": 10}
    data["base"]["profile"] = {"seq_lens": [16, 32], "batch_size": 2, "generation_lengths": [4, 8],
                               "warmup": 1, "repeats": 2}
    grid = expand_grid(data)
    outcome = run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False)
    assert {r.status for r in outcome} == {"ok"}
    frame = results_io.load("tiny", tmp_path / "runs")

    probe = frame[(frame.stage == "probe") & (frame.run_name == "regla")]
    hist = probe[probe.metric == "gate/hist"]
    for (step, gate), group in hist.groupby([hist.step, hist.extra.map(lambda e: (json.loads(e)["layer"], json.loads(e)["gate"]))]):
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
        generation = rows[rows.metric == "profile/generate_total_ms"]
        assert sorted(json.loads(e)["generated"] for e in generation.extra) == [4, 8]

    out = write_report("tiny", tmp_path / "runs", tmp_path / "results")
    assert (out / "gate_saturation.png").stat().st_size > 0
    assert "Gate saturation" in (out / "RESULTS.md").read_text()
