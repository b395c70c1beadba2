"""The fused decoding step (kernels.triton_decode) against the fp64 recurrence and the layer's
composed incremental step: outputs, states and key max over several steps, gates near 0 and 1,
identity and safe-exp features, GLA's and ReGLA's gates, a per-head scalar gate, the norm with its
eps in either frame.

Without CUDA the kernel runs under Triton's interpreter (tests/conftest.py) on tiny shapes with
K = 40 (two key blocks, the second partly masked) and V = 12 (a masked value block); the `gpu`
tests take the shapes of the paper's models in fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from harness.config import AttentionConfig  # noqa: E402
from harness.layers import LinearAttention, LinearState  # noqa: E402
from kernels.reference import recurrent_gla  # noqa: E402
from kernels.triton_decode import triton_decode_step  # noqa: E402
from variants.feature_maps import SafeExp  # noqa: E402
from variants.norms import RMSNorm  # noqa: E402

from .numerics import rel_rms, worst  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
EPS = 1e-5


def log_gate_of(gate, a, b, tau, log_clamp):
    """The gates' log decays as `variants.gates` computes them (GLA's, ReGLA's refining gate)."""
    if gate == "log":
        return a
    if gate == "sigmoid":
        log_g = F.logsigmoid(a) / tau
    else:
        g, r = torch.sigmoid(a), torch.sigmoid(b)
        log_g = (F.logsigmoid(a) + torch.log((g + 2 * r * (1 - g)).clamp_min(torch.finfo(a.dtype).tiny))).clamp_max(
            0.0
        ) / tau
    return log_g if log_clamp is None else log_g.clamp_min(log_clamp)


def reference_step(x, state, key_max, *, features, gate, tau, log_clamp, scale, eps_unshifted, weight):
    """One token in fp64 through the composed pieces: the SafeExp feature map with its running key
    max, the gate formula, the recurrence (kernels.reference.recurrent_gla) and RMSNorm."""
    x = {n: t.double() if t is not None else None for n, t in x.items()}
    q, k, v = x["q"], x["k"], x["v"]
    log_g = log_gate_of(gate, x["a"], x["b"], tau, log_clamp).expand_as(q)
    log_scale = None
    if features == "safe_exp":
        feature_map = SafeExp(q.shape[-1], q.shape[2], variance_factor="off")
        query, key = feature_map(q, "q"), feature_map(k, "k", key_max.double())
        q, k, log_g = query.features, key.features, log_g + key.log_decay
        key_max = key.state
        log_scale = -(query.shift + key.shift) if eps_unshifted else None
    o, state = recurrent_gla(q, k, v, log_g, None, scale=scale, initial_state=state.double(), output_final_state=True)
    norm = RMSNorm(v.shape[-1], v.shape[2], eps=EPS).double()
    with torch.no_grad():
        norm.weight.copy_(weight)
        o = norm(o, log_scale)
    return o, state, key_max


def make_step_inputs(B, H, K, V, gate, gate_shift, width, gen):
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x = dict(q=randn(B, 1, H, K) * 2, k=randn(B, 1, H, K) * 2, v=randn(B, 1, H, V), a=None, b=None)
    if gate == "log":
        x["a"] = F.logsigmoid(randn(B, 1, H, width) * 2 + gate_shift).clamp_min(-8.0)
    else:
        x["a"] = randn(B, 1, H, width) * 2 + gate_shift
        x["b"] = randn(B, 1, H, width) * 2 if gate == "refined" else None
    return x


