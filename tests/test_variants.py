"""Every registered plugin honours its contract (variants/base.py); the ReGLA pieces do what the
paper says (REGLA.md §2).

Plugin tests are parametrized from the registries at collection time, so a newly registered
plugin (built in, or from an entry point) is tested with no new test code. Each plugin is tested
with its defaults and with every value of the mode switches it exposes (`MODE_SWITCHES`).
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.config import AttentionConfig
from harness.layers import LinearAttention
from kernels import gated_linear_attention
from variants import FEATURE_MAPS, GATES, NORMS, variance_reduction_factor
from variants.feature_maps import KEY_MAX_SCOPES, VARIANCE_PLACEMENTS
from variants.gates import AXES, refined_gate_value

from .plugin_cases import plugin_modes

DTYPE = torch.float64
B, T, H, K, D = 2, 13, 2, 4, 12


pytestmark = pytest.mark.usefixtures("single_thread")


def plugin_cases(registry) -> list:
    """(name, options) for each plugin: its defaults, then each non-default mode, one at a time."""
    return [pytest.param(name, options, id=case_id) for name, options, case_id in plugin_modes(registry)]


def randn(*shape, seed=0, requires_grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return x.requires_grad_(requires_grad)


def assert_finite_grads(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> None:
    loss = sum((o * randn(*o.shape, seed=99)).sum() for o in outputs)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    for tensor, grad in zip(inputs, grads):
        if grad is not None:
            assert torch.isfinite(grad).all(), f"non-finite gradient for a tensor of shape {tuple(tensor.shape)}"
    assert any(g is not None for g in grads), "no gradient reaches any input"


# -- feature maps -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, options", plugin_cases(FEATURE_MAPS))
def test_feature_map_contract(name, options):
    phi = FEATURE_MAPS.create(name, K, H, **options).to(DTYPE)
    assert phi.feature_dim >= 1 and phi.kernel_scale > 0
    x = randn(B, T, H, K, seed=1, requires_grad=True)
    outputs = []
    for role in ("q", "k"):
        out = phi(x, role)
        assert out.features.shape == (B, T, H, phi.feature_dim), role
        assert torch.isfinite(out.features).all(), role
        outputs.append(out.features)
        if out.log_decay is not None:
            assert out.log_decay.shape == (B, T, H, 1)
            assert (out.log_decay <= 0).all(), "the feature map's extra decay must be <= 0"
            outputs.append(out.log_decay)
    assert_finite_grads(outputs, [x, *phi.parameters()])


@pytest.mark.parametrize(
    "name, options", [case for case in plugin_cases(FEATURE_MAPS) if FEATURE_MAPS.get(case.values[0]).positive_kernel]
)
def test_feature_map_positive_kernel_flag_is_true(name, options):
    """`positive_kernel` promises phi(q)·phi(k) >= 0 (the denominator relies on it)."""
    phi = FEATURE_MAPS.create(name, K, H, **options).to(DTYPE)
    q, k = 3 * randn(B, T, H, K, seed=2), 3 * randn(B, T, H, K, seed=3)
    scores = torch.einsum("bthf,bshf->bhts", phi(q, "q").features, phi(k, "k").features)
    assert (scores >= 0).all()


@pytest.mark.parametrize("name, options", plugin_cases(FEATURE_MAPS))
def test_feature_map_causal_flag_is_true(name, options):
    """A feature map that declares itself causal gives features (and extra decays) at t that do
    not depend on inputs after t; one that does not must really read the future."""
    phi = FEATURE_MAPS.create(name, K, H, **options).to(DTYPE)
    x = randn(B, T, H, K, seed=4)
    cut = 5
    changed = x.clone()
    changed[:, cut + 1 :] = 4 * randn(B, T - cut - 1, H, K, seed=5) + 3
    reads_future = False
    for role in ("q", "k"):
        a, b = phi(x, role), phi(changed, role)
        for first, second in ((a.features, b.features), (a.log_decay, b.log_decay)):
            if first is not None:
                reads_future |= not torch.equal(first[:, : cut + 1], second[:, : cut + 1])
    assert reads_future == (not phi.causal)


def test_safe_exp_features_are_bounded_in_zero_one():
    for key_max in KEY_MAX_SCOPES:
        phi = FEATURE_MAPS.create("safe_exp", K, H, key_max=key_max, chunk_size=4)
        x = 50 * randn(B, T, H, K, seed=6)  # exp(x) alone would overflow fp32 and lose fp64 range
        for role in ("q", "k"):
            features = phi(x, role).features
            assert (features > 0).all() and (features <= 1).all(), (key_max, role)


def test_safe_exp_running_decoding_state_matches_the_full_pass():
    """Step by step with the carried running max gives the same features and decays."""
    phi = FEATURE_MAPS.create("safe_exp", K, H, key_max="running")
    x = randn(B, T, H, K, seed=7)
    full = phi(x, "k")
    state = None
    for t in range(T):
        step = phi(x[:, t : t + 1], "k", state)
        torch.testing.assert_close(step.features, full.features[:, t : t + 1], rtol=0, atol=0)
        if t:
            torch.testing.assert_close(step.log_decay, full.log_decay[:, t : t + 1], rtol=0, atol=0)
        state = step.state


def test_variance_reduction_factor():
    assert variance_reduction_factor(64) == pytest.approx(0.0182, abs=5e-5)
    e = math.e
    for d in (1, 16, 64, 128):
        assert variance_reduction_factor(d) == pytest.approx(1 / (e * math.sqrt(d * (e * e - 1))), rel=1e-15)


def test_variance_theorem_by_monte_carlo():
    """For x, y ~ N(0, I_d): Var[Σ e^{x_i} e^{y_i}] = d e² (e² − 1), against Var[Σ x_i y_i] = d.

    e^{x+y} is log-normal with heavy tails, so the sample variance converges slowly: 2M samples
    at d = 8 give a relative standard error of about 2 %; the seed is fixed and the bound is 6 %.
    """
    d, n = 8, 2_000_000
    generator = torch.Generator().manual_seed(2025)
    exp_products, plain_products = [], []
    for _ in range(4):
        x = torch.randn(n // 4, d, generator=generator, dtype=DTYPE)
        y = torch.randn(n // 4, d, generator=generator, dtype=DTYPE)
        exp_products.append((x.exp() * y.exp()).sum(-1))
        plain_products.append((x * y).sum(-1))
    e = math.e
    assert torch.cat(exp_products).var().item() == pytest.approx(d * e * e * (e * e - 1), rel=0.06)
    assert torch.cat(plain_products).var().item() == pytest.approx(d, rel=0.01)
    # The factor gives the exponential product unit variance, as 1/sqrt(d) does for x·y.
    scaled = torch.cat(exp_products) * variance_reduction_factor(d)
    assert scaled.var().item() == pytest.approx(1.0, rel=0.06)
    assert (torch.cat(plain_products) / math.sqrt(d)).var().item() == pytest.approx(1.0, rel=0.01)


def test_variance_factor_placement():
    x = randn(B, T, H, K, seed=8)
    kernel = FEATURE_MAPS.create("safe_exp", K, H, variance_factor="kernel")
    query = FEATURE_MAPS.create("safe_exp", K, H, variance_factor="query")
    off = FEATURE_MAPS.create("safe_exp", K, H, variance_factor="off")
    factor = variance_reduction_factor(K)
    assert kernel.kernel_scale == pytest.approx(factor) and query.kernel_scale == off.kernel_scale == 1.0
    torch.testing.assert_close(query(x, "q").features, factor * off(x, "q").features, rtol=1e-15, atol=0)
    torch.testing.assert_close(kernel(x, "q").features, off(x, "q").features, rtol=0, atol=0)
    torch.testing.assert_close(query(x, "k").features, off(x, "k").features, rtol=0, atol=0)


# -- norms ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, options", plugin_cases(NORMS))
def test_norm_contract(name, options):
    norm = NORMS.create(name, K, H, **options).to(DTYPE)
    assert isinstance(norm.uses_denominator, bool)
    o = randn(B, T, H, K, seed=9, requires_grad=True)
    out = norm(o)
    assert out.shape == o.shape and torch.isfinite(out).all()
    assert_finite_grads([out], [o, *norm.parameters()])
    # Per token: the output at t reads o_t only (a norm over time would break causality).
    changed = o.detach().clone()
    changed[:, 7:] += 5.0
    torch.testing.assert_close(norm(changed)[:, :7], out[:, :7].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["rmsnorm", "layernorm", "groupnorm"])
def test_per_head_norms_cancel_a_positive_factor_per_token_and_head(name):
    """The property that makes safe_exp's max shifts (one per head and token) irrelevant."""
    norm = NORMS.create(name, K, H, eps=0.0).to(DTYPE)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(randn(*p.shape, seed=10))
    o = randn(B, T, H, K, seed=11)
    factor = randn(B, T, H, 1, seed=12).exp() * 1e3
    torch.testing.assert_close(norm(o * factor), norm(o), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["rmsnorm", "layernorm"])
