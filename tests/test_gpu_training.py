"""`run --device cuda` (and `auto`) trains on a GPU: a tiny grid through the command line, its rows
checked. The CPU counterparts are the pipeline tests (tests/test_pipeline.py), which run the same
command on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from harness import results as results_io
from harness.cli import EXIT_OK
from harness.cli import main as cli_main

from .pipeline_helpers import tiny_grid

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_cli_trains_a_tiny_grid_on_the_gpu(corpus, tmp_path, monkeypatch, device):
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    data = tiny_grid(corpus, steps=6, eval_every=3, checkpoint_every=3)
    data["stages"] = ["train", "probe"]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    runs, results = tmp_path / "runs", tmp_path / "results"
    code = cli_main(["run", str(path), "--device", device, "--runs-dir", str(runs), "--results-dir", str(results)])
    assert code == EXIT_OK
    frame = results_io.load("tiny", runs)
    assert set(frame.status) == {"ok"}
    assert set(frame.device) == {torch.cuda.get_device_name()}
    final = frame[frame.metric == "final/val_bits_per_byte"].set_index("run_name")["value"]
    assert set(final.index) == {"softmax", "regla"} and all(math.isfinite(v) for v in final)
    assert set(frame[frame.stage == "probe"].run_name) == {"softmax", "regla"}