def run_steps(B, H, K, V, *, features, gate, gate_shift, dtype, steps=3, width=None, eps_unshifted=True, seed=0):
    """`steps` tokens through the kernel (state updated in place) and through the fp64 reference;
    the worst relative error of output, state and key max."""
    gen = torch.Generator().manual_seed(seed)
    tau, log_clamp, scale = (16.0, None, K**-0.5) if gate == "sigmoid" else (1.0, -8.0, 0.3)
    weight = torch.rand(V, generator=gen) + 0.5
    state = torch.randn(B, H, K, V, generator=gen)
    key_max = torch.randn(B, H, generator=gen) + 1.0
    fused_state, fused_key_max = state.to(DEVICE), key_max.to(DEVICE)
    errors = {}
    for step in range(steps):
        x = make_step_inputs(B, H, K, V, gate, gate_shift, width or K, gen)
        x = {n: t.to(dtype) if t is not None else None for n, t in x.items()}  # the kernel and fp64 see one value
        expected_o, state, key_max = reference_step(
            x,
            state,
            key_max,
            features=features,
            gate=gate,
            tau=tau,
            log_clamp=log_clamp,
            scale=scale,
            eps_unshifted=eps_unshifted,
            weight=weight.double(),
        )
        on = {n: t.to(DEVICE) if t is not None else None for n, t in x.items()}
        gate_tensors = {"log": dict(log_gate=on["a"]), "sigmoid": dict(gate_logits=on["a"])}.get(
            gate, dict(gate_logits=on["a"], refine_logits=on["b"])
        )
        out = triton_decode_step(
            on["q"],
            on["k"],
            on["v"],
            fused_state,
            features=features,
            key_max=fused_key_max if features == "safe_exp" else None,
            gate=gate,
            **gate_tensors,
            tau=tau,
            log_clamp=log_clamp,
            scale=scale,
            norm_eps=EPS,
            norm_weight=weight.to(DEVICE),
            eps_unshifted=eps_unshifted,
            in_place=True,
        )
        assert out.state is fused_state and (features != "safe_exp" or out.key_max is fused_key_max)
        errors[f"o{step}"] = rel_rms(out.output.cpu(), expected_o)
        errors[f"state{step}"] = rel_rms(fused_state.cpu(), state)
        if features == "safe_exp":
            errors[f"key_max{step}"] = rel_rms(fused_key_max.cpu(), key_max)
    return errors


# (features, gate, gate shift): gates near 1 (shift +8: log decay ~ -3e-4) and near 0 (shift -8,
# GLA's τ = 16 then decays by ~0.6, the refining gate reaches its clamp), both features and both
# learnable gates, a given log gate.
CASES = [
    ("safe_exp", "refined", 8.0),
    ("safe_exp", "refined", -8.0),
    ("identity", "sigmoid", 8.0),
    ("identity", "sigmoid", -8.0),
    ("safe_exp", "log", 0.0),
]


@pytest.mark.parametrize("features, gate, gate_shift", CASES)
def test_decode_step_equals_the_fp64_recurrence_over_several_steps(features, gate, gate_shift):
    errors = run_steps(2, 2, 40, 12, features=features, gate=gate, gate_shift=gate_shift, dtype=torch.float32)
    assert worst(errors) <= 1e-5, errors


def test_decode_step_takes_a_per_head_scalar_gate_and_the_shifted_eps_frame():
    errors = run_steps(
        2,
        2,
        40,
        12,
        features="safe_exp",
        gate="refined",
        gate_shift=0.0,
        dtype=torch.float32,
        width=1,
        eps_unshifted=False,
    )
    assert worst(errors) <= 1e-5, errors


@pytest.mark.parametrize("eps_unshifted", [True, False], ids=["unshifted-eps", "shifted-eps-dominates"])
def test_decode_step_norm_takes_a_tiny_readout(eps_unshifted):
    """A closed gate over a state of tiny values, and a new key far below the running key max:
    the readout is ~1e-33 in the shifted frame and its square underflows fp32. With eps in the
    unshifted frame (as tiny) the normalised output is an ordinary number; with an ordinary eps in
    the shifted frame eps dominates and the output is readout / sqrt(eps), as tiny (a cap on
    eps / max|readout|² made it many orders of magnitude too large). Both must equal the fp64
    reference."""
    gen = torch.Generator().manual_seed(5)
    B, H, K, V = 2, 2, 16, 8
    x = make_step_inputs(B, H, K, V, "log", 0.0, K, gen)
    x["a"] = torch.full((B, 1, H, K), -8.0)
    weight = torch.rand(V, generator=gen) + 0.5
    state = torch.randn(B, H, K, V, generator=gen) * 1e-33
    key_max = torch.full((B, H), 75.0)
    options = dict(features="safe_exp", gate="log", tau=1.0, log_clamp=-8.0, scale=0.3, eps_unshifted=eps_unshifted)
    expected, _, _ = reference_step(x, state, key_max, weight=weight.double(), **options)
    on = {n: t.to(DEVICE) if t is not None else None for n, t in x.items()}
    out = triton_decode_step(
        on["q"],
        on["k"],
        on["v"],
        state.to(DEVICE),
        key_max=key_max.to(DEVICE),
        log_gate=on["a"],
        norm_eps=EPS,
        norm_weight=weight.to(DEVICE),
        **options,
    )
    assert (expected.abs().max() > 0.1) == eps_unshifted  # the regime each case is about
    assert torch.isfinite(out.output).all()
    assert rel_rms(out.output.cpu().double(), expected) <= 1e-5


