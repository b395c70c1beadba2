"""Layers and the language model built from every plugin: shapes, finite gradients, causality,
the measured leak of safe_exp's non-causal key-max scopes, incremental decoding (linear, softmax
and hybrid), and configuration errors that say what is allowed. All numerics in fp64."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.config import AttentionConfig, ConfigError, ModelConfig, from_dict, to_dict
from harness.layers import LinearAttention
from harness.model import LanguageModel
from variants import FEATURE_MAPS, GATES, NORMS

from .plugin_cases import plugin_modes

DTYPE = torch.float64
VOCAB, D, H, K = 37, 16, 2, 8


pytestmark = pytest.mark.usefixtures("single_thread")


# The rest of the layer around the plugin under test: ReGLA's own choices.
REGLA = dict(feature_map="safe_exp", norm="rmsnorm", gate="refined")


def plugin_cases(registry, axis: str) -> list:
    """AttentionConfig overrides: each plugin with its defaults, then each non-default mode."""
    return [
        pytest.param({axis: name, f"{axis}_options": options}, id=f"{axis}={case_id}")
        for name, options, case_id in plugin_modes(registry, skip=("affine",))
    ]


EVERY_PLUGIN = plugin_cases(FEATURE_MAPS, "feature_map") + plugin_cases(NORMS, "norm") + plugin_cases(GATES, "gate")


def attention_config(**overrides) -> AttentionConfig:
    fields = {**REGLA, **overrides}
    # The denominator needs a positive kernel: keep ReGLA's map when the norm under test asks for it.
    if NORMS.get(fields["norm"]).uses_denominator and not FEATURE_MAPS.get(fields["feature_map"]).positive_kernel:
        fields["feature_map"] = "safe_exp"
    return AttentionConfig(**fields)


def tiny_model(attention: AttentionConfig | None = None, seed: int = 0, **model_fields) -> LanguageModel:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=VOCAB,
        d_model=D,
        n_layers=2,
        n_heads=H,
        mlp_ratio=2.0,
        attention=attention or attention_config(),
        **model_fields,
    )
    return LanguageModel(config).to(DTYPE).eval()


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def is_causal(attention: AttentionConfig) -> bool:
    phi = FEATURE_MAPS.create(attention.feature_map, K, H, **attention.feature_map_options)
    return phi.causal


def norm_cancels_the_shifts(attention: AttentionConfig) -> bool:
    """A per-head norm whose eps lives in the unshifted frame cancels safe_exp's key max exactly,
    the non-causal scopes' too."""
    norm = NORMS.create(attention.norm, K, H, **attention.norm_options)
    return attention.norm_eps_frame == "unshifted" and norm.scales_eps and not attention.denominator


# -- every plugin inside the model ------------------------------------------------------------------


@pytest.mark.parametrize("overrides", EVERY_PLUGIN)
def test_model_with_every_plugin_gives_finite_logits_and_gradients(overrides):
    model = tiny_model(attention_config(**overrides)).train()
    idx = tokens(2, 21, seed=1)
    logits, cache = model(idx)
    assert logits.shape == (2, 21, VOCAB) and cache is None
    assert torch.isfinite(logits).all()
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("overrides", EVERY_PLUGIN)
def test_model_with_every_plugin_is_causal(overrides):
    """Changing the tokens after t leaves the logits up to t unchanged, for every causal mode. A
    mode that reads the future (safe_exp's `sequence` and `chunk` key max) leaks unless a per-head
    norm cancels its shifts, which the default one does (eps in the unshifted frame); the leak
    otherwise is measured in test_safe_exp_leak_of_the_non_causal_key_max_scopes."""
    attention = attention_config(**overrides)
    model = tiny_model(attention)
    idx = tokens(2, 40, seed=2)
    cut = 22
    changed = idx.clone()
    changed[:, cut + 1 :] = tokens(2, 40 - cut - 1, seed=3)
    with torch.no_grad():
        before, after = model(idx)[0][:, : cut + 1], model(changed)[0][:, : cut + 1]
    if is_causal(attention):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    elif norm_cancels_the_shifts(attention):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
    else:
        assert (after - before).abs().max() > 1e-12


