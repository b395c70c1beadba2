"""The training loop under torchrun: two CPU processes (gloo) train one run with DDP; rank 0 alone
writes results, once."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def test_a_converted_transformers_model_trains_under_ddp_as_on_one_process(corpus, tmp_path):
    """A tiny GPT-NeoX (saved locally) converted to a ReGLA hybrid: two steps on two processes
    (gloo) of batch 4 end where one process of batch 8 over the same global batches ends: the same
    weights (kept softmax layer, converted layer and the new gate parameters alike, the first step
    training only the new ones) and the same validation loss. (train/loss rows hold rank 0's loss
    on its own rows, so they are not what is compared.)"""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from harness.data.tokenization import ByteTokenizer

    from .postlin_ddp_worker import train_as_rank, train_converted

    neox = tmp_path / "neox"
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, rotary_pct=0.25, eos_token_id=256, bos_token_id=256,
    )  # fmt: skip
    GPTNeoXForCausalLM(config).save_pretrained(neox)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=ByteTokenizer().to_tokenizers(), eos_token="<|endoftext|>")
    tokenizer.save_pretrained(neox)
    cache = tmp_path / "cache"
    prepare_data("text-files", f"hf:{neox}", {"pattern": str(corpus / "*.txt")}, cache_dir=cache, progress=False)

    ddp, single = tmp_path / "ddp", tmp_path / "single"
    for out in (ddp, single):
        out.mkdir()
    # Two processes forked from this one, each with the environment torchrun gives its workers:
    # they inherit torch and transformers already imported (two fresh interpreters would spend
    # most of this test importing them). One intra-op thread each, as DataLoader workers do.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    ranks = [
        fork.Process(target=train_as_rank, args=(rank, port, (neox, corpus, cache, ddp, 4, 4))) for rank in range(2)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=300)
        if process.is_alive():
            process.kill()
        assert process.exitcode == 0, f"a rank exited with {process.exitcode} (its traceback is above)"
    train_converted(neox, corpus, cache, single, batch_size=8, eval_batches=2)  # 2 x 8 = 4 x 4 windows
    two, one = (torch.load(out / "result.pt", weights_only=False) for out in (ddp, single))
    assert two["state"].keys() == one["state"].keys()
    for name, tensor in two["state"].items():
        torch.testing.assert_close(tensor, one["state"][name], atol=2e-5, rtol=1e-4, msg=name)
    val = lambda result, step: next(  # noqa: E731
        r["value"] for r in result["records"] if r["metric"] == "val/loss" and r["step"] == step
    )
    assert val(two, 0) == pytest.approx(val(one, 0), abs=1e-6)  # the converted start
    assert val(two, 2) == pytest.approx(val(one, 2), abs=1e-5)
    assert val(one, 2) < val(one, 0)  # the steps changed the model
