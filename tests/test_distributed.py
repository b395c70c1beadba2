"""The training loop under torchrun: two CPU processes (gloo) train one run with DDP; rank 0 alone
writes results, once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from harness import results as results_io
from harness.data import prepare_data

from .pipeline_helpers import tiny_grid

ROOT = Path(__file__).resolve().parent.parent


def run_under_torchrun(
    grid: dict, corpus: Path, tmp_path: Path, env: dict, timeout: float, returncode: int = 0
) -> subprocess.CompletedProcess:
    """`run_ablations.py run` of `grid` on two CPU processes (gloo); the data is prepared first.
    `returncode`: the expected exit code (1 when a stage fails: `run` says so)."""
    grid_path = tmp_path / "tiny.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    prepare_data("text-files", "byte", {"pattern": str(corpus / "*.txt")}, cache_dir=tmp_path / "cache", progress=False)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "run_ablations.py"),
        "run",
        str(grid_path),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--results-dir",
        str(tmp_path / "results"),
        "--no-progress",
        "--device",
        "cpu",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert done.returncode == returncode, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_grid_runs_under_torchrun_with_two_processes(corpus, tmp_path):
    env = {**os.environ, "REGLA_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    data = tiny_grid(corpus, steps=6, eval_every=3, checkpoint_every=3, log_every=3)
    data["stages"] = ["train", "probe"]
    run_under_torchrun(data, corpus, tmp_path, env, timeout=600)
    frame = results_io.load("tiny", tmp_path / "runs")
    assert set(frame.status) == {"ok"}
    train = frame[frame.stage == "train"]
    for run_name, rows in train.groupby("run_name"):
        assert (rows.metric == "final/val_loss").sum() == 1, run_name  # written once, by rank 0
        assert sorted(rows[rows.metric == "val/loss"].step) == [3, 6]
    assert set(frame[frame.stage == "probe"].run_name) == {"softmax", "regla"}
    assert (tmp_path / "results" / "tiny" / "RESULTS.md").is_file()


FAILING_PLUGIN = '''
"""A feature map whose forward raises on rank 1 only, from its 3rd call on (test plugin)."""
import os

from variants import FeatureMap, FeatureOutput, feature_map

CALLS = {"n": 0}


@feature_map("fails_on_rank_1")
class FailsOnRank1(FeatureMap):
    def __init__(self, head_dim, num_heads):
        super().__init__(head_dim, num_heads)

    def forward(self, x, role, state=None):
        CALLS["n"] += 1
        if os.environ.get("RANK") == "1" and CALLS["n"] >= 3:
            raise RuntimeError("injected failure on rank 1")
        return FeatureOutput(x)
'''


def test_a_failure_on_one_rank_stops_every_rank_and_the_grid_goes_on(corpus, tmp_path):
    # Rank 1 raises in its forward: without agreement rank 0 would wait in the gradient all-reduce
    # until the process group's timeout. Both ranks must stop that run at the same point, rank 0
    # record it as failed naming rank 1, and the next run train normally on the same process group.
    (tmp_path / "failing_plugin.py").write_text(FAILING_PLUGIN)
    env = {
        **os.environ,
        "REGLA_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    data = tiny_grid(corpus, steps=4, eval_every=2, checkpoint_every=2, log_every=2)
    data["plugins"] = ["failing_plugin"]
    data["axes"]["variant"] = {
        "broken": {"model.attention": {"feature_map": "fails_on_rank_1", "norm": "rmsnorm", "gate": "gla"}},
        "softmax": {"model.softmax_layers": "all"},
    }
    done = run_under_torchrun(data, corpus, tmp_path, env, timeout=300, returncode=1)
    assert "failed: broken [train] PeerFailed: rank 1 failed" in done.stdout
    frame = results_io.load("tiny", tmp_path / "runs")
    broken = frame[(frame.run_name == "broken") & (frame.stage == "train")]
    assert set(broken.status) == {"failed"}
    assert "rank 1 failed: RuntimeError: injected failure on rank 1" in broken.error.iloc[0]
    softmax = frame[(frame.run_name == "softmax") & (frame.stage == "train")]
    assert set(softmax.status) == {"ok"} and (softmax.metric == "final/val_loss").sum() == 1