def test_decode_step_writes_new_tensors_unless_in_place():
    q = torch.randn(1, 1, 2, 16, device=DEVICE)
    state, key_max = torch.zeros(1, 2, 16, 8, device=DEVICE), torch.zeros(1, 2, device=DEVICE)
    v = torch.ones(1, 1, 2, 8, device=DEVICE)
    out = triton_decode_step(q, q, v, state, features="safe_exp", key_max=key_max)
    assert out.state is not state and out.key_max is not key_max
    assert bool((state == 0).all()) and bool((key_max == 0).all())  # the inputs are untouched
    assert torch.equal(out.key_max, torch.maximum(key_max, q.amax(-1)[:, 0]))
    # No gate: S = φ(k) vᵀ from a zero state, so the unnormalised readout is φ(q)·φ(k) per value column.
    expected = (torch.exp(q - q.amax(-1, keepdim=True)) * torch.exp(q - q.amax(-1, keepdim=True))).sum(-1)
    assert torch.allclose(out.output[..., 0], expected, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(state=torch.zeros(1, 2, 16, 8, dtype=torch.float64)), "contiguous fp32"),
        (dict(features="relu"), "features must be one of identity, safe_exp"),
        (dict(features="safe_exp"), "safe_exp features need key_max"),
        (dict(gate="sigmoid"), "gate 'sigmoid' takes gate_logits, and only those"),
        (dict(gate="sigmoid", gate_logits=torch.zeros(1, 1, 2, 3)), r"gate tensors must be \[B, 1, H, 16\]"),
        (dict(q=torch.zeros(1, 2, 2, 16)), "one new token per sequence"),
        (dict(norm_weight=torch.ones(8)), "comes with norm_eps"),
    ],
)
def test_decode_step_rejects_what_it_cannot_take(change, message):
    args = dict(q=torch.zeros(1, 1, 2, 16), k=torch.zeros(1, 1, 2, 16), v=torch.zeros(1, 1, 2, 8))
    args["state"] = torch.zeros(1, 2, 16, 8)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        triton_decode_step(**args)


def decode_through_layer(layer, x, prompt, fused, monkeypatch, in_place=False):
    """Prefill `prompt` tokens through the composed path, then one token at a time through the fused
    step or the composed one; the per-token outputs and the last state."""
    monkeypatch.setattr(type(layer), "takes_decode_step", lambda self, q, state: fused and state is not None)
    with torch.no_grad():
        y, state = layer(x[:, :prompt], use_cache=True)
        if in_place:
            state = LinearState(state.memory.float().contiguous(), state.key_feature, state.last_input, in_place=True)
        outputs = [y]
        for t in range(prompt, x.shape[1]):
            before = state
            y, state = layer(x[:, t : t + 1], state, use_cache=True)
            if in_place and fused:
                assert state.memory is before.memory and state.in_place
            outputs.append(y)
    return torch.cat(outputs, dim=1), state


LAYER_CONFIGS = {
    "regla": dict(feature_map="safe_exp", gate="refined", norm="rmsnorm"),
    "gla": dict(feature_map="identity", gate="gla", norm="rmsnorm", output_gate="swish"),
    "regla_shifted_gate_input": dict(
        feature_map="safe_exp", gate="refined", norm="rmsnorm", gate_options={"input": "x_shift"}
    ),
    # gated RFA: a per-head sigmoid gate whose 1 − g also scales the keys (a factor on v here)
    "scalar": dict(feature_map="safe_exp", gate="scalar", norm="rmsnorm"),
}


@pytest.mark.parametrize("name", LAYER_CONFIGS)
def test_layer_decoding_through_the_fused_step_equals_the_composed_step(name, monkeypatch):
    torch.manual_seed(0)
    layer = LinearAttention(32, 2, 16, AttentionConfig(**LAYER_CONFIGS[name])).to(DEVICE)
    assert layer.decode_plan() is not None
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    composed, composed_state = decode_through_layer(layer, x, 3, False, monkeypatch)
    fused, fused_state = decode_through_layer(layer, x, 3, True, monkeypatch, in_place=True)
    assert rel_rms(fused, composed) <= 1e-5
    assert rel_rms(fused_state.memory, composed_state.memory) <= 1e-5
    if name.startswith("regla"):
        assert torch.equal(fused_state.key_feature, composed_state.key_feature.float())