def test_full_width_norms_cancel_a_factor_per_token_only(name):
    norm = NORMS.create(name, K, H, eps=0.0, per_head=False).to(DTYPE)
    o = randn(B, T, H, K, seed=13)
    per_token = randn(B, T, 1, 1, seed=14).exp()
    torch.testing.assert_close(norm(o * per_token), norm(o), rtol=1e-12, atol=1e-12)
    per_head = torch.tensor([1.0, 50.0], dtype=DTYPE).reshape(1, 1, H, 1)
    assert (norm(o * per_head) - norm(o)).abs().max() > 0.1


def test_denominator_norm_asks_for_the_denominator_only():
    norm = NORMS.create("denominator", K, H)
    o = randn(B, T, H, K, seed=15)
    assert norm.uses_denominator and torch.equal(norm(o), o)
    assert not any(NORMS.get(n).uses_denominator for n in NORMS.names() if n != "denominator")


# -- gates ------------------------------------------------------------------------------------------


def gate_bias_options(name: str) -> list[dict]:
    """The defaults, and the extreme starting points the gate declares (`Gate.extreme_options`:
    for the built-ins, saturated biases, where the paper's saturation experiment starts)."""
    return [{}, *GATES.get(name).extreme_options]


@pytest.mark.parametrize("name, options", plugin_cases(GATES))
def test_gate_contract(name, options):
    F_dim, V_dim = K + 1, K  # a feature dim unlike the value dim catches swapped axes
    for bias_options in gate_bias_options(name):
        torch.manual_seed(0)
        gate = GATES.create(name, D, H, F_dim, V_dim, **options, **bias_options).to(DTYPE)
        x = randn(B, T, D, seed=16, requires_grad=True)
        out = gate(x)
        label = f"{name} {options} {bias_options}"
        tracked = []
        for log_gate, full in ((out.log_k, F_dim), (out.log_v, V_dim)):
            if log_gate is not None:
                assert log_gate.shape in {(B, T, H, full), (B, T, H, 1)}, label
                assert torch.isfinite(log_gate).all(), label
                assert (log_gate <= 0).all(), f"{label}: log gate {log_gate.max().item()} > 0"
                tracked.append(log_gate)
        if out.input_scale is not None:
            assert out.input_scale.shape == (B, T, H, 1), label
            assert ((out.input_scale >= 0) & (out.input_scale <= 1)).all(), label
            tracked.append(out.input_scale)
        for key, activation in out.activations.items():
            assert activation.shape[:3] == (B, T, H), label
            assert ((activation > 0) & (activation <= 1)).all(), f"{label}: activation {key} outside (0, 1]"
        for key, logits in out.preactivations.items():
            assert torch.isfinite(logits).all(), f"{label}: preactivation {key}"
        # A constant decay (RetNet's) has nothing to differentiate.
        if any(t.requires_grad for t in tracked):
            assert_finite_grads(tracked, [x, *gate.parameters()])


