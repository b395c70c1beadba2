"""`train.cuda_graph`: the training step replayed from a CUDA graph (harness.captured_step).

On the CPU: the setting's checks (what it refuses, and why), its place in the run id, and the
capturable optimizer's learning rates through a state dict. On a GPU (`gpu`): training through
the replayed step gives the eager loop's losses step for step, with and without accumulation,
for softmax, GLA and the fused ReGLA op, and a diverging step stops the run."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from harness.captured_step import check_capturable, clip_without_host_reads, snapshot_training_state
from harness.config import ConfigError, TrainConfig
from harness.data import prepare_data
from harness.spec import spec_from_dict
from harness.train import Diverged, clip_gradients, make_optimizer, train
from variants import FEATURE_MAPS, FeatureMap, FeatureOutput, feature_map

from .pipeline_helpers import NaNGradient, tiny_grid

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


ATTENTION = {
    "gla": {"feature_map": "identity", "norm": "rmsnorm", "gate": "gla"},
    "regla": {"feature_map": "safe_exp", "norm": "rmsnorm", "gate": "refined"},
}


def tiny_base(corpus, variant: str = "regla", **train_overrides) -> dict:
    """The tiny grid's base run with one variant's attention (softmax, gla, regla, or a feature map)."""
    base = tiny_grid(corpus, **train_overrides)["base"]
    if variant == "softmax":
        base["model"]["softmax_layers"] = "all"
    else:
        base["model"]["attention"] = ATTENTION.get(variant, {**ATTENTION["gla"], "feature_map": variant})
    return base


def tiny(corpus, variant: str = "regla", **train_overrides):
    """`tiny_base`, and its data."""
    base = tiny_base(corpus, variant, **train_overrides)
    data = prepare_data(base["data"]["source"], base["data"]["tokenizer"], base["data"]["options"], progress=False)
    return base, data


def test_cuda_graph_must_be_a_boolean():
    with pytest.raises(ConfigError, match=r"train.cuda_graph must be true or false; got 'yes'"):
        TrainConfig(cuda_graph="yes")


def test_the_default_leaves_run_ids_as_they_were_and_a_replayed_run_is_its_own(corpus):
    base = tiny_base(corpus)
    eager = spec_from_dict(base, name="eager")
    replayed = spec_from_dict({**base, "train": {**base["train"], "cuda_graph": True}}, name="replayed")
    assert "cuda_graph" not in eager.identity()["train"]
    assert replayed.identity()["train"]["cuda_graph"] is True
    assert replayed.run_id != eager.run_id


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(device=torch.device("cpu")), "needs a CUDA device; got cpu"),
        (dict(world_size=2), "runs in one process only"),
        (dict(packing="documents"), "needs data.packing: windows"),
        (dict(train_only_new_for_steps=10), "model.init.train_only_new_for_steps: 10"),
    ],
)
def test_what_cannot_be_captured_is_refused_naming_the_setting(settings, message):
    arguments = dict(device=torch.device("cuda"), world_size=1, packing="windows", train_only_new_for_steps=0)
    with pytest.raises(ValueError, match=message):
        check_capturable(**{**arguments, **settings})


def test_train_refuses_cuda_graph_on_the_cpu_before_building_anything(corpus, tmp_path):
    base, data = tiny(corpus, cuda_graph=True)
    spec = spec_from_dict(base, name="replayed")
    with pytest.raises(ValueError, match="train.cuda_graph captures the step in a CUDA graph and needs a CUDA device"):
        train(spec, data, tmp_path, device="cpu", progress=False)
    assert not list(tmp_path.iterdir())  # no checkpoint, no state


def test_capturable_learning_rates_are_tensors_and_stay_so_through_a_state_dict():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = make_optimizer(model, TrainConfig(lr=2e-3), capturable=True)
    assert all(
        isinstance(g["lr"], torch.Tensor) and float(g["lr"]) == pytest.approx(2e-3) for g in optimizer.param_groups
    )
    assert all(g["capturable"] for g in optimizer.param_groups)
    again = make_optimizer(model, TrainConfig(lr=5e-4), capturable=True)
    again.load_state_dict(optimizer.state_dict())
    assert all(isinstance(g["lr"], torch.Tensor) and float(g["lr"]) == pytest.approx(2e-3) for g in again.param_groups)
    assert all(not isinstance(g["lr"], torch.Tensor) for g in make_optimizer(model, TrainConfig()).param_groups)


def adamw_step(model, optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    optimizer.zero_grad(set_to_none=True)
    model(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()


@pytest.mark.parametrize("started", [False, True])
def test_the_warm_up_is_undone_in_place(started):
    """The capture's warm-up steps are undone: parameters, buffers and AdamW's state in place, and a
    state the warm-up created is a fresh one again (the next step is then the fresh step)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2))
    if started:  # a resumed run: its optimizer has state
        adamw_step(model, optimizer, seed=1)
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    optimizer_before = copy.deepcopy(optimizer.state_dict())
    state_before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    tensors = {id(t): t for t in model.parameters()}
    restore = snapshot_training_state(model, optimizer)
    for seed in (2, 3):
        adamw_step(model, optimizer, seed)
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])
    restore()
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert {id(t) for t in model.parameters()} == set(tensors)  # the same tensors, written in place
    for p in model.parameters():
        for key, value in optimizer.state[p].items():
            expected = state_before[id(p)].get(key, torch.zeros_like(value))
            assert torch.equal(value, expected), key
    # The next step is the one the warm-up would have been: the same as on an untouched copy.
    twin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    twin.load_state_dict(before)
    twin_optimizer = make_optimizer(twin, TrainConfig(lr=1e-2))
    if started:
        twin_optimizer.load_state_dict(optimizer_before)
    adamw_step(model, optimizer, seed=4)
    adamw_step(twin, twin_optimizer, seed=4)
    for (name, t), u in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(t, u, rtol=0, atol=1e-7), name


