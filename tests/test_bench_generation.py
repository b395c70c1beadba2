"""The generation benchmark (benchmarks/bench_generation.py) end to end on CPU at tiny sizes: every
model, mode, batch and length gets a row with a time, whole generate() calls are timed, and the
Parquet and the plot are written. The H200 run takes the same code path at the paper's sizes."""

from __future__ import annotations

import pandas as pd
import pytest

from .benchmark_modules import load_benchmark

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_generation")


def test_the_benchmark_writes_a_row_per_point_and_a_plot(bench, tmp_path):
    tiny = "--device cpu --d-model 16 --n-heads 2 --n-layers 2 --vocab 32 --steps 2 --warmup 1"
    bench.main([*tiny.split(), "--out", str(tmp_path), "--lengths", "2,5", "--batches", "1,2", "--e2e-lengths", "3"])
    rows = pd.read_parquet(tmp_path / "generation.parquet")
    steps = rows[rows.kind == "step"]
    expected_modes = {
        "softmax": {"eager", "graphs"},
        "gla": {"eager+fused", "eager+composed", "graphs+fused", "graphs+composed"},
        "regla": {"eager+fused", "eager+composed", "graphs+fused", "graphs+composed"},
    }
    for model, modes in expected_modes.items():
        assert set(steps[steps.model == model]["mode"]) == modes
    assert len(steps) == 10 * 2 * 2  # (2 + 4 + 4) modes x 2 batches x 2 lengths
    assert (steps.median_ms > 0).all() and (steps.p20_ms <= steps.p80_ms).all()
    assert not steps.cuda_graph.any()  # no CUDA graphs on CPU: the static step runs uncaptured
    generate = rows[rows.kind == "generate"]
    assert len(generate) == 3 * 2 and (generate.length == 3).all() and (generate.median_ms > 0).all()
    assert (tmp_path / "generation.png").stat().st_size > 0
    assert "done in" in (tmp_path / "bench_generation.log").read_text()
    # The plot alone, from the Parquet (no device needed).
    bench.main(["--out", str(tmp_path / "replot"), "--replot", str(tmp_path / "generation.parquet")])
    assert (tmp_path / "replot" / "generation.png").stat().st_size > 0


def test_the_benchmark_refuses_unknown_models_and_bad_lengths(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "softmax,mamba"])
    assert "unknown models ['mamba']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--lengths", "64,zero"])
    assert "comma-separated positive integers" in capsys.readouterr().err
