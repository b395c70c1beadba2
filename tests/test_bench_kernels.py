"""The kernel benchmark's FLOP model (its TFLOP/s columns) and shape families, on CPU."""

from __future__ import annotations

import pytest

from .benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_kernels")


def test_linear_attention_flops_follow_the_stated_chunked_model(bench):
    # Per token and head: 4·C·D (intra-chunk scores and their product with V) + 4·D² (state read and update).
    forward, both = bench.model_flops("triton", 2, 128, 3, 64)
    assert forward == 2 * 128 * 3 * (4 * 64 * 64 + 4 * 64 * 64)
    assert both == 3 * forward
    # Every linear implementation counts the same work, whatever its gate or feature map.
    assert bench.model_flops("A0_fla", 2, 128, 3, 64) == bench.model_flops("regla_fused", 2, 128, 3, 64)


def test_sdpa_flops_are_causal_and_quadratic_in_length(bench):
    forward, both = bench.model_flops("A2_sdpa", 1, 1024, 1, 128)
    assert forward == 2 * 1024 * 1024 * 128  # half of 4·T²·D: the causal mask
    assert both == 3.5 * forward
    assert bench.model_flops("A2_sdpa", 1, 2048, 1, 128)[0] == 4 * forward


def test_each_head_dim_family_is_a_partition_of_the_anchor_shapes(bench):
    d64 = [s for s in bench.ANCHOR_SHAPES if s[3] == 64]
    d128 = [s for s in bench.ANCHOR_SHAPES if s[3] == 128]
    assert sorted(d64 + d128) == sorted(bench.ANCHOR_SHAPES) and d64 and d128


def test_bf16_gate_gradient_setting_holds_for_forward_and_backward_and_is_restored(bench):
    """The `*_gate_grad_bf16` rows run their forward and backward with bf16 operands for the gate
    gradient's products (the launcher reads the setting at backward time), and leave the default
    in place for every other row."""
    import torch

    from kernels.blocks import qkv_grad

    default = qkv_grad.GATE_GRADIENT_PRODUCTS
    impls, _ = bench.make_implementations(None)
    fn, names, setting = impls["triton_gate_grad_bf16"]
    assert (fn, names) == impls["triton"][:2]
    seen = []
    with setting():
        x = bench.make_inputs(1, 16, 1, 16, "cpu", dtype=torch.float32)
        out = fn(x)
        seen.append(qkv_grad.GATE_GRADIENT_PRODUCTS)
        torch.autograd.grad(out, [x[n] for n in names], x["do"])
    assert seen == [None] and qkv_grad.GATE_GRADIENT_PRODUCTS is default is not None
    with pytest.raises(RuntimeError), setting():
        raise RuntimeError("a failing row")
    assert qkv_grad.GATE_GRADIENT_PRODUCTS is default


def test_length_sweep_keeps_tokens_per_call_fixed_and_is_plotted_against_length(bench, tmp_path):
    shapes = bench.LENGTH_SWEEP_SHAPES
    assert {B * T for B, T, _, _ in shapes} == {bench.LENGTH_SWEEP_TOKENS}
    assert [T for _, T, _, _ in shapes] == sorted(T for _, T, _, _ in shapes) and len(shapes) >= 3
    rows = [
        dict(impl=impl, B=B, T=T, H=H, D=D, fwdbwd_ms=cost * T)
        for impl, cost in (("A2_sdpa", 1e-3), ("triton", 1e-4))
        for B, T, H, D in shapes
    ]
    rows.append(dict(impl="triton", B=4, T=2048, H=16, D=64, fwdbwd_ms=1.0))  # another family: no series
    assert list(bench.length_sweeps(rows)) == [(bench.LENGTH_SWEEP_TOKENS, 16, 128)]
    bench.plot_against_length(tmp_path, rows)
    assert (tmp_path / "kernels_time_vs_length.png").stat().st_size > 10_000


def test_breakdown_only_with_no_breakdown_is_refused_before_any_gpu_work(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("sys.argv", ["bench_kernels.py", "--out", str(tmp_path), "--breakdown-only", "--no-breakdown"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert "--breakdown-only and --no-breakdown" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
