"""Failures that cannot hide: exit codes and summaries, settings checked before compute,
recoverable corrupt files, run ids that see plugin changes, and a lock shared by two processes."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness import results as results_io
from harness import spec as spec_module
from harness.cli import EXIT_INVALID, EXIT_OK, EXIT_RUNS_FAILED
from harness.cli import main as cli_main
from harness.config import ConfigError
from harness.grid import expand_grid
from harness.runner import run_dir, run_grid, stage_path
from harness.spec import spec_from_dict
from harness.train import digest_path, load_training_state, save_training_state
from variants import FEATURE_MAPS, FeatureMap, FeatureOutput, feature_map

from .pipeline_helpers import tiny_grid

NAN_PLUGIN = '''
"""A feature map whose output turns NaN after a few calls: a run that diverges."""
import torch
from variants import FeatureMap, FeatureOutput, feature_map

CALLS = {"n": 0}


@feature_map("nan_after_a_while_external")
class NanAfterAWhile(FeatureMap):
    def forward(self, x, role, state=None):
        CALLS["n"] += 1
        return FeatureOutput(x * float("nan") if CALLS["n"] > 8 else x)
'''


@pytest.fixture
def nan_plugin(tmp_path, monkeypatch):
    (tmp_path / "nan_plugin_module.py").write_text(NAN_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "nan_plugin_module"
    FEATURE_MAPS.unregister("nan_after_a_while_external")
    sys.modules.pop("nan_plugin_module", None)


def write_grid(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_arguments(path: Path, tmp_path: Path) -> list[str]:
    """`run <grid file>` with its runs and results under tmp_path."""
    return ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]


def cli(path: Path, tmp_path: Path, *extra: str) -> int:
    return cli_main([*run_arguments(path, tmp_path), "--no-progress", *extra])


def trained_anything(tmp_path: Path) -> bool:
    return any((tmp_path / "runs").rglob("train-*.parquet"))


# -- exit codes and summaries -----------------------------------------------------------------


def test_a_failed_run_makes_run_exit_1_naming_it_with_advice(corpus, tmp_path, nan_plugin, capsys):
    data = tiny_grid(corpus, steps=6, eval_every=3, checkpoint_every=3)
    data["plugins"] = [nan_plugin]
    data["axes"]["variant"]["diverges"] = {"model.attention": {"feature_map": "nan_after_a_while_external"}}
    path = write_grid(tmp_path, data)
    assert cli(path, tmp_path) == EXIT_RUNS_FAILED
    out = capsys.readouterr().out
    assert "stages: failed 1, ok 2" in out
    assert "failed: diverges [train] Diverged: non-finite values in the forward at step 2" in out
    assert "-> the loss became non-finite: lower train.lr" in out
    results = (tmp_path / "results" / "tiny" / "RESULTS.md").read_text()
    assert "## Failures (1)" in results and "| diverges | train |" in results and "lower train.lr" in results
    # Nothing new runs the second time, and the failure still shows, with the same advice.
    assert cli(path, tmp_path) == EXIT_RUNS_FAILED
    out = capsys.readouterr().out
    assert "failed (in an earlier run): diverges [train] Diverged: non-finite" in out and "lower train.lr" in out
    # Without the failing run the grid is fine.
    assert cli(path, tmp_path, "--where", "variant=softmax,regla") == EXIT_OK


# -- settings checked before compute ----------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda g: g["axes"]["variant"]["regla"]["model.attention"].update(
                feature_map_options={"key_max": "chunkk"}
            ),
            "safe_exp: key_max must be one of sequence, chunk, running; got 'chunkk'",
        ),
        (
            lambda g: g["base"]["train"].update(seq_len=64),
            "train.seq_len (64) is longer than model.max_seq_len (32)",
        ),
        (
            lambda g: g["axes"]["variant"]["regla"]["model.attention"].update(
                norm="denominator", feature_map="identity"
            ),
            "the denominator normalisation divides by phi(q)·z",
        ),
    ],
    ids=["option_value", "seq_len", "denominator_needs_positive_kernel"],
)
def test_bad_settings_are_refused_when_the_grid_loads(corpus, tmp_path, capsys, mutate, message):
    data = tiny_grid(corpus)
    mutate(data)
    with pytest.raises(ConfigError, match="run 'regla'|train.seq_len"):
        expand_grid(data)
    path = write_grid(tmp_path, data)
    for extra in (["--dry-run"], []):
        assert cli(path, tmp_path, *extra) == EXIT_INVALID
        assert message in capsys.readouterr().err
    assert not trained_anything(tmp_path)


def test_a_corpus_too_small_for_a_split_is_refused_naming_the_split(tmp_path, capsys):
    corpus = tmp_path / "two-files"
    corpus.mkdir()
    for i in range(2):  # text-files holds out whole files: two files leave validation empty
        (corpus / f"{i}.txt").write_text("a few words of text in a small file " * 20)
    data = tiny_grid(corpus)
    data["base"]["data"]["options"]["pattern"] = str(corpus / "*.txt")
    path = write_grid(tmp_path, data)
    for extra in (["--dry-run"], []):
        assert cli(path, tmp_path, *extra) == EXIT_INVALID
        err = capsys.readouterr().err
        assert "the validation split of data source 'text-files'" in err
        assert "has 0 tokens" in err and "one window of train.seq_len + 1 = 33 tokens" in err
        assert "at least 3 files" in err
    assert not trained_anything(tmp_path)


def test_an_unwritable_results_directory_is_refused_before_training(corpus, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = write_grid(tmp_path, tiny_grid(corpus))
    code = cli_main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(blocker / "results")])
    assert code == EXIT_INVALID
    err = capsys.readouterr().err
    assert f"results directory '{blocker / 'results'}' is not writable" in err and "--results-dir" in err
    assert not trained_anything(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_device_that_is_not_there_is_refused_before_training(corpus, tmp_path, capsys):
    path = write_grid(tmp_path, tiny_grid(corpus))
    assert cli(path, tmp_path, "--device", "cuda") == EXIT_INVALID
    assert "--device 'cuda': no CUDA device is available here" in capsys.readouterr().err
    assert cli(path, tmp_path, "--device", "gpu0") == EXIT_INVALID
    assert "use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert not trained_anything(tmp_path)


# -- corrupt files are set aside, and the run goes on ----------------------------------------


def small_state(run_id: str = "r") -> dict:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    return {
        "run_id": run_id,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": 3,
        "records": [{"metric": "train/loss", "value": 1.5, "step": 3, "split": "train"}],
        "seconds": 0.5,
    }


def test_training_state_round_trips_with_weights_only(tmp_path):
    path = tmp_path / "training_state.pt"
    save_training_state(path, small_state())
    assert digest_path(path).is_file()
    state = load_training_state(path, torch.device("cpu"))
    assert state["step"] == 3 and state["records"][0]["value"] == 1.5


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_a_byte"])
def test_a_damaged_training_state_is_set_aside(tmp_path, damage):
    path = tmp_path / "training_state.pt"
    save_training_state(path, small_state())
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a zip archive at all")
        digest_path(path).unlink()  # no record: loading itself must notice
    else:
        # One byte inside the tensor data: still a valid archive, caught by the checksum alone.
        middle = len(blob) // 2
        path.write_bytes(blob[:middle] + bytes([blob[middle] ^ 0xFF]) + blob[middle + 1 :])
    with pytest.warns(UserWarning, match="training_state.pt could not be read"):
        assert load_training_state(path, torch.device("cpu")) is None
    assert not path.exists()
    assert len(list(tmp_path.glob("training_state.pt.corrupt-*"))) == 1


class RunsCodeWhenUnpickled:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    RunsCodeWhenUnpickled.ran = True
    return "ran"


def test_a_training_state_that_carries_code_is_refused_without_running_it(tmp_path):
    path = tmp_path / "training_state.pt"
    state = small_state()
    state["records"] = [RunsCodeWhenUnpickled()]
    torch.save(state, path)
    with pytest.warns(UserWarning, match="set aside"):
        assert load_training_state(path, torch.device("cpu")) is None
    assert not RunsCodeWhenUnpickled.ran


def test_a_run_with_a_corrupt_training_state_restarts_and_finishes(corpus, tmp_path):
    grid = expand_grid(tiny_grid(corpus, steps=6, eval_every=3, checkpoint_every=3))
    spec = grid.runs[1]
    directory = run_dir(tmp_path / "runs", spec)
    directory.mkdir(parents=True)
    (directory / "training_state.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="set aside"):
        outcome = run_grid(grid, [spec], runs_dir=tmp_path / "runs", progress=False)
    assert [r.status for r in outcome] == ["ok"]
    assert list(directory.glob("training_state.pt.corrupt-*"))
    assert not (directory / "training_state.pt").exists()


def test_a_corrupt_result_file_is_set_aside_and_its_stage_runs_again(corpus, tmp_path, capsys):
    data = tiny_grid(corpus, steps=4, eval_every=2, checkpoint_every=2)
    path = write_grid(tmp_path, data)
    assert cli(path, tmp_path) == EXIT_OK
    grid = expand_grid(data)
    damaged = stage_path(tmp_path / "runs", grid.runs[0], "train")
    damaged.write_bytes(damaged.read_bytes()[:100])
    capsys.readouterr()
    # The dry run and the report cope; the dry run shows the stage pending again.
    with pytest.warns(UserWarning, match="set aside"):
        assert cli(path, tmp_path, "--dry-run") == EXIT_OK
    assert "softmax | pending" in capsys.readouterr().out
    assert cli(path, tmp_path) == EXIT_OK
    frame = results_io.load("tiny", tmp_path / "runs")
    train = frame[frame.stage == "train"]
    assert not train.duplicated(["run_id", "metric", "step"]).any()
    assert set(train.run_name) == {"softmax", "regla"}
    assert (train.metric == "final/val_loss").sum() == 2


# -- the run id sees what changes a run ---------------------------------------------------------


def pow_map(default_power: float, package_module: str | None = None):
    class PowerMap(FeatureMap):
        positive_kernel = True

        def __init__(self, head_dim, num_heads, *, power: float = default_power):
            super().__init__(head_dim, num_heads)
            self.power = power

        def forward(self, x, role, state=None):
            return FeatureOutput(torch.relu(x) ** self.power)

    if package_module:
        PowerMap.__module__ = package_module
    return PowerMap


def run_id_with(cls) -> str:
    feature_map("power_external", version=1)(cls)
    try:
        data = {"model": {"attention": {"feature_map": "power_external"}}}
        return spec_from_dict(data, name="p").run_id
    finally:
        FEATURE_MAPS.unregister("power_external")


def test_the_run_id_changes_with_a_plugin_default_option():
    assert run_id_with(pow_map(2.0)) == run_id_with(pow_map(2.0))
    assert run_id_with(pow_map(2.0)) != run_id_with(pow_map(3.0))


def test_the_run_id_changes_with_the_plugin_package_version(tmp_path, monkeypatch):
    def install(version: str) -> None:
        for old in tmp_path.glob("*.dist-info"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        info = tmp_path / f"lab_plugins-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lab-plugins\nVersion: {version}\n")
        (info / "top_level.txt").write_text("lab_plugins\n")
        spec_module._distributions.cache_clear()

    (tmp_path / "lab_plugins").mkdir()
    (tmp_path / "lab_plugins" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        install("1.0")
        assert spec_module.package_of(pow_map(2.0, "lab_plugins.maps")) == "lab-plugins==1.0"
        first = run_id_with(pow_map(2.0, "lab_plugins.maps"))
        install("1.1")
        assert run_id_with(pow_map(2.0, "lab_plugins.maps")) != first
    finally:
        spec_module._distributions.cache_clear()


def test_the_run_id_changes_with_the_number_of_training_processes(corpus, monkeypatch):
    one = expand_grid(tiny_grid(corpus))
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = expand_grid(tiny_grid(corpus))
    assert [s.processes for s in two.runs] == [2, 2]
    assert {s.run_id for s in one.runs}.isdisjoint({s.run_id for s in two.runs})


# -- two processes on one grid share it ---------------------------------------------------------


def test_a_run_held_by_another_process_is_left_to_it(corpus, tmp_path, capsys):
    data = tiny_grid(corpus, steps=4, eval_every=2, checkpoint_every=2)
    grid = expand_grid(data)
    held = run_dir(tmp_path / "runs", grid.runs[0])
    held.mkdir(parents=True)
    with open(held / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another `run` of the grid would
        path = write_grid(tmp_path, data)
        assert cli(path, tmp_path) == EXIT_OK
        out = capsys.readouterr().out
        assert "skipped-busy 1" in out and "another process holds their run" in out
        assert not stage_path(tmp_path / "runs", grid.runs[0], "train").exists()
        assert stage_path(tmp_path / "runs", grid.runs[1], "train").exists()
    assert cli(path, tmp_path) == EXIT_OK  # released: now it trains here
    assert stage_path(tmp_path / "runs", grid.runs[0], "train").exists()


# -- fault injection ----------------------------------------------------------------------------


FAULT_SEEDS = (11, 12, 13)


def test_killed_runs_and_a_corrupt_file_recover_with_every_row_once(corpus, tmp_path):
    """Kill `run` at random points (a few seeds, bounded time), then damage a random result file:
    a plain re-run completes with every stage's rows present exactly once."""
    import random
    import signal
    import subprocess
    import time

    root = Path(__file__).resolve().parent.parent
    data = tiny_grid(corpus, steps=30, eval_every=10, checkpoint_every=3, log_every=3)
    data["stages"] = ["train", "probe"]
    path = write_grid(tmp_path, data)
    env = {**os.environ, "REGLA_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(root / "run_ablations.py"), *run_arguments(path, tmp_path), "--no-progress"]
    # Prepare the data once, so the kills land in training rather than in tokenization.
    subprocess.run([*command, "--dry-run"], env=env, check=True, capture_output=True, timeout=300)
    interrupted = 0
    for seed in FAULT_SEEDS:
        rng = random.Random(seed)
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 8.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        # 2 runs x 2 stages: fewer result files means the kill cut the grid short.
        interrupted += len(list((tmp_path / "runs" / "tiny").glob("*/*.parquet"))) < 4
    assert interrupted >= 1, "no kill landed before the grid finished: the test would prove nothing"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    files = sorted((tmp_path / "runs" / "tiny").glob("*/*.parquet"))
    victim = random.Random(0).choice(files)
    victim.write_bytes(victim.read_bytes()[: max(1, victim.stat().st_size // 3)])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "set aside" in done.stderr
    frame = results_io.load("tiny", tmp_path / "runs")
    assert set(frame.status) == {"ok"}
    key = ["run_id", "stage", "metric", "step", "extra"]
    assert not frame.duplicated(key).any()
    for stage in ("train", "probe"):
        assert set(frame[frame.stage == stage].run_name) == {"softmax", "regla"}
    train = frame[frame.stage == "train"]
    for _, rows in train.groupby("run_id"):
        assert sorted(rows[rows.metric == "val/loss"].step) == [10, 20, 30]
        assert sorted(rows[rows.metric == "train/loss"].step) == list(range(3, 31, 3))


# -- reports and logs -------------------------------------------------------------------------


def test_report_by_name_for_a_grid_file_kept_elsewhere(corpus, tmp_path, capsys):
    data = tiny_grid(corpus, steps=4, eval_every=2)
    data["name"] = "my-lab-grid"
    path = write_grid(tmp_path, data)
    assert cli(path, tmp_path) == EXIT_OK
    (tmp_path / "results" / "my-lab-grid" / "RESULTS.md").unlink()
    capsys.readouterr()
    code = cli_main(
        ["report", "my-lab-grid", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    )
    assert code == EXIT_OK
    assert "no grid file" in capsys.readouterr().out
    assert "| softmax |" in (tmp_path / "results" / "my-lab-grid" / "RESULTS.md").read_text()
    assert cli_main(["report", "no-such-grid", "--runs-dir", str(tmp_path / "runs")]) == EXIT_INVALID


def test_redirected_output_gets_plain_lines_not_bar_frames(corpus, tmp_path):
    import subprocess

    root = Path(__file__).resolve().parent.parent
    path = write_grid(tmp_path, tiny_grid(corpus, steps=4, eval_every=2))
    env = {**os.environ, "REGLA_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(root / "run_ablations.py"), *run_arguments(path, tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_OK, done.stderr[-2000:]
    assert "\r" not in done.stderr  # no bar frames in a log file
    assert "regla: step 2/4 val loss" in done.stderr and "regla: step 4/4 val loss" in done.stderr
    assert "regla: step 4/4 loss" in done.stderr and "tok_s" in done.stderr and "s left" in done.stderr
    assert "tokenize text-files/train (byte):" in done.stderr


def test_a_committed_report_is_regenerated_from_its_parquet(tmp_path, capsys):
    root = Path(__file__).resolve().parent.parent
    parquet = root / "results" / "smoke" / "results.parquet"
    code = cli_main(["report", "smoke", "--from-parquet", str(parquet), "--results-dir", str(tmp_path)])
    assert code == EXIT_OK
    text = (tmp_path / "smoke" / "RESULTS.md").read_text()
    assert "Written from the rows in" in text and "| regla |" in text and "| softmax |" in text
    assert (tmp_path / "smoke" / "loss_curves.png").stat().st_size > 0


def test_a_report_from_parquet_keeps_the_papers_numbers_of_its_grid_file(tmp_path):
    # The rows name only the grid (with its scale's suffix); the published numbers live in the grid
    # file, which the report finds by that name.
    from harness.cli import reference_of_grid_named

    root = Path(__file__).resolve().parent.parent
    assert reference_of_grid_named("paper-wikitext103-gpu")["values"]["regla"] == 19.0
    assert reference_of_grid_named("paper-wikitext103") == reference_of_grid_named("paper-wikitext103-smoke")
    assert reference_of_grid_named("paper-wikitext103-nosuchscale") is None
    assert reference_of_grid_named("smoke") is None
    parquet = root / "results" / "paper-wikitext103-gpu" / "results.parquet"
    code = cli_main(["report", "paper-wikitext103-gpu", "--from-parquet", str(parquet), "--results-dir", str(tmp_path)])
    assert code == EXIT_OK
    text = (tmp_path / "paper-wikitext103-gpu" / "RESULTS.md").read_text()
    assert "## Beside the published numbers" in text and "Kendall's τ between the two rankings: 1.00" in text
