"""The mqar stage: Zoology-style associative recall trained from scratch."""

from __future__ import annotations

import numpy as np
import pytest

from harness.config import ConfigError, MQARConfig
from harness.grid import expand_grid, load_grid
from harness.runner import run_grid
from harness.stages.recall import mqar_batch

from .pipeline_helpers import tiny_grid


def test_mqar_sequences_query_every_key_once_after_the_pairs():
    x, y = mqar_batch(16, 48, 6, 64, 0.01, np.random.default_rng(0))
    assert x.shape == y.shape == (16, 48)
    for row in range(16):
        keys, values = x[row, 0:12:2].tolist(), x[row, 1:12:2].tolist()
        assert all(1 <= k < 32 for k in keys) and all(32 <= v < 64 for v in values) and len(set(keys)) == 6
        queried = (y[row] != -100).nonzero().flatten().tolist()
        assert len(queried) == 6 and min(queried) >= 12
        answers = dict(zip(keys, values))
        for position in queried:  # at a query key, the label is that key's value
            assert y[row, position].item() == answers[x[row, position].item()]


def test_mqar_query_gaps_follow_sequential_weighted_draws_without_replacement():
    """The vectorised gap draw has the distribution of numpy's sequential weighted draws (the
    per-row `rng.choice(..., replace=False, p=...)` it replaced), gap by gap."""
    length, pairs, rows = 64, 4, 8000
    slots = (length + 1 - 2 * pairs) // 2
    weights = np.arange(1, slots + 1, dtype=np.float64) ** (0.01 - 1)
    _, y = mqar_batch(rows, length, pairs, 64, 0.01, np.random.default_rng(1))
    gaps = ((y != -100).nonzero()[:, 1].numpy() - 2 * pairs) // 2
    rng = np.random.default_rng(2)
    expected = np.concatenate([rng.choice(slots, pairs, replace=False, p=weights / weights.sum()) for _ in range(rows)])
    ours, theirs = (np.bincount(g, minlength=slots) / g.size for g in (gaps, expected))
    assert gaps.size == rows * pairs and np.abs(ours - theirs).max() < 0.01  # 3.5 sigma at the largest bin
    assert ours[0] > 2 * ours[3] > 0  # the power law's short gaps dominate


def test_mqar_settings_are_checked():
    with pytest.raises(ConfigError, match=r"needs pairs >= 1 and length >= 4 x pairs"):
        MQARConfig(settings=[[16, 8]])
    with pytest.raises(ConfigError, match="mqar.settings entries are"):
        MQARConfig(settings=[64])
    with pytest.raises(ConfigError, match="need vocab_size >= 64"):
        MQARConfig(settings=[[256, 16]], vocab_size=32)


def test_a_softmax_model_learns_recall_well_above_chance_and_stops_at_the_target(corpus, tmp_path):
    data = tiny_grid(corpus)
    data["stages"] = ["mqar"]
    data["base"]["mqar"] = {
        "settings": [[16, 2], [24, 3]], "vocab_size": 32, "steps": 300, "batch_size": 32, "lr": 3e-3,
        "eval_every": 25, "target": 0.3,
    }  # fmt: skip
    data["axes"]["variant"] = {"softmax": {"model.softmax_layers": "all"}}
    grid = expand_grid(data)
    [result] = run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False, device="cpu")
    assert result.status == "ok", result.error
    from harness import results as results_io

    frame = results_io.load("tiny", tmp_path / "runs")
    final = frame[frame.metric == "mqar/final_accuracy"]
    assert len(final) == 2 and (final.value >= 0.3).all()  # chance is 1/16
    steps = frame[frame.metric == "mqar/steps"].value.iloc[0]
    assert steps < 300  # stopped early, once every setting reached the target
    from harness.report import run_table

    table = run_table(frame)
    assert {"mqar acc T16 x2", "mqar acc T24 x3"} <= set(table.columns)


def test_the_mqar_preset_expands_at_both_scales():
    assert len(load_grid("grids/paper/mqar.yaml").runs) == 7
    gpu = load_grid("grids/paper/mqar.yaml", scale="gpu")
    assert len(gpu.runs) == 21 and gpu.runs[0].stages["mqar"]["vocab_size"] == 8192


