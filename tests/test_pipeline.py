"""The pipeline end to end on a tiny local corpus: grid files -> specs -> training -> Parquet ->
report, with resume, skipping, failure recording and the errors a user sees."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from harness import results as results_io
from harness.cli import main as cli_main
from harness.config import ConfigError
from harness.grid import expand_grid, filter_runs, load_grid
from harness.report import write_report
from harness.runner import run_grid, stage_status
from harness.spec import spec_from_dict
from variants import FEATURE_MAPS, FeatureMap, FeatureOutput, RegistryError, feature_map

from .pipeline_helpers import tiny_grid


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))


# --- grids and ids --------------------------------------------------------------------------


def test_grid_expands_axes_zip_and_exclude(corpus):
    data = tiny_grid(corpus)
    data["axes"]["train.seed"] = [0, 1]
    data["zip"] = [{"train.lr": [1e-3, 2e-3], "train.warmup_steps": [1, 2]}]
    data["exclude"] = [{"variant": "softmax", "train.seed": 1}]
    grid = expand_grid(data)
    assert len(grid.runs) == 2 * 2 * 2 - 2
    assert grid.axis_names == ("variant", "train.seed", "train.lr+train.warmup_steps")
    names = {r.name for r in grid.runs}
    assert "regla/1/0.002,2" in names and "softmax/1/0.001,1" not in names
    regla = next(r for r in grid.runs if r.name == "regla/0/0.001,1")
    assert regla.model.attention.gate == "refined" and regla.train.lr == 1e-3 and regla.train.warmup_steps == 1
    assert len(set(r.run_id for r in grid.runs)) == len(grid.runs)
    assert [r.name for r in filter_runs(grid.runs, ["variant=regla", "train.seed=1"])] == [
        "regla/1/0.001,1",
        "regla/1/0.002,2",
    ]


def test_run_id_is_stable_and_ignores_what_does_not_change_weights():
    spec = spec_from_dict(
        {
            "model": {"d_model": 64, "attention": {"feature_map": "safe_exp", "gate": "refined"}},
            "train": {"steps": 10, "warmup_steps": 1},
        },
        name="a",
    )
    # Golden id: changing it means every stored result is invalidated; do so only on purpose.
    assert spec.run_id == GOLDEN_RUN_ID
    renamed = spec_from_dict(
        {
            "model": {"d_model": 64, "attention": {"feature_map": "safe_exp", "gate": "refined"}},
            "train": {"steps": 10, "warmup_steps": 1},
        },
        name="b",
        axes={"x": "y"},
        grid="other",
    )
    assert renamed.run_id == spec.run_id
    explicit_defaults = spec_from_dict(
        {
            "model": {
                "d_model": 64,
                "n_layers": 4,
                "attention": {"feature_map": "safe_exp", "gate": "refined", "norm": "rmsnorm"},
            },
            "train": {"steps": 10, "warmup_steps": 1},
        },
        name="c",
    )
    assert explicit_defaults.run_id == spec.run_id
    other = spec_from_dict(
        {
            "model": {"d_model": 64, "attention": {"feature_map": "safe_exp", "gate": "gla"}},
            "train": {"steps": 10, "warmup_steps": 1},
        },
        name="d",
    )
    assert other.run_id != spec.run_id
    # Softmax-only models ignore the linear-attention settings entirely.
    s1 = spec_from_dict({"model": {"softmax_layers": "all", "attention": {"gate": "gla"}}}, name="s1")
    s2 = spec_from_dict({"model": {"softmax_layers": "all", "attention": {"gate": "refined"}}}, name="s2")
    assert s1.run_id == s2.run_id


# Changed on purpose with spec format 2 (plugin packages, resolved plugin options and the number of
# training processes entered the run id) and with attention.norm_eps_frame.
GOLDEN_RUN_ID = "5c2461ea6a30"


def test_plugin_version_enters_the_run_id():
    @feature_map("versioned_test_map", version=1)
    class Versioned(FeatureMap):
        def __init__(self, head_dim, num_heads):
            super().__init__(head_dim, num_heads)

        def forward(self, x, role, state=None):
            return FeatureOutput(x)

    data = {"model": {"attention": {"feature_map": "versioned_test_map"}}}
    before = spec_from_dict(data, name="v").run_id
    Versioned.version = 2
    try:
        assert spec_from_dict(data, name="v").run_id != before
    finally:
        FEATURE_MAPS.unregister("versioned_test_map")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda g: g.update(axes={"variant": {"x": {"model.attention.feature_map": "saf_exp"}}}),
            "Did you mean 'safe_exp'?",
        ),
        (lambda g: g["base"]["train"].update(stepz=3), "unknown key 'stepz' in train (did you mean 'steps'?)"),
        (lambda g: g.update(colour="red"), "unknown grid key(s) 'colour'; allowed: name"),
        (lambda g: g.update(stages=["train", "evaluate"]), "unknown stage 'evaluate'. Did you mean 'eval'?"),
        (lambda g: g["base"].update(modle={}), "unknown top-level key(s) 'modle'"),
        (lambda g: g.update(axes={"variant": "regla"}), "must be a non-empty list of values"),
        (lambda g: g.update(zip=[{"train.lr": [1, 2], "train.seed": [1]}]), "all of the same length"),
        (lambda g: g.update(exclude=[{"nope": 1}]), "must map axis names"),
        (lambda g: g["base"]["model"].update(softmax_layers=[7]), "out of range for 2 layers"),
        (lambda g: g.update(axes={"metric": [1, 2]}), "clash with result columns"),
        (
            lambda g: g.update(reference={"source": "s", "metric": "m", "values": {"regal": 1.0}}),
            "names runs ['regal']",
        ),
        (lambda g: g.update(reference={"values": {}}), "must have exactly the keys source, metric, values"),
        (
            lambda g: g["axes"]["variant"]["regla"]["model.attention"].update(gate_options={"rnak": 4}),
            "gate 'refined' got unknown option(s) rnak; allowed options",
        ),
        (lambda g: g["base"]["data"].update(tokenizer="bpe4096"), "unknown tokenizer 'bpe4096'; allowed: gpt2, byte"),
        (
            lambda g: g["base"]["data"].update(source="text-filez"),
            "unknown data source 'text-filez'. Did you mean 'text-files'? Registered data sources:",
        ),
        (lambda g: g["base"]["data"]["options"].update(patern="x"), "got unknown option(s) ['patern']; allowed:"),
    ],
)
def test_malformed_grids_raise_errors_naming_the_problem(corpus, mutate, message):
    data = tiny_grid(corpus)
    mutate(data)
    with pytest.raises((ConfigError, RegistryError)) as info:
        grid = expand_grid(data)
        # Unknown plugin names surface when the plugin is looked up (the model build / run id).
        [r.run_id for r in grid.runs]
    assert message in str(info.value)


def test_grid_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_grid(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid(tmp_path / "missing.yaml")
    assert cli_main(["run", "no-such-grid", "--dry-run"]) == 2


# --- training, results, resume ---------------------------------------------------------------


def run_tiny(corpus: Path, runs_dir: Path, **kwargs):
    grid = expand_grid(tiny_grid(corpus, **kwargs.pop("train", {})))
    return grid, run_grid(grid, grid.runs, runs_dir=runs_dir, progress=False, **kwargs)


def test_training_lowers_the_loss_and_writes_parquet_rows(corpus, tmp_path):
    grid, outcome = run_tiny(corpus, tmp_path / "runs")
    assert [r.status for r in outcome] == ["ok", "ok"]
    frame = results_io.load("tiny", tmp_path / "runs")
    for run_name, rows in frame.groupby("run_name"):
        train_loss = rows[rows.metric == "train/loss"].sort_values("step")["value"].to_numpy()
        assert train_loss[-1] < train_loss[0] - 0.5, (run_name, train_loss)
        val = rows[rows.metric == "val/loss"].sort_values("step")["value"].to_numpy()
        assert val[-1] < math.log(257), (run_name, val)  # better than uniform over the byte vocabulary
        bpb = rows[rows.metric == "final/val_bits_per_byte"]["value"].item()
        assert 0 < bpb < 8
    # The path the linear layers trained through is recorded (on CPU: the composed passes); the
    # softmax model has no linear layers and no such rows.
    paths = frame[frame.metric.str.startswith("attention/layers_")]
    assert set(paths.run_name) == {"regla"}
    assert dict(zip(paths.metric, paths.value)) == {
        "attention/layers_fused": 0.0,
        "attention/layers_fused_epilogue": 0.0,
        "attention/layers_composed": 2.0,
        "attention/layers_decode_step": 0.0,
    }
    # Every row carries identity, axes, spec and environment.
    assert set(frame["axis:variant"]) == {"softmax", "regla"}
    assert frame["spec_json"].str.contains('"feature_map"').all()
    assert frame["torch"].eq(torch.__version__).all() and frame["device"].str.startswith("cpu").all()


def test_parquet_schema_round_trip(tmp_path):
    spec = spec_from_dict({}, name="r", grid="g", axes={"variant": "x"})
    records = [
        {"metric": "val/loss", "value": 1.5, "step": 3, "split": "validation"},
        {"metric": "acc", "value": 0.25, "stderr": 0.01, "task": "piqa", "shots": 5},
        {"metric": "error", "status": "failed", "error": "boom"},
    ]
    rows = results_io.make_rows(spec, "train", records, results_io.environment(), "2026-01-01T00:00:00+00:00")
    path = tmp_path / "rows.parquet"
    results_io.write_rows(path, rows)
    frame = results_io.read_rows(path)
    assert list(frame.columns) == [*results_io.CORE_COLUMNS, "axis:variant"]
    assert frame["value"].dtype == "float64" and str(frame["step"].dtype) in ("Int64", "int64", "float64")
    assert frame.loc[0, "step"] == 3 and pd.isna(frame.loc[1, "step"]) and frame.loc[1, "shots"] == 5
    assert list(frame["status"]) == ["ok", "ok", "failed"] and frame.loc[2, "error"] == "boom"
    assert (frame["run_id"] == spec.run_id).all() and (frame["axis:variant"] == "x").all()
    with pytest.raises(ValueError, match="unknown fields"):
        results_io.make_rows(spec, "train", [{"metric": "m", "colour": 1}], {}, "")
    assert not list(tmp_path.glob(".*tmp")), "no temp files left behind"


def test_second_run_skips_finished_stages(corpus, tmp_path):
    runs_dir = tmp_path / "runs"
    run_tiny(corpus, runs_dir)
    grid, again = run_tiny(corpus, runs_dir)
    assert [r.status for r in again] == ["skipped-done", "skipped-done"]
    _, forced = run_tiny(corpus, runs_dir, force=True)
    assert [r.status for r in forced] == ["ok", "ok"]


class InterruptAfter:
    """Wraps a dataset; raises KeyboardInterrupt (as a kill would stop the process) after n batches."""

    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n

    def sample_batch(self, *args, **kwargs):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt
        return self.dataset.sample_batch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.dataset, name)


def test_interrupted_training_resumes_to_the_same_result(corpus, tmp_path, monkeypatch):
    import dataclasses

    from harness import stages

    _, reference = run_tiny(corpus, tmp_path / "reference")
    expected = results_io.load("tiny", tmp_path / "reference")

    original = stages.StageContext.data_for

    def interrupted_data(self, spec):
        data = original(self, spec)
        return dataclasses.replace(data, train=InterruptAfter(data.train, 12))

    monkeypatch.setattr(stages.StageContext, "data_for", interrupted_data)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(corpus, tmp_path / "runs")
    grid = expand_grid(tiny_grid(corpus))
    first = grid.runs[0]
    assert stage_status(tmp_path / "runs", first, "train")[0] == "pending"
    assert (tmp_path / "runs" / "tiny" / first.run_id / "training_state.pt").is_file()
    monkeypatch.setattr(stages.StageContext, "data_for", original)
    _, resumed = run_tiny(corpus, tmp_path / "runs")
    assert [r.status for r in resumed] == ["ok", "ok"]
    got = results_io.load("tiny", tmp_path / "runs")
    key = ["run_name", "metric", "step"]

    def losses(frame):
        return frame[frame.metric.isin(["train/loss", "val/loss"])].set_index(key)["value"].sort_index()

    pd.testing.assert_series_equal(losses(got), losses(expected), rtol=1e-5)
    assert not (tmp_path / "runs" / "tiny" / first.run_id / "training_state.pt").exists()


@pytest.fixture
def nan_feature_map():
    """A deliberately broken plugin (every feature NaN), registered only for one test so that the
    registry-parametrized plugin tests never collect it."""

    @feature_map("nan_for_tests")
    class NaNFeatures(FeatureMap):
        positive_kernel = True

        def __init__(self, head_dim, num_heads):
            super().__init__(head_dim, num_heads)

        def forward(self, x, role, state=None):
            return FeatureOutput(x * float("nan"))

    yield "nan_for_tests"
    FEATURE_MAPS.unregister("nan_for_tests")


def test_diverging_run_is_recorded_as_failed_and_the_grid_goes_on(corpus, tmp_path, nan_feature_map):
    data = tiny_grid(corpus)
    data["axes"]["variant"]["broken"] = {"model.attention": {"feature_map": nan_feature_map, "gate": "none"}}
    grid = expand_grid(data)
    outcome = run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False)
    status = {r.run.name: r.status for r in outcome}
    assert status == {"softmax": "ok", "regla": "ok", "broken": "failed"}
    broken = next(r for r in outcome if r.run.name == "broken")
    assert "Diverged" in broken.error and "non-finite training loss" in broken.error
    frame = results_io.load("tiny", tmp_path / "runs")
    failed = frame[frame.run_name == "broken"]
    assert list(failed["status"]) == ["failed"] and "non-finite" in failed["error"].item()
    again = run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False)
    assert {r.run.name: r.status for r in again}["broken"] == "skipped-failed"
    retried = run_grid(grid, [grid.runs[-1]], runs_dir=tmp_path / "runs", progress=False, retry_failed=True)
    assert retried[0].status == "failed"


def test_report_writes_table_plots_and_parquet(corpus, tmp_path):
    run_tiny(corpus, tmp_path / "runs")
    out = write_report("tiny", tmp_path / "runs", tmp_path / "results", "python run_ablations.py run tiny")
    for name in ("RESULTS.md", "results.parquet", "loss_curves.png", "final_metrics.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "RESULTS.md").read_text()
    assert "| softmax |" in text and "| regla |" in text and "val bpb" in text
    assert "feature_map=safe_exp" in text
    assert "attention path" in text and "composed 2" in text
    # Rows of runs that are no longer in the grid (here: all but the first) stay out of its report.
    grid = expand_grid(tiny_grid(corpus))
    out = write_report("tiny", tmp_path / "runs", tmp_path / "results", runs=grid.runs[:1])
    assert "| softmax |" in (out / "RESULTS.md").read_text() and "| regla |" not in (out / "RESULTS.md").read_text()
    reference = {"source": "a paper", "metric": "final/val_perplexity", "values": {"softmax": 18.5}}
    out = write_report("tiny", tmp_path / "runs", tmp_path / "results", reference=reference)
    text = (out / "RESULTS.md").read_text()
    assert "paper val ppl" in text and "18.5" in text and "`paper` column: a paper" in text
    assert len(pd.read_parquet(out / "results.parquet")) == len(results_io.load("tiny", tmp_path / "runs"))


def test_cli_run_dry_run_and_list(corpus, tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_grid(corpus)))
    assert cli_main(["run", str(path), "--dry-run", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "softmax | pending" in out and "2 runs" in out
    assert cli_main(["list", "gate", "ref*"]) == 0
    assert "refined" in capsys.readouterr().out
    assert cli_main(["list", "colour"]) == 2
    assert "unknown axis 'colour'" in capsys.readouterr().err
    assert cli_main(["run", str(path), "--stages", "train,evaluate", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert (
        "unknown stage 'evaluate'. Did you mean 'eval'? Registered stages: eval, mqar, probe, profile, train"
        in capsys.readouterr().err
    )
    assert cli_main(["run", str(path), "--where", "variant=gla", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "matches none of the 2 runs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists(), "a refused command writes nothing"


def test_missing_corpus_and_unreadable_paths_name_the_fix(tmp_path):
    from harness.data import CorpusNotFoundError, UnreadablePathError, prepare_data

    with pytest.raises(UnreadablePathError, match="no file matches"):
        prepare_data("text-files", "byte", {"pattern": str(tmp_path / "none" / "*.txt")})
    with pytest.raises(CorpusNotFoundError, match="prepare_corpora.sh|make data"):
        prepare_data(
            "offline-english",
            "byte",
            {"gcide_dir": str(tmp_path), "wordnet_dir": str(tmp_path), "brown_dir": str(tmp_path)},
        )


def test_smoke_grid_file_is_valid():
    grid = load_grid(Path(__file__).resolve().parent.parent / "grids" / "smoke.yaml")
    names = {r.name for r in grid.runs}
    assert {"softmax", "relu", "elu_plus_one", "fast_decay", "gla", "regla", "hybrid_regla"} <= names
    hybrid = next(r for r in grid.runs if r.name == "hybrid_regla")
    assert 0 < len(hybrid.model.softmax_layer_indices()) < hybrid.model.n_layers