@pytest.mark.parametrize("overrides", EVERY_PLUGIN)
def test_layer_gradients_are_those_of_the_function_it_computes(overrides):
    """Finite differences agree with autograd for the layer built with every plugin. Without an
    output norm (unless the norm is under test), so no rescaling can hide a wrong gradient."""
    overrides = {"norm": "none", **overrides}
    torch.manual_seed(0)
    layer = LinearAttention(D, H, K, attention_config(**overrides)).to(DTYPE)
    x = torch.randn(1, 5, D, generator=torch.Generator().manual_seed(11), dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inputs: layer(inputs)[0], (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_loss_keeps_fp64_and_is_the_mean_token_cross_entropy():
    model = tiny_model()
    idx = tokens(2, 9, seed=12)
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    assert loss.dtype == DTYPE
    log_probs = model(idx[:, :-1])[0].log_softmax(-1)
    expected = -log_probs.gather(-1, idx[:, 1:, None]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("scope", ["sequence", "chunk"])
def test_safe_exp_leak_of_the_non_causal_key_max_scopes(scope):
    """Measured, not assumed: later tokens change earlier outputs through the key max.

    Without an output norm the earlier outputs are rescaled per head (a large leak). Under a
    per-head RMSNorm whose eps applies to the shifted output (`norm_eps_frame: shifted`, what a
    plain RMSNorm such as fla's does) the rescaling cancels except through eps: the leak is below
    eps / mean(o²) in normalised units, i.e. it shrinks linearly with eps. With eps = 1e-5 and the
    small outputs of safe_exp (features <= 1 times the variance factor) that can still be
    percent-sized. With the default `unshifted` frame it is rounding.
    """
    x = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    changed = x.clone()
    changed[:, 25:] = torch.randn(2, 15, D, generator=torch.Generator().manual_seed(5), dtype=DTYPE)

    def measure(norm: str, eps: float | None, frame: str = "shifted"):
        torch.manual_seed(0)
        config = AttentionConfig(
            feature_map="safe_exp",
            feature_map_options={"key_max": scope, "chunk_size": 16},
            norm=norm,
            norm_options={} if eps is None else {"eps": eps},
            gate="refined",
            norm_eps_frame=frame,
        )
        layer = LinearAttention(D, H, K, config).to(DTYPE)
        normalised, mean_squares = [], []

        def record(module, inputs, output):
            normalised.append(output)
            mean_squares.append(inputs[0].pow(2).mean(-1).min().item())

        layer.norm.register_forward_hook(record)
        with torch.no_grad():
            layer(x), layer(changed)
        leak = (normalised[0][:, :25] - normalised[1][:, :25]).abs().max().item()
        return leak, normalised[0].abs().max().item(), min(mean_squares)

    leak, scale, _ = measure("none", None)
    assert leak > 0.1 * scale, f"without a norm the leak should be large; got {leak:.3g} of {scale:.3g}"
    leaks = {}
    for eps in (1e-5, 1e-8, 1e-11):
        leaks[eps], _, mean_square = measure("rmsnorm", eps)
        assert 0 < leaks[eps] <= eps / mean_square, f"eps={eps}: leak {leaks[eps]:.3g}"
    assert leaks[1e-11] < 1e-6
    # Linear in eps: three orders of magnitude of eps, three of leak.
    assert leaks[1e-8] / leaks[1e-5] < 2e-3 and leaks[1e-11] / leaks[1e-8] < 2e-3
    # The default frame: the same eps, no leak beyond rounding.
    for eps in (1e-5, 1e-2):
        leak, _, _ = measure("rmsnorm", eps, frame="unshifted")
        assert leak < 1e-12, f"eps={eps}: leak {leak:.3g}"


def test_safe_exp_running_scope_does_not_leak_even_without_a_norm():
    model = tiny_model(attention_config(feature_map_options={"key_max": "running"}, norm="none"))
    idx = tokens(2, 40, seed=6)
    changed = idx.clone()
    changed[:, 30:] = tokens(2, 10, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[0][:, :30], model(idx)[0][:, :30], rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["recurrent", "parallel"])
def test_model_is_the_same_through_every_attention_implementation(impl):
    idx = tokens(2, 45, seed=8)
    with torch.no_grad():
        expected = tiny_model(attention_config(impl="chunked"))(idx)[0]
        actual = tiny_model(attention_config(impl=impl))(idx)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


# -- incremental decoding ---------------------------------------------------------------------------


def assert_decoding_reproduces_the_full_pass(model: LanguageModel, tolerance: float = 1e-10) -> None:
    """Prefill a prompt, then feed the rest in pieces of 1 and several tokens with the cache: the
    logits of every position equal the full forward pass."""
    idx = tokens(2, 30, seed=9)
    with torch.no_grad():
        full, _ = model(idx)
        logits, cache = model(idx[:, :7], use_cache=True)
        pieces = [logits]
        position = 7
        for size in (1, 3, 1, 1, 5, 1, 2, 1, 1, 7):
            logits, cache = model(idx[:, position : position + size], cache, use_cache=True)
            pieces.append(logits)
            position += size
    assert position == idx.shape[1]
    incremental = torch.cat(pieces, dim=1)
    scale = full.abs().max().item()
    torch.testing.assert_close(incremental, full, rtol=0, atol=tolerance * scale)


TINY_EPS = {"eps": 1e-14}  # the norm then cancels a key-max rescaling to ~1e-10

DECODING_CASES = {
    "safe_exp running, rmsnorm, refined": dict(attention=attention_config()),
    "safe_exp chunk, rmsnorm": dict(
        attention=attention_config(feature_map_options={"key_max": "chunk", "chunk_size": 4}, norm_options=TINY_EPS),
        tolerance=1e-8,
    ),
    "safe_exp sequence, rmsnorm": dict(
        attention=attention_config(feature_map_options={"key_max": "sequence"}, norm_options=TINY_EPS), tolerance=1e-8
    ),
    "safe_exp sequence, groupnorm, variance factor on q": dict(
        attention=attention_config(
            feature_map_options={"key_max": "sequence", "variance_factor": "query"},
            norm="groupnorm",
            norm_options=TINY_EPS,
        ),
        tolerance=1e-8,
    ),
    "scalar gate with denominator": dict(
        attention=attention_config(feature_map="elu_plus_one", norm="denominator", gate="scalar")
    ),
    "safe_exp running, rmsnorm + denominator": dict(attention=attention_config(denominator=True)),
    "fast_decay, identity map": dict(attention=attention_config(feature_map="identity", gate="fast_decay")),
    "refined gate on x_shift, value axis": dict(
        attention=attention_config(gate_options={"input": "x_shift", "axis": "value"})
    ),
    "gla gate on x_shift, hedgehog, layernorm, swish output gate": dict(
        attention=attention_config(
            feature_map="hedgehog", norm="layernorm", gate="gla", gate_options={"input": "x_shift"}, output_gate="swish"
        )
    ),
    "no gate, relu": dict(attention=attention_config(feature_map="relu", gate="none")),
    "gla with a short convolution": dict(attention=attention_config(feature_map="identity", gate="gla", short_conv=4)),
    "regla with a short convolution of width 2": dict(attention=attention_config(short_conv=2)),
    "softmax": dict(softmax_layers="all"),
    "softmax with a short convolution": dict(softmax_layers="all", softmax_short_conv=4),
    "hybrid even": dict(softmax_layers="even"),
    "hybrid even, both kinds with a short convolution": dict(
        softmax_layers="even", softmax_short_conv=3, attention=attention_config(short_conv=4)
    ),
    "hybrid [1] of 3 layers": dict(softmax_layers=[1], n_layers=3),
}


@pytest.mark.parametrize("case", list(DECODING_CASES))
def test_incremental_decoding_reproduces_the_full_forward_pass(case):
    fields = dict(DECODING_CASES[case])
    tolerance = fields.pop("tolerance", 1e-10)
    if "n_layers" in fields:
        torch.manual_seed(0)
        attention = fields.pop("attention", attention_config())
        model = (
            LanguageModel(
                ModelConfig(vocab_size=VOCAB, d_model=D, n_heads=H, mlp_ratio=2.0, attention=attention, **fields)
            )
            .to(DTYPE)
            .eval()
        )
    else:
        model = tiny_model(**fields)
    assert_decoding_reproduces_the_full_pass(model, tolerance)


def test_hybrid_layer_kinds_follow_the_pattern():
    config = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=4, n_heads=H, softmax_layers="odd")
    model = LanguageModel(config)
    assert [b.is_softmax for b in model.blocks] == [False, True, False, True]
    assert len(model.linear_attention_layers()) == 2


def test_generate_is_greedy_decoding_of_the_full_model():
    model = tiny_model(softmax_layers=[0])
    prompt = tokens(2, 5, seed=10)
    out = model.generate(prompt, max_new_tokens=6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        for t in range(5, 11):
            expected = model(out[:, :t])[0][:, -1].argmax(-1)
            assert torch.equal(out[:, t], expected)


# -- configuration errors ---------------------------------------------------------------------------


def test_unknown_config_key_is_named_with_the_allowed_keys():
    with pytest.raises(ConfigError) as info:
        from_dict(ModelConfig, {"d_modle": 64})
    message = str(info.value)
    assert "unknown key 'd_modle' in ModelConfig (did you mean 'd_model'?)" in message
    allowed = ", ".join(sorted(f.name for f in dataclasses.fields(ModelConfig)))
    assert f"allowed keys: {allowed}" in message


def test_unknown_nested_config_key_names_where_it_was_found():
    with pytest.raises(ConfigError) as info:
        from_dict(ModelConfig, {"n_layers": 2, "attention": {"gatte": "refined"}}, "model")
    message = str(info.value)
    assert "unknown key 'gatte' in model.attention (did you mean 'gate'?)" in message
    assert "allowed keys: denominator, denominator_eps, feature_map" in message


def test_config_round_trips_through_plain_data():
    config = ModelConfig(
        vocab_size=VOCAB,
        d_model=D,
        n_heads=H,
        softmax_layers=[1, 3],
        attention=AttentionConfig(feature_map="safe_exp", feature_map_options={"key_max": "chunk"}),
    )
    data = to_dict(config)
    assert data["softmax_layers"] == [1, 3]
    assert from_dict(ModelConfig, data) == config


@pytest.mark.parametrize(
    "softmax_layers, expected_message",
    [
        (
            [4],
            "model.softmax_layers: indices [4] out of range for 4 layers (allowed 0..3, or one of none, all, "
            "even, odd, first_half, last_half)",
        ),
        ([0, -5, "1"], "indices [-5, '1'] out of range for 4 layers"),
        ("middle", "model.softmax_layers must be one of none, all, even, odd, first_half, last_half; got 'middle'"),
    ],
)
def test_bad_softmax_layers_say_what_is_allowed(softmax_layers, expected_message):
    with pytest.raises(ConfigError) as info:
        ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=4, n_heads=H, softmax_layers=softmax_layers)
    assert expected_message in str(info.value)


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("none", ()),
        ("all", (0, 1, 2, 3, 4)),
        ("even", (0, 2, 4)),
        ("odd", (1, 3)),
        ("first_half", (0, 1)),
        ("last_half", (3, 4)),
        ([4, -1, 0], (0, 4)),
    ],
)
def test_softmax_layer_patterns(pattern, expected):
    config = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=5, n_heads=H, softmax_layers=pattern)
    assert config.softmax_layer_indices() == expected


