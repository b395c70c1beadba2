"""Fusion is declared by plugins: a layer takes the fused ReGLA op when its feature map and gate
both return a `kernels.fusion` description from `fused_kernel()`, whatever their classes.

A third-party refining gate with τ = 2 (not a subclass of the built-in) opts in and gets the
fused path, which must equal its own composed path, output and every parameter gradient (the
kernels run under Triton's interpreter without CUDA). A third-party feature map that does not
opt in keeps the composed path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from harness.config import AttentionConfig  # noqa: E402
from harness.layers import LinearAttention  # noqa: E402
from kernels.fusion import (  # noqa: E402
    IdentityKernel,
    RefiningGateKernel,
    RMSNormKernel,
    SafeExpKernel,
    SigmoidGateKernel,
)
from variants import FEATURE_MAPS, GATES, FeatureMap, FeatureOutput, Gate, GateOutput, feature_map, gate  # noqa: E402

from .numerics import layer_outputs, rel_rms, worst  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TAU = 2.0


class WarmRefiningGate(Gate):
    """A refining gate written from scratch with a fixed temperature τ = 2, declaring its fused form."""

    def __init__(self, d_model, num_heads, key_dim, value_dim):
        super().__init__(d_model, num_heads, key_dim, value_dim)
        self.gate_proj = torch.nn.Linear(d_model, num_heads * key_dim)
        self.refine_proj = torch.nn.Linear(d_model, num_heads * key_dim)

    def logits(self, x, x_prev=None):
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.key_dim)
        return self.gate_proj(x).view(shape), self.refine_proj(x).view(shape)

    def fused_kernel(self):
        return RefiningGateKernel(self.logits, tau=TAU, log_clamp=None)

    def forward(self, x, x_prev=None):
        a, b = (t.float() for t in self.logits(x, x_prev))
        g, r = torch.sigmoid(a), torch.sigmoid(b)
        log_f = (F.logsigmoid(a) + torch.log(g + 2 * r * (1 - g))).clamp_max(0.0) / TAU
        return GateOutput(log_k=log_f.to(x.dtype), activations={"F": log_f.exp()})


class ShiftFreeExp(FeatureMap):
    """exp(x) without a max shift: positive, but not a form the fused kernel computes."""

    positive_kernel = True

    def forward(self, x, role, state=None):
        return FeatureOutput(torch.exp(x.clamp_max(20.0)))


@pytest.fixture
def external_plugins():
    gate("warm_refining_external", version=1)(WarmRefiningGate)
    feature_map("shift_free_exp_external", version=1)(ShiftFreeExp)
    yield
    GATES.unregister("warm_refining_external")
    FEATURE_MAPS.unregister("shift_free_exp_external")


def make_layer(feature_map_name, gate_name, attention=None, **gate_options):
    torch.manual_seed(0)
    config = AttentionConfig(
        feature_map=feature_map_name, gate=gate_name, gate_options=gate_options, **(attention or {})
    )
    return LinearAttention(32, 2, 16, config).to(DEVICE)


def test_a_third_party_gate_that_declares_a_fused_form_gets_the_fused_path(external_plugins, monkeypatch):
    layer = make_layer("safe_exp", "warm_refining_external")
    plan = layer.fused_plan()
    assert plan is not None
    assert plan.gate.tau == TAU and plan.features == SafeExpKernel("running", 64, 1.0)
    x = torch.randn(2, 29, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fused = layer_outputs(layer, x, True, monkeypatch)
    composed = layer_outputs(layer, x, False, monkeypatch)
    errors = [rel_rms(a, b) for a, b in zip(fused, composed)]
    assert worst(errors) <= 1e-4, errors
    # The gradients reach the plugin's own projections through the fused op.
    assert all(g.abs().sum() > 0 for g in fused[1:])


@pytest.mark.parametrize(
    "gate_name, gate_options, attention, tolerance",
    [
        ("gla", {}, {}, 1e-4),  # GLA's gate: τ = 16, rank 16
        # A plain sigmoid gate nearly closed (σ(−6)), the clamp at −8 binding for some features:
        # q_proj's and k_proj's gradients are ill-conditioned there. Against the fp64 composed
        # layer, fp32 gives 1.9e-4 fused and 7e-5 composed, as for the refining gate's fused path
        # at the same gate (1.9e-4 / 6e-5): the chunked kernels' property, not the gate's.
        ("gla", {"tau": 1.0, "rank": None, "log_clamp": -8.0, "bias_init": -6.0}, {}, 5e-4),
        ("gla", {"tau": 1.0, "rank": None, "bias_init": 6.0}, {}, 1e-4),  # saturated open
        ("scalar", {}, {}, 1e-4),  # gated RFA: 1 − g scales the keys
        ("scalar", {"bias_init": 2.0}, {"denominator": True}, 1e-4),  # ... and the denominator's sum of keys
    ],
    ids=["gla", "plain-closed-clamped", "plain-open", "scalar", "scalar-denominator"],
)
def test_safe_exp_with_a_sigmoid_gate_through_the_fused_op_equals_the_composed_path(
    gate_name, gate_options, attention, tolerance, monkeypatch
):
    """The sigmoid gate's log decay goes into the fused op as a given log gate (and gated RFA's
    key factor onto v): output and every parameter gradient (the gate's projection included) equal
    the composed path, at an odd length."""
    layer = make_layer("safe_exp", gate_name, attention, **gate_options)
    assert isinstance(layer.fused_plan().gate, SigmoidGateKernel)
    x = torch.randn(2, 29, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    fused = layer_outputs(layer, x, True, monkeypatch)
    composed = layer_outputs(layer, x, False, monkeypatch)
    errors = [rel_rms(a, b) for a, b in zip(fused, composed)]
    assert errors[0] <= 1e-5 and worst(errors) <= tolerance, errors
    gate_grads = [p.grad for p in layer.gate.parameters()]
    assert gate_grads and all(torch.isfinite(g).all() for g in gate_grads)


def test_a_plugin_that_declares_nothing_keeps_the_composed_path(external_plugins):
    layer = make_layer("shift_free_exp_external", "refined")
    assert layer.gate.fused_kernel() is not None
    assert layer.feature_map.fused_kernel() is None
    assert layer.fused_plan() is None
    q = torch.zeros(1, 8, 2, 16, device=DEVICE)
    assert not layer.takes_fused_path(q)
    with pytest.raises(RuntimeError, match="'shift_free_exp_external' / 'refined' do not"):
        layer._fused_attention(torch.zeros(1, 8, 32), q, q, q, None, False)


def test_built_in_plugins_declare_their_fused_forms():
    layer = make_layer("safe_exp", "refined", tau=3.0, log_clamp=-5.0)
    plan = layer.fused_plan()
    assert plan.gate.tau == 3.0 and plan.gate.log_clamp == -5.0
    # A value-side gate is not what the kernel computes; neither are identity features.
    assert make_layer("safe_exp", "refined", axis="value").fused_plan() is None
    assert make_layer("safe_exp", "gla", axis="value").fused_plan() is None
    assert make_layer("identity", "refined").fused_plan() is None
    # GLA's sigmoid gate with safe-exp features is (the ablation's plain-gate and GLA-gate rows).
    sigmoid = make_layer("safe_exp", "gla", tau=1.0, log_clamp=-8.0).fused_plan()
    assert isinstance(sigmoid.gate, SigmoidGateKernel) and sigmoid.gate.tau == 1.0 and sigmoid.gate.log_clamp == -8.0
    # Gated RFA's scalar gate: a sigmoid gate per head whose 1 − g also scales the keys.
    scalar = make_layer("safe_exp", "scalar").fused_plan()
    assert isinstance(scalar.gate, SigmoidGateKernel) and scalar.gate.scales_keys and scalar.gate.tau == 1.0
    # Identity features and GLA's gate are forms of the fused decoding step, not of the chunked op.
    gla = make_layer("identity", "gla", tau=8.0)
    assert gla.feature_map.fused_kernel() == IdentityKernel()
    assert isinstance(gla.gate.fused_kernel(), SigmoidGateKernel) and gla.gate.fused_kernel().tau == 8.0
    assert isinstance(gla.norm.fused_kernel(), RMSNormKernel) and gla.norm.fused_kernel().weight is gla.norm.weight
    for name in FEATURE_MAPS.names():
        if name not in ("safe_exp", "identity"):
            assert FEATURE_MAPS.create(name, 16, 2).fused_kernel() is None, name


def test_fusion_descriptions_reject_values_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="key_max must be one of sequence, chunk, running"):
        SafeExpKernel(key_max="global")
    with pytest.raises(ValueError, match="tau must be positive"):
        RefiningGateKernel(lambda x, p: (x, x), tau=0.0)
    with pytest.raises(ValueError, match="tau must be positive"):
        SigmoidGateKernel(lambda x, p: x, tau=-1.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        RMSNormKernel(-1e-5)


def test_layers_record_the_path_they_took(monkeypatch):
    """`attention_path` says which computation the last forward took; `attention_path_counts`
    counts them over a model (what each training run records)."""
    from harness.layers import attention_path_counts

    layer = make_layer("safe_exp", "refined")
    x = torch.randn(1, 9, 32).to(DEVICE)
    assert layer.attention_path is None and attention_path_counts(layer)["composed"] == 0
    monkeypatch.setattr(type(layer), "takes_fused_path", lambda self, q: True)
    layer(x)
    assert layer.attention_path == "fused_epilogue"  # the default
    layer.fused_epilogue = False
    layer(x)
    assert layer.attention_path == "fused"
    monkeypatch.setattr(type(layer), "takes_fused_path", lambda self, q: False)
    layer(x)
    assert attention_path_counts(torch.nn.Sequential(layer, torch.nn.Linear(2, 2))) == {
        "fused": 0,
        "fused_epilogue": 0,
        "composed": 1,
        "decode_step": 0,
    }
    assert attention_path_counts(torch.nn.Linear(2, 2)) == {}


@pytest.mark.parametrize("gate_input", ["x", "x_shift"])
def test_packed_documents_through_the_fused_op_with_the_scalar_gate(gate_input, monkeypatch):
    """Over packed documents the scalar gate's key factor at a document's first token must not read
    the document before (with `input: x_shift`): the fused layer equals the composed one, and both
    equal each document run on its own."""
    layer = make_layer("safe_exp", "scalar", input=gate_input, bias_init=-1.0)
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    cu_seqlens = torch.tensor([0, 5, 12, 17, 24])
    outputs = {}
    for fused in (True, False):
        monkeypatch.setattr(type(layer), "takes_fused_path", lambda self, q, fused=fused: fused)
        with torch.no_grad():
            outputs[fused] = layer(x, cu_seqlens=cu_seqlens)[0]
        flat = x.reshape(1, 24, 32)
        with torch.no_grad():
            alone = torch.cat([layer(flat[:, a:b])[0] for a, b in [(0, 5), (5, 12), (12, 17), (17, 24)]], 1)
        assert rel_rms(outputs[fused], alone.view(2, 12, 32)) <= 1e-5, fused


class PerFeatureKeyScalingGate(Gate):
    """A gate that declares the key-scaling sigmoid form with one logit per key feature: not a
    factor the fused paths can move onto v."""

    def __init__(self, d_model, num_heads, key_dim, value_dim):
        super().__init__(d_model, num_heads, key_dim, value_dim)
        self.proj = torch.nn.Linear(d_model, num_heads * key_dim)

    def logits(self, x, x_prev=None):
        B, T, _ = x.shape
        return self.proj(x).view(B, T, self.num_heads, self.key_dim)

    def fused_kernel(self):
        return SigmoidGateKernel(self.logits, scales_keys=True)

    def forward(self, x, x_prev=None):
        logits = self.logits(x)
        return GateOutput(log_k=F.logsigmoid(logits), input_scale=torch.sigmoid(-logits))


def test_a_key_scaling_gate_needs_one_logit_per_head(monkeypatch):
    gate("per_feature_key_scaling_external", version=1)(PerFeatureKeyScalingGate)
    try:
        layer = make_layer("safe_exp", "per_feature_key_scaling_external")
        monkeypatch.setattr(type(layer), "takes_fused_path", lambda self, q: True)
        with pytest.raises(ValueError, match=r"needs one logit per head, \[B, T, H, 1\]"):
            layer(torch.randn(1, 9, 32).to(DEVICE))
    finally:
        GATES.unregister("per_feature_key_scaling_external")