def test_only_plugins_that_declare_every_part_take_the_decode_step():
    def layer(**options):
        return LinearAttention(32, 2, 16, AttentionConfig(**options))

    assert layer(feature_map="safe_exp", gate="refined", norm="rmsnorm").decode_plan() is not None
    assert layer(feature_map="identity", gate="gla", norm="rmsnorm").decode_plan() is not None
    # A feature map, gate or norm the kernel does not compute, or the denominator, keeps the composed step.
    assert layer(feature_map="relu", gate="gla", norm="rmsnorm").decode_plan() is None
    assert layer(feature_map="identity", gate="fast_decay", norm="rmsnorm").decode_plan() is None
    assert layer(feature_map="identity", gate="gla", norm="layernorm").decode_plan() is None
    assert (
        layer(feature_map="identity", gate="gla", norm="rmsnorm", norm_options={"per_head": False}).decode_plan()
        is None
    )
    assert (
        layer(feature_map="identity", gate="gla", norm="rmsnorm", gate_options={"axis": "value"}).decode_plan() is None
    )
    assert layer(feature_map="safe_exp", gate="refined", norm="rmsnorm", denominator=True).decode_plan() is None
    q = torch.zeros(1, 1, 2, 16)
    regla = layer(feature_map="safe_exp", gate="refined", norm="rmsnorm")
    # Off CUDA, over more than one token, or without an earlier state, the composed step runs.
    assert not regla.takes_decode_step(q, LinearState(torch.zeros(1, 2, 16, 16), torch.zeros(1, 2), q))
    assert not regla.takes_decode_step(q.to(DEVICE).expand(1, 2, 2, 16), None)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("B, H, K", [(16, 12, 64), (1, 12, 64), (2, 8, 128), (1, 4, 256)])
@pytest.mark.parametrize("features, gate, gate_shift", CASES[:4])
def test_decode_step_at_model_shapes_on_gpu(B, H, K, dtype, tolerance, features, gate, gate_shift):
    errors = run_steps(B, H, K, K, features=features, gate=gate, gate_shift=gate_shift, dtype=dtype, steps=4)
    assert worst(errors) <= tolerance, errors


@pytest.mark.gpu
@requires_cuda
def test_layers_take_the_decode_step_on_gpu_unless_switched_off():
    layer = LinearAttention(32, 2, 16, AttentionConfig(feature_map="safe_exp", gate="refined", norm="rmsnorm")).cuda()
    q = torch.zeros(1, 1, 2, 16, device="cuda")
    state = LinearState(torch.zeros(1, 2, 16, 16, device="cuda"), torch.zeros(1, 2, device="cuda"), q)
    # The kernel has no backward: with autograd on, the step is the composed one.
    assert not layer.takes_decode_step(q, state)
    with torch.no_grad():
        assert layer.takes_decode_step(q, state)
        layer.fused_decode_step = False
        assert not layer.takes_decode_step(q, state)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("name", ["regla", "gla"])
def test_model_decoding_through_the_fused_step_equals_the_composed_step_on_gpu(name):
    """A 4-layer fp32 model on CUDA (prefill through the chunked kernels, then 16 steps): the logits
    of every step with the fused decoding step against those with the composed one. (In bf16 the
    composed step rounds the state to bf16 each step, the fused one keeps it in fp32: the op-level
    tests judge bf16 against fp64 instead.)"""
    from harness.config import ModelConfig
    from harness.model import LanguageModel

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=512, d_model=256, n_layers=4, n_heads=4, attention=AttentionConfig(**LAYER_CONFIGS[name])
    )
    model = LanguageModel(config).to("cuda").eval()
    tokens = torch.randint(0, 512, (3, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def step_logits(fused):
        for layer in model.linear_attention_layers():
            layer.fused_decode_step = fused
        with torch.no_grad():
            logits, cache = model(tokens[:, :24], use_cache=True)
            steps = [logits[:, -1]]
            for t in range(24, 40):
                logits, cache = model(tokens[:, t : t + 1], cache, use_cache=True)
                steps.append(logits[:, -1])
        return torch.stack(steps)

    assert rel_rms(step_logits(True), step_logits(False)) <= 1e-4