@pytest.mark.parametrize(
    "fields, expected_message",
    [
        (dict(mlp="relu"), "model.mlp must be one of swiglu, gelu; got 'relu'"),
        (dict(d_model=15), "model.d_model (15) must be divisible by model.n_heads (2)"),
        (dict(n_layers=0), "model.n_layers must be a positive integer; got 0"),
        (dict(attention={"output_gate": "sigmoid"}), "attention.output_gate must be one of none, swish; got 'sigmoid'"),
        (dict(attention={"normm": "rmsnorm"}), "unknown key 'normm' in model.attention"),
    ],
)
def test_bad_model_fields_say_what_is_allowed(fields, expected_message):
    base = dict(vocab_size=VOCAB, d_model=D, n_heads=H)
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**base, **fields})
    assert expected_message in str(info.value)


@pytest.mark.parametrize(
    "attention",
    [
        AttentionConfig(feature_map="identity", norm="denominator"),
        AttentionConfig(feature_map="identity", norm="rmsnorm", denominator=True),
    ],
)
def test_denominator_with_a_non_positive_feature_map_is_refused(attention):
    with pytest.raises(ConfigError) as info:
        LinearAttention(D, H, K, attention)
    message = str(info.value)
    assert "needs a feature map whose kernel is positive; 'identity'" in message
    positive = [n for n in FEATURE_MAPS.names() if FEATURE_MAPS.get(n).positive_kernel]
    assert f"Use one of {', '.join(positive)}" in message and "safe_exp" in positive


def test_unknown_plugin_names_and_options_in_a_model_config_fail_at_build_time():
    with pytest.raises(ValueError, match="unknown gate 'refind'. Did you mean 'refined'"):
        tiny_model(attention_config(gate="refind"))
    with pytest.raises(ValueError, match="norm 'rmsnorm' got unknown option.s. epsilon; allowed options"):
        tiny_model(attention_config(norm_options={"epsilon": 1e-6}))


def test_model_rejects_a_token_tensor_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"idx must be \[batch, time\] token ids; got shape \(3,\)"):
        tiny_model()(torch.zeros(3, dtype=torch.long))