@pytest.mark.parametrize("name, options", plugin_cases(GATES))
def test_gate_is_causal_and_resumes_from_the_previous_input(name, options):
    gate = GATES.create(name, D, H, K, K, **options).to(DTYPE)
    x = randn(B, T, D, seed=17)
    full = gate(x)
    changed = x.clone()
    changed[:, 6:] = randn(B, T - 6, D, seed=18)
    after_change = gate(changed)
    # Decoding feeds the gate the tail of the sequence and the input just before it.
    resumed = gate(x[:, 6:], x[:, 5:6])
    for field in ("log_k", "log_v", "input_scale"):
        a, b, c = getattr(full, field), getattr(after_change, field), getattr(resumed, field)
        if a is None:
            assert b is None and c is None
            continue
        torch.testing.assert_close(b[:, :6], a[:, :6], rtol=0, atol=0)
        torch.testing.assert_close(c, a[:, 6:], rtol=1e-14, atol=1e-14)


def test_gate_input_x_shift_reads_the_previous_token():
    plain = GATES.create("gla", D, H, K, K, rank=None, input="x").to(DTYPE)
    shifted = GATES.create("gla", D, H, K, K, rank=None, input="x_shift").to(DTYPE)
    shifted.load_state_dict(plain.state_dict())
    x = randn(B, T, D, seed=19)
    torch.testing.assert_close(shifted(x).log_k[:, 1:], plain(x).log_k[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(shifted(x).log_k[:, :1], plain(torch.zeros_like(x[:, :1])).log_k)


@pytest.mark.parametrize("axis", AXES)
def test_gate_axis_puts_the_decay_on_that_side(axis):
    gate = GATES.create("refined", D, H, K + 1, K, axis=axis)
    out = gate(torch.randn(B, T, D))
    if axis == "key":
        assert out.log_v is None and out.log_k.shape == (B, T, H, K + 1)
    else:
        assert out.log_k is None and out.log_v.shape == (B, T, H, K)


def test_refined_gate_log_form_equals_the_literal_formula():
    """log F from the gate equals log((1 − r) g² + r (1 − (1 − g)²)) wherever it is not clamped."""
    gate = GATES.create("refined", D, H, K, K, log_clamp=None, bias_init=[-9.0, 9.0], refine_bias_init=[-9.0, 9.0]).to(
        DTYPE
    )
    out = gate(randn(B, T, D, seed=20))
    g, r = out.activations["g"], out.activations["r"]
    literal = refined_gate_value(g, r)
    torch.testing.assert_close(out.log_k, literal.log(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.activations["F"], literal, rtol=1e-10, atol=0)
    # F spans g² (r = 0) ... g (2 − g) (r = 1).
    assert ((literal >= g * g * (1 - 1e-12)) & (literal <= g * (2 - g) * (1 + 1e-12))).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_refined_gate_never_exceeds_one_despite_round_off(dtype):
    """F <= 1 in exact arithmetic; near g = 1 the factored log form rounds either way, and a log
    gate above 0 makes the state grow (in bf16 it reached e^{0.005} per token)."""
    gate = GATES.create("refined", 2, 1, 1, 1, log_clamp=None)
    with torch.no_grad():
        # Input channel 0 drives the gate logit, channel 1 the refine logit.
        gate.gate_proj.up.weight.copy_(torch.tensor([[1.0, 0.0]]))
        gate.refine_proj.up.weight.copy_(torch.tensor([[0.0, 1.0]]))
        gate.gate_proj.up.bias.zero_()
        gate.refine_proj.up.bias.zero_()
    grid = torch.cartesian_prod(torch.linspace(-40, 40, 1601), torch.linspace(-40, 40, 161))
    with torch.no_grad():
        log_f = gate.to(dtype)(grid.unsqueeze(0).to(dtype)).log_k
    assert log_f.dtype == dtype and log_f.shape == (1, grid.shape[0], 1, 1)
    assert torch.isfinite(log_f).all() and (log_f <= 0).all()


def test_refined_gate_clamp_and_temperature():
    options = dict(bias_init=[-12.0, 4.0], refine_bias_init=[-4.0, 4.0])
    torch.manual_seed(1)
    unclamped = GATES.create("refined", D, H, K, K, log_clamp=None, **options).to(DTYPE)
    clamped = GATES.create("refined", D, H, K, K, log_clamp=-3.0, tau=2.0, **options).to(DTYPE)
    clamped.load_state_dict(unclamped.state_dict())
    x = randn(B, T, D, seed=21)
    log_f = unclamped(x).log_k
    assert (log_f / 2.0 < -3.0).any() and (log_f / 2.0 > -3.0).any()  # both sides of the clamp
    torch.testing.assert_close(clamped(x).log_k, (log_f / 2.0).clamp_min(-3.0), rtol=1e-14, atol=0)


def test_refined_gate_gradient_does_not_vanish_at_saturated_g():
    """∂F/∂g = 2(1 − r) g + 2 r (1 − g): with r in between, non-zero at both ends of g (REGLA.md §2),
    where a plain sigmoid gate's derivative vanishes."""
    g = torch.tensor([1e-6, 1 - 1e-6], dtype=DTYPE, requires_grad=True)
    r = torch.full((2,), 0.5, dtype=DTYPE)
    (grad,) = torch.autograd.grad(refined_gate_value(g, r).sum(), g)
    assert (grad > 0.99).all()


def test_bias_init_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"bias_init must be a number, \[low, high\], or 'uniform_gate'"):
        GATES.create("gla", D, H, K, K, bias_init="saturated")
    with pytest.raises(ValueError, match="axis must be one of key, value"):
        GATES.create("refined", D, H, K, K, axis="time")
    with pytest.raises(ValueError, match="input must be one of x, x_shift"):
        GATES.create("refined", D, H, K, K, input="y")
    with pytest.raises(ValueError, match="key_max must be one of sequence, chunk, running"):
        FEATURE_MAPS.create("safe_exp", K, H, key_max="global")


# -- safe_exp under the output norm: the max shifts cancel (the paper's claim) ---------------------


def linear_attention(
    feature_options: dict, norm: str, denominator: bool = False, seed: int = 0, gate: str = "refined"
) -> LinearAttention:
    torch.manual_seed(seed)
    # eps = 0: a norm cancels a constant factor exactly, so only round-off separates the scopes.
    norm_options = {"eps": 0.0} if "eps" in NORMS.options_of(norm) else {}
    config = AttentionConfig(
        feature_map="safe_exp",
        feature_map_options=feature_options,
        norm=norm,
        norm_options=norm_options,
        gate=gate,
        denominator=denominator,
        denominator_eps=0.0,
        impl="chunked",
    )
    layer = LinearAttention(D, H, K, config).to(DTYPE)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(randn(*p.shape, seed=seed + p.numel()) * 0.5)
    return layer


NORMALISED = [("rmsnorm", False), ("groupnorm", False), ("layernorm", False), ("none", True)]


@pytest.mark.parametrize("norm, denominator", NORMALISED)
def test_safe_exp_key_max_scopes_agree_under_the_norm(norm, denominator):
    # 70 tokens with chunks of 16: the chunk scope really differs from the other two.
    x = 3 * randn(B, 70, D, seed=22)
    outputs = {}
    for scope in KEY_MAX_SCOPES:
        layer = linear_attention({"key_max": scope, "chunk_size": 16}, norm, denominator)
        outputs[scope] = layer(x)[0]
    for scope in ("running", "chunk"):
        torch.testing.assert_close(outputs[scope], outputs["sequence"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm, denominator", NORMALISED)
def test_safe_exp_equals_the_unshifted_exponential_under_the_norm(norm, denominator):
    """The max subtraction only buys numerical range: under the norm the layer computes the same
    thing as phi(x) = exp(x) without any shift (which is safe here: small inputs, fp64)."""
    x = randn(B, 40, D, seed=23)
    for scope in KEY_MAX_SCOPES:
        layer = linear_attention({"key_max": scope, "chunk_size": 16}, norm, denominator)
        Bx, Tx, _ = x.shape
        q = layer.q_proj(x).view(Bx, Tx, H, K)
        k = layer.k_proj(x).view(Bx, Tx, H, K)
        v = layer.v_proj(x).view(Bx, Tx, H, K)
        gate = layer.gate(x)
        o, _ = gated_linear_attention(
            q.exp(),
            k.exp(),
            v,
            gate.log_k,
            gate.log_v,
            scale=layer.feature_map.kernel_scale,
            denominator=denominator,
            denominator_eps=0.0,
            impl="recurrent",
        )
        expected = layer.o_proj(layer.norm(o).reshape(Bx, Tx, H * K))
        torch.testing.assert_close(layer(x)[0], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scope", KEY_MAX_SCOPES)
def test_safe_exp_is_unchanged_by_a_constant_added_to_a_heads_keys(scope):
    layer = linear_attention({"key_max": scope, "chunk_size": 16}, "rmsnorm")
    x = randn(B, 40, D, seed=24)
    reference = layer(x)[0]
    shift = torch.tensor([7.5, -40.0], dtype=DTYPE).repeat_interleave(K)  # one constant per head
    handle = layer.k_proj.register_forward_hook(lambda module, args, out: out + shift)
    try:
        shifted = layer(x)[0]
    finally:
        handle.remove()
    torch.testing.assert_close(shifted, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("placement", VARIANCE_PLACEMENTS)
def test_variance_factor_placement_is_cancelled_by_the_norm(placement):
    x = randn(B, 30, D, seed=25)
    expected = linear_attention({"variance_factor": "kernel"}, "rmsnorm")(x)[0]
    actual = linear_attention({"variance_factor": placement}, "rmsnorm")(x)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_fast_decay_starts_at_the_decay_gla_starts_at():
    # Zero biases would start Fast Decay at σ(0)² = 0.25 per step: a handicapped baseline.
    x = torch.zeros(1, 3, D, dtype=DTYPE)
    fast = GATES.create("fast_decay", D, H, K, K).to(DTYPE)(x)
    gla = GATES.create("gla", D, H, K, K).to(DTYPE)(x)
    fast_decay = (fast.log_k[..., :1] + fast.log_v[..., :1]).exp()
    assert torch.allclose(fast_decay, gla.log_k.exp().mean().expand_as(fast_decay), rtol=1e-6)
    zero_bias = GATES.create("fast_decay", D, H, K, K, bias_init=0.0).to(DTYPE)(x)
    assert torch.allclose((zero_bias.log_k + zero_bias.log_v[..., :1]).exp(), torch.tensor(0.25, dtype=DTYPE))


def performer_projections(model) -> list[torch.Tensor]:
    return [layer.feature_map.projection.clone() for layer in model.linear_attention_layers()]


def test_performer_draws_per_layer_and_head_reproducibly_from_the_run_seed():
    from harness.config import AttentionConfig, ModelConfig
    from harness.model import build_model

    config = ModelConfig(d_model=32, n_layers=2, n_heads=2, attention=AttentionConfig(feature_map="performer"))
    first, again = (performer_projections(build_model(config, 50, seed=5)) for _ in range(2))
    other_seed = performer_projections(build_model(config, 50, seed=6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the run's seed decides the draws
    assert not torch.equal(first[0], first[1])  # each layer its own
    assert not torch.equal(first[0][0], first[0][1])  # each head its own
    assert not torch.equal(first[0], other_seed[0])
    fixed = ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        attention=AttentionConfig(feature_map="performer", feature_map_options={"seed": 3}),
    )
    fixed_layers = performer_projections(build_model(fixed, 50, seed=5))
    assert torch.equal(fixed_layers[0], fixed_layers[1])


def test_performer_redraws_on_schedule_in_training_only():
    torch.manual_seed(0)
    phi = FEATURE_MAPS.create("performer", K, H, redraw_every=2)
    twin = FEATURE_MAPS.create("performer", K, H, redraw_every=2, seed=int(phi.draw_seed))
    assert torch.equal(phi.projection, twin.projection)
    x = randn(B, T, H, K, seed=40)
    draws = []
    for _ in range(5):
        phi(x, "q"), phi(x, "k")
        twin(x, "q"), twin(x, "k")
        draws.append(phi.projection.clone())
        assert torch.equal(phi.projection, twin.projection)  # the same schedule on every process
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])  # redrawn at step 2
    assert torch.equal(draws[2], draws[3]) and not torch.equal(draws[3], draws[4])
    phi.eval()
    before = phi.projection.clone()
    for _ in range(4):
        phi(x, "q")
    assert torch.equal(phi.projection, before)  # evaluation and decoding never redraw
    with pytest.raises(ValueError, match="redraw_every must be >= 0"):
        FEATURE_MAPS.create("performer", K, H, redraw_every=-1)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "groupnorm"])
def test_safe_exp_scopes_agree_under_the_norm_with_its_default_eps(norm):
    """eps lives in the unshifted frame (the default `norm_eps_frame`): the key-max scopes agree
    to rounding with the norm's default eps, where with eps on the shifted output (`shifted`,
    a plain RMSNorm's behaviour) they differ."""
    x = 3 * randn(B, 70, D, seed=22)

    def outputs(frame: str) -> dict[str, torch.Tensor]:
        result = {}
        for scope in KEY_MAX_SCOPES:
            torch.manual_seed(0)
            config = AttentionConfig(
                feature_map="safe_exp",
                feature_map_options={"key_max": scope, "chunk_size": 16},
                norm=norm,
                gate="refined",
                norm_eps_frame=frame,
            )
            layer = LinearAttention(D, H, K, config).to(DTYPE)
            with torch.no_grad():
                result[scope] = layer(x)[0]
        return result

    default = outputs("unshifted")
    for scope in ("running", "chunk"):
        torch.testing.assert_close(default[scope], default["sequence"], rtol=1e-10, atol=1e-10)
    shifted = outputs("shifted")
    assert (shifted["running"] - shifted["sequence"]).abs().max() > 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "groupnorm"])
def test_norm_in_the_unshifted_frame_takes_tiny_outputs(norm, dtype):
    """Under a closed gate, safe-exp's shifted attention output can be ~e^-(shifts): here 1e-20
    with shifts of 50. The norm of it (eps in the unshifted frame) is an ordinary number, and so
    are its gradients; squaring o directly underflowed in the forward (fp32, bf16) and the
    backward of rsqrt overflowed from mean(o²) ~ 1e-26 on."""
    torch.manual_seed(0)
    module = NORMS.create(norm, K, H)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    o = randn(B, T, H, K, seed=60) * 1e-20
    log_scale = -50 - randn(B, T, H, 1, seed=61).abs()

    def forward_and_grads(dtype):
        leaves = [o.to(dtype).requires_grad_(True), log_scale.to(dtype).requires_grad_(True)]
        out = module.to(torch.float64 if dtype == torch.float64 else torch.float32)(*leaves)
        weights = randn(*out.shape, seed=62)
        grads = torch.autograd.grad((out.double() * weights).sum(), leaves)
        return [out.double(), grads[0].double() * 1e-20]  # d/do scaled back to an ordinary size

    want = forward_and_grads(torch.float64)
    got = forward_and_grads(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert ((g - w).norm() / w.norm()).item() <= tolerance


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_norm_in_the_unshifted_frame_where_eps_dominates(norm):
    """eps_t = eps · exp(2 log_scale) far above o's square (shifts of −50): the output is
    o / sqrt(eps_t), tiny, and exact in fp32 (a cap on eps_t / max|o|² made it ~e^-40 of the row
    instead); its gradients are finite and exact too."""
    torch.manual_seed(0)
    module = NORMS.create(norm, K, H)
    o = randn(B, T, H, K, seed=63)
    log_scale = 50 + randn(B, T, H, 1, seed=64).abs()

    def direct(o, log_scale):  # the definition, in fp64, with nothing rescaled
        centred = o - o.mean(-1, keepdim=True) if norm == "layernorm" else o
        out = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + module.eps * torch.exp(2 * log_scale))
        return out * module.weight.double() + (module.bias.double() if norm == "layernorm" else 0)

    def forward_and_grads(fn, dtype):
        leaves = [o.to(dtype).requires_grad_(True), log_scale.to(dtype).requires_grad_(True)]
        out = fn(*leaves)
        grads = torch.autograd.grad((out.double() * randn(*out.shape, seed=65)).sum(), leaves)
        return [out.double(), *(g.double() for g in grads)]

    want = forward_and_grads(direct, torch.float64)
    got = forward_and_grads(module.float(), torch.float32)
    assert want[0].abs().max() < 1e-15  # the regime: eps dominates by far
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert ((g - w).norm() / w.norm()).item() <= 1e-5


def test_hedgehog_forms():
    x = randn(B, T, H, K, seed=41)
    paper = FEATURE_MAPS.create("hedgehog", K, H).to(DTYPE)
    fla = FEATURE_MAPS.create("hedgehog", K, H, form="fla").to(DTYPE)
    # paper: a softmax per half, one map for q and k; fla: one joint softmax, a map per role.
    halves = paper(x, "q").features.split(K, dim=-1)
    assert all(torch.allclose(h.sum(-1), torch.ones((), dtype=DTYPE)) for h in halves)
    assert torch.equal(paper(x, "q").features, paper(x, "k").features)
    joint = fla(x, "q").features
    assert torch.allclose(joint.sum(-1), torch.ones((), dtype=DTYPE))
    torch.testing.assert_close(joint, torch.cat([2 * x, -2 * x], dim=-1).softmax(-1))  # identity at init
    with torch.no_grad():
        fla.key_map.bias.add_(1.0)
    assert not torch.equal(fla(x, "q").features, fla(x, "k").features)
    with pytest.raises(ValueError, match="hedgehog: form must be one of paper, fla"):
        FEATURE_MAPS.create("hedgehog", K, H, form="lolcats")
