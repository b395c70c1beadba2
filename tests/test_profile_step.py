"""The step profiler (benchmarks/profile_step.py) on CPU at tiny sizes: a row per operator with
its share of the step, for each run of the grid that --where keeps; bad arguments are refused."""

from __future__ import annotations

import pandas as pd
import pytest

from .benchmark_modules import load_benchmark

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("profile_step")


def test_profiles_each_selected_run_of_the_grid(bench, tmp_path):
    args = "--grid paper/efficiency --scale smoke --where depth=6 --where variant=gla,regla --seq-len 16 --batch 2"
    bench.main([*args.split(), "--steps", "1", "--device", "cpu", "--out", str(tmp_path)])
    rows = pd.read_parquet(tmp_path / "profile_step.parquet")
    assert set(rows.run) == {"gla/6", "regla/6"}
    for _, run in rows.groupby("run"):
        assert (run.ms_per_step > 0).all() and run.share.sum() == pytest.approx(1.0)
        assert run.ms_per_step.is_monotonic_decreasing
    # The layer's ops are there: the norm every linear layer applies, for one.
    assert rows.kernel.str.contains("rms_norm|pow|mean", regex=True).any()
    log = (tmp_path / "profile_step.log").read_text()
    assert "===== gla/6" in log and "===== regla/6" in log


def test_bad_arguments_are_refused_with_what_is_allowed(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    assert "--steps must be a positive integer; got 0" in capsys.readouterr().err