def three_layers_with_gradients(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    model(torch.randn(5, 4)).square().sum().mul(100.0).backward()  # large enough to be clipped
    return model


def test_clipping_without_host_reads_matches_the_eager_loops_clipping():
    model, twin = three_layers_with_gradients(), three_layers_with_gradients()
    model[1].bias.grad = None  # a parameter without a gradient is left out, as clip_grad_norm_ does
    twin[1].bias.grad = None
    total, names, parameter_norms = clip_without_host_reads(list(model.named_parameters()), max_norm=1.0)
    eager_total, broken = clip_gradients(twin, max_norm=1.0)
    assert float(total) == pytest.approx(eager_total, rel=1e-6) and eager_total > 1.0 and broken == []
    assert names == ["0.weight", "0.bias", "1.weight", "2.weight", "2.bias"]
    assert parameter_norms.shape == (5,) and torch.isfinite(parameter_norms).all()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_a_nan_gradient_is_named_although_clipping_spreads_it_to_every_gradient():
    model = three_layers_with_gradients()
    model[1].weight.grad[2, 3] = float("nan")
    total, names, parameter_norms = clip_without_host_reads(list(model.named_parameters()), max_norm=1.0)
    assert math.isnan(float(total))
    assert all(torch.isnan(p.grad).all() for p in model.parameters())  # what the gradients still say
    assert [name for name, finite in zip(names, torch.isfinite(parameter_norms).tolist()) if not finite] == ["1.weight"]


def test_clipping_without_gradients_reads_a_zero_norm_as_torch_does():
    model = torch.nn.Linear(3, 2)
    total, names, parameter_norms = clip_without_host_reads(list(model.named_parameters()), max_norm=1.0)
    assert float(total) == float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) == 0.0
    assert names == [] and parameter_norms.numel() == 0


def train_losses(base, data, run_dir, cuda_graph: bool) -> dict[tuple[str, int], float]:
    spec = spec_from_dict({**base, "train": {**base["train"], "cuda_graph": cuda_graph}}, name="run")
    _, records = train(spec, data, run_dir, device="cuda", progress=False)
    return {(r["metric"], r["step"]): r["value"] for r in records if r["metric"] in ("train/loss", "val/loss")}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("variant", ["softmax", "gla", "regla"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_replayed_training_gives_the_eager_losses(corpus, tmp_path, variant, grad_accum):
    base, data = tiny(corpus, variant, steps=8, eval_every=4, log_every=1, checkpoint_every=4, grad_accum=grad_accum)
    eager = train_losses(base, data, tmp_path / "eager", cuda_graph=False)
    replayed = train_losses(base, data, tmp_path / "replayed", cuda_graph=True)
    assert eager.keys() == replayed.keys() and len(eager) == 8 + 2
    for key, value in eager.items():
        assert math.isfinite(replayed[key])
        # The same kernels in the same order; capturable AdamW may round its update differently.
        assert replayed[key] == pytest.approx(value, rel=2e-3), (key, value, replayed[key])


@pytest.fixture
def nan_gradient_feature_map():
    """φ(x) = x with a NaN backward: every step's gradients are NaN, its loss finite."""

    @feature_map("nan_gradient_for_graph_tests")
    class NaNGradientMap(FeatureMap):
        def forward(self, x, role, state=None):
            return FeatureOutput(NaNGradient.apply(x))

    yield "nan_gradient_for_graph_tests"
    FEATURE_MAPS.unregister("nan_gradient_for_graph_tests")


@pytest.mark.gpu
@requires_cuda
def test_a_diverging_replayed_step_stops_the_run_naming_where(corpus, tmp_path, nan_gradient_feature_map):
    # The eager warm-up before the capture meets the NaN gradients too: what it did is undone, and
    # the first replayed step is the one that stops the run.
    base, data = tiny(corpus, nan_gradient_feature_map, steps=6, cuda_graph=True)
    spec = spec_from_dict(base, name="diverges")
    with pytest.raises(Diverged) as info:
        train(spec, data, tmp_path, device="cuda", progress=False)
    message = str(info.value)
    assert message.startswith("non-finite gradients at step 0 (grad norm nan, finite training loss"), message
    assert "deepest first: blocks.1.attn." in message, message
