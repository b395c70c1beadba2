"""The step profiler (benchmarks/profile_step.py) on CPU at tiny sizes: a row per operator with
its share of the step, for each run of the grid that --where keeps; bad arguments are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

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
    summary = pd.read_parquet(tmp_path / "profile_step_summary.parquet").set_index("run")
    assert set(summary.index) == {"gla/6", "regla/6"}
    assert (summary.step_wall_ms > 0).all() and (summary.launches > 0).all()
    for run, frame in rows.groupby("run"):
        assert summary.loc[run, "kernel_ms"] == pytest.approx(frame.ms_per_step.sum())
        assert summary.loc[run, "launches"] == frame.calls.sum()
    assert summary.graph_step_ms.isna().all()  # timed only with --cuda-graph
    # The host's side: the layers' operators with their inclusive time, the longest first.
    host = pd.read_parquet(tmp_path / "profile_step_host.parquet")
    assert set(host.run) == {"gla/6", "regla/6"}
    for _, run in host.groupby("run"):
        assert run.host_ms_per_step.is_monotonic_decreasing
        assert (run.host_ms_per_step >= run.self_host_ms_per_step - 1e-9).all()
    assert host.op.str.contains("aten::").any()


def test_gpu_rows_are_kernels_not_the_annotations_that_span_them(bench):
    """A user annotation (the optimizer's `Optimizer.step#AdamW.step`) is a range on the GPU timeline
    over kernels already counted: counting it too would inflate the step's kernel time."""
    cuda = torch.autograd.DeviceType.CUDA

    def event(key, us, annotation=False, device_type=cuda):
        return SimpleNamespace(
            key=key, count=2, self_device_time_total=us, device_type=device_type, is_user_annotation=annotation
        )

    events = [
        event("gemm", 4000.0),
        event("Optimizer.step#AdamW.step", 3000.0, annotation=True),
        event("aten::mm", 500.0, device_type=torch.autograd.DeviceType.CPU),
        event("fill", 1000.0),
    ]
    rows = bench.kernel_rows(SimpleNamespace(key_averages=lambda: events), 2, torch.device("cuda"))
    assert list(rows.kernel) == ["gemm", "fill"]
    assert list(rows.ms_per_step) == [2.0, 0.5] and list(rows.calls) == [1, 1]
    assert rows.share.sum() == pytest.approx(1.0)


def test_bad_arguments_are_refused_with_what_is_allowed(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    assert "--steps must be a positive integer; got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--cuda-graph", "--device", "cpu"])
    assert "--cuda-graph captures the step in a CUDA graph and needs a CUDA device; got cpu" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["gla", "regla"])
def test_gpu_captured_step_computes_the_eager_steps_gradients(bench, variant):
    """A replay of the captured step runs the model's real forward and backward (the fused ReGLA op
    and the Triton GLA kernel included): its gradients are those an eager backward computes from the
    same parameters, and AdamW moves the parameters."""
    from harness.grid import filter_runs, load_grid
    from harness.postlin.start import architecture_model

    (spec,) = filter_runs(
        load_grid("grids/paper/efficiency.yaml", scale="smoke").runs, [f"variant={variant}", "depth=6"]
    )
    device = torch.device("cuda")
    model = architecture_model(spec.model, 256, 0, 96).to(device).train()
    tokens = torch.randint(0, 256, (2, 97), device=device)
    replay = bench.capture_training_step(model, tokens)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    replay()
    torch.cuda.synchronize()
    graph_grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())

    eager = architecture_model(spec.model, 256, 0, 96).to(device).train()
    with torch.no_grad():
        for name, p in eager.named_parameters():
            p.copy_(before[name])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    for name, p in eager.named_parameters():
        error = (graph_grads[name].float() - p.grad.float()).norm() / p.grad.float().norm().clamp_min(1e-12)
        assert error <= 2e-2, (name, float(error))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cuda_graph_timing_is_written(bench, tmp_path):
    args = "--grid paper/efficiency --scale smoke --where depth=6 --where variant=regla --seq-len 64 --batch 2"
    bench.main([*args.split(), "--steps", "2", "--device", "cuda", "--cuda-graph", "--out", str(tmp_path)])
    summary = pd.read_parquet(tmp_path / "profile_step_summary.parquet")
    assert (summary.graph_step_ms > 0).all() and (summary.step_wall_ms > 0).all()