def test_the_mqar_presets_regla_parts_each_change_one_thing_on_gla():
    """The rows that ask which part of ReGLA slows its recall are GLA with one of ReGLA's parts."""
    attention = {run.axes["variant"]: run.model.attention for run in load_grid("grids/paper/mqar.yaml").runs}
    gla, regla = attention["gla"], attention["regla"]

    def differences(a, b):
        return {name for name in vars(a) if getattr(a, name) != getattr(b, name)}

    assert differences(gla, attention["gla_safe_exp_features"]) == {"feature_map"}
    assert differences(gla, attention["gla_refined_gate"]) == {"gate"}
    assert differences(gla, regla) == {"feature_map", "gate"}


def test_each_seed_of_a_grid_trains_its_own_model_on_its_own_data(corpus, tmp_path, monkeypatch):
    """mqar.seed left unset takes the run's train.seed (what a scale's seeds axis sets); set, it wins."""
    import harness.stages.recall as recall

    seen: list[int] = []
    batches: list[int] = []
    build, batch = recall.build_model, recall.mqar_batch

    def recording_build(config, vocab, seed):
        seen.append(seed)
        return build(config, vocab, seed)

    monkeypatch.setattr(recall, "build_model", recording_build)

    def recording_batch(*args):
        x, y = batch(*args)
        batches.append(int(x.sum()))
        return x, y

    monkeypatch.setattr(recall, "mqar_batch", recording_batch)
    data = tiny_grid(corpus)
    data["stages"] = ["mqar"]
    data["base"]["mqar"] = {"settings": [[16, 2]], "vocab_size": 32, "steps": 1, "batch_size": 4, "eval_every": 1}
    data["axes"] = {
        "seed": {"0": {"train.seed": 0}, "1": {"train.seed": 1}, "fixed": {"train.seed": 2, "mqar.seed": 7}}
    }
    grid = expand_grid(data)
    results = run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False, device="cpu")
    assert [r.status for r in results] == ["ok"] * 3
    assert seen == [0, 1, 7]
    held_out, train = batches[0::2], batches[1::2]  # each run: its held-out batch, then one training batch
    assert len(set(held_out)) == 3 and len(set(train)) == 3


def test_an_mqar_learning_rate_axis_gives_distinct_runs_and_leaves_other_run_ids_alone(corpus):
    """mqar trains its own model, so its settings are part of a run's identity: a sweep over
    `mqar.lr` is a grid of distinct runs (it used to be refused as identical runs). A run with no
    mqar settings keeps the id it had."""
    data = tiny_grid(corpus)
    plain_ids, plain_stages = [run.run_id for run in expand_grid(data).runs], data["stages"]
    data["stages"] = ["mqar"]
    data["base"]["mqar"] = {"settings": [[16, 2]], "vocab_size": 32, "steps": 5}
    data["axes"]["lr"] = {"low": {"mqar.lr": 1e-3}, "high": {"mqar.lr": 3e-3}}
    runs = expand_grid(data).runs
    assert len({run.run_id for run in runs}) == len(runs)
    assert all(run.identity()["stage_models"]["mqar"]["lr"] in (1e-3, 3e-3) for run in runs)
    del data["base"]["mqar"], data["axes"]["lr"]
    data["stages"] = plain_stages
    assert [run.run_id for run in expand_grid(data).runs] == plain_ids


def test_the_head_on_query_positions_alone_gives_the_full_forwards_logits_there():
    import torch

    from harness.config import ModelConfig
    from harness.model import build_model
    from harness.stages.recall import query_logits

    model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=48), 64, 0).double()
    x, y = mqar_batch(3, 48, 4, 64, 0.01, np.random.default_rng(0))
    logits, targets = query_logits(model, x, y)
    full, _ = model(x)
    mask = y != -100
    assert logits.shape == (int(mask.sum()), 64) and torch.equal(targets, y[mask])
    torch.testing.assert_close(logits, full[mask], rtol=1e-12, atol=1e-12)


def test_a_diverging_mqar_run_fails_with_advice_that_names_its_own_learning_rate(corpus, tmp_path):
    """mqar trains with its own settings: the advice for a non-finite loss points at mqar.lr,
    not at train.lr, which this stage does not read."""
    data = tiny_grid(corpus)
    data["stages"] = ["mqar"]
    data["base"]["mqar"] = {"settings": [[16, 2]], "vocab_size": 32, "steps": 20, "batch_size": 4, "lr": 1e30}
    data["axes"]["variant"] = {"softmax": {"model.softmax_layers": "all"}}
    grid = expand_grid(data)
    [result] = run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False, device="cpu")
    assert result.status == "failed" and "non-finite training loss" in result.error
    assert "lower mqar.lr in the grid" in result.advice and "train.lr" not in result.advice
