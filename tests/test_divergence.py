"""A diverging run names where it diverged: a non-finite gradient stops training at its own step,
naming the deepest parameters it reached (before clipping and the optimizer spread it to every
parameter); a non-finite loss reports the last gradient norm and the non-finite parameters."""

from __future__ import annotations

import pytest
import torch

from harness.data import prepare_data
from harness.spec import spec_from_dict
from harness.train import Diverged, clip_gradients, train
from variants import FEATURE_MAPS, FeatureMap, FeatureOutput, feature_map

from .pipeline_helpers import NaNGradient, tiny_grid

CALLS = {"n": 0}


class NaNValue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * float("nan")

    @staticmethod
    def backward(ctx, grad):
        return grad


@pytest.fixture
def nan_feature_map():
    """φ(x) = x, from the 9th call on (q and k in each of 2 layers: from step 2, counted from 0)
    with a NaN backward (`nan_gradient_for_tests`; the forward and the loss stay finite) or a NaN
    value (`nan_value_for_tests`)."""
    ops = {"nan_gradient_for_tests": NaNGradient, "nan_value_for_tests": NaNValue}
    for name, op in ops.items():

        @feature_map(name)
        class NaNAfterAWhile(FeatureMap):
            def forward(self, x, role, state=None, op=op):
                CALLS["n"] += 1
                return FeatureOutput(op.apply(x) if CALLS["n"] > 8 else x)

    CALLS["n"] = 0
    yield
    for name in ops:
        FEATURE_MAPS.unregister(name)


def train_until_diverged(corpus, tmp_path, feature_map_name: str, gate: str = "gla") -> str:
    base = tiny_grid(corpus, steps=6, eval_every=6, checkpoint_every=6)["base"]
    base["model"]["attention"] = {"feature_map": feature_map_name, "norm": "rmsnorm", "gate": gate}
    spec = spec_from_dict(base, name="diverges")
    data = prepare_data(base["data"]["source"], base["data"]["tokenizer"], base["data"]["options"], progress=False)
    with pytest.raises(Diverged) as info:
        train(spec, data, tmp_path, device="cpu", progress=False)
    return str(info.value)


def test_clip_gradients_is_clip_grad_norm_and_names_non_finite_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model(torch.randn(3, 4)).sum().backward()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for c, p in zip(copies, model.parameters()):
        c.grad = p.grad.clone()
    norm, broken = clip_gradients(model, 0.1)
    assert broken == [] and norm == float(torch.nn.utils.clip_grad_norm_(copies, 0.1))
    assert all(torch.equal(p.grad, c.grad) for p, c in zip(model.parameters(), copies))
    model(torch.randn(3, 4)).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")
    norm, broken = clip_gradients(model, 0.1)
    # Read before clipping by the NaN norm made every gradient NaN.
    assert norm != norm and broken == ["1.weight"]
    assert all(torch.isnan(p.grad).all() for p in model.parameters())


@pytest.mark.usefixtures("nan_feature_map")
def test_non_finite_gradient_stops_the_run_at_its_step_naming_the_deepest_parameters(corpus, tmp_path):
    message = train_until_diverged(corpus, tmp_path, "nan_gradient_for_tests")
    assert message.startswith("non-finite gradients at step 2 (grad norm nan, finite training loss"), message
    # The second layer's query and key projections are the deepest parameters the NaN reaches.
    assert "deepest first: blocks.1.attn.k_proj.weight, blocks.1.attn.q_proj.weight" in message, message
    assert "previous grad norm before clipping" in message and "at step 1" in message, message


@pytest.mark.usefixtures("nan_feature_map")
@pytest.mark.parametrize(
    "gate, start",
    [
        ("none", "non-finite training loss (nan on rank 0; all ranks stop) at step 2 ("),
        # The second layer's gate reads the NaN the first made: the chunked op refuses NaN gates.
        ("gla", "non-finite values in the forward at step 2: chunked_gla: the log gates contain NaN"),
    ],
)
def test_non_finite_forward_reports_the_last_grad_norm_and_the_parameters(corpus, tmp_path, gate, start):
    message = train_until_diverged(corpus, tmp_path, "nan_value_for_tests", gate)
    assert message.startswith(start), message
    assert "(grad norm before clipping" in message and "at step 1; all parameters finite)" in message, message


def _composed_regla_layer(norm_eps_frame="unshifted", seed=0):
    from harness.config import AttentionConfig
    from harness.layers import LinearAttention

    torch.manual_seed(seed)
    config = AttentionConfig(
        feature_map="safe_exp",
        norm="rmsnorm",
        gate="gla",
        gate_options={"tau": 1.0, "rank": None, "log_clamp": -8.0, "bias_init": -6.0},
        norm_eps_frame=norm_eps_frame,
        impl="chunked",
    )
    return LinearAttention(64, 2, 32, config)


def _parameter_grads(layer, x, weights, dtype, autocast):
    import copy

    layer = copy.deepcopy(layer).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, _ = layer(x.to(dtype))
    (y.double() * weights).sum().backward()
    return {name: p.grad.double() for name, p in layer.named_parameters()}


def test_composed_safe_exp_gradients_under_bf16_autocast():
    """Under a per-head norm with eps in the unshifted frame the output does not depend on the
    shifts: detaching them leaves every fp64 gradient as it was. Under bf16 autocast the composed
    path runs safe-exp, the op and the norm's input in fp32 (`needs_fp32_op`), and the q/k
    projections' gradients come out right: in bf16 they were off by 2.9x and 1.9x the true
    gradients' norm (0.7x with the shifts detached alone)."""
    layer = _composed_regla_layer()
    assert layer.feature_map.detach_shifts
    assert not _composed_regla_layer("shifted").feature_map.detach_shifts  # eps fixed: shifts matter
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 96, 64, generator=generator)
    weights = torch.randn(2, 96, 64, generator=generator, dtype=torch.float64)
    exact = _parameter_grads(layer, x, weights, torch.float64, False)
    layer.feature_map.detach_shifts = False
    through_shifts = _parameter_grads(layer, x, weights, torch.float64, False)
    for name, grad in exact.items():
        assert torch.allclose(grad, through_shifts[name], rtol=1e-9, atol=1e-12), name
    layer.feature_map.detach_shifts = True
    low = _parameter_grads(layer, x, weights, torch.float32, True)
    for name in ("q_proj.weight", "k_proj.weight"):
        error = ((low[name] - exact[name]).norm() / exact[name].norm()).item()
        assert error < 5e-2, (name, error)  # bf16 rounding of activations: ~1e-2 measured
