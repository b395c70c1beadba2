"""Generation over static buffers (harness.decoding): the same tokens as the plain loop over the
growing decoding state, greedy and sampled, for linear, softmax (rotary, windows of the static KV
cache crossed mid-generation) and hybrid models, eos included. On CUDA, the step captured as CUDA
graphs gives exactly the tokens of the same step run eagerly, and those of the plain loop."""

from __future__ import annotations

import pytest
import torch

import harness.decoding
from harness.config import AttentionConfig, ModelConfig
from harness.decoding import Sampling, windows_for
from harness.layers import LinearAttention
from harness.model import LanguageModel

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
pytestmark = pytest.mark.usefixtures("single_thread")

MODELS = {
    "regla": dict(attention=AttentionConfig(feature_map="safe_exp", gate="refined", norm="rmsnorm")),
    "gla_shifted_gate_input": dict(
        attention=AttentionConfig(
            feature_map="identity", gate="gla", norm="rmsnorm", output_gate="swish", gate_options={"input": "x_shift"}
        )
    ),
    "softmax": dict(softmax_layers="all"),
    "hybrid": dict(softmax_layers="odd"),
    # the short convolution's last inputs are part of the state the static buffers hold
    "gla_short_conv": dict(attention=AttentionConfig(feature_map="identity", gate="gla", norm="rmsnorm", short_conv=4)),
    "softmax_short_conv": dict(softmax_layers="all", softmax_short_conv=4),
    # linear layers with rotary positions (converted from a softmax model): the position moves on
    "regla_rotary": dict(
        attention=AttentionConfig(feature_map="safe_exp", gate="refined", norm="rmsnorm", rotary=True)
    ),
}


def model_of(name, device="cpu", vocab=41, d_model=16, n_layers=2, n_heads=2):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, mlp_ratio=2.0, **MODELS[name]
    )
    return LanguageModel(config).to(device).eval()


@pytest.fixture
def small_windows(monkeypatch):
    """Windows of 4, 8, 16, … positions, so that a few tokens cross several of them."""
    monkeypatch.setattr(harness.decoding, "MIN_WINDOW", 4)


def test_windows_are_powers_of_two_up_to_the_capacity(small_windows):
    assert windows_for(21) == [4, 8, 16, 21]
    assert windows_for(16) == [4, 8, 16]
    assert windows_for(3) == [3]


@pytest.mark.parametrize("name", MODELS)
def test_static_decoding_gives_the_tokens_of_the_plain_loop(name, small_windows):
    model = model_of(name)
    prompt = torch.randint(0, 41, (2, 3), generator=torch.Generator().manual_seed(1))
    plain = model.generate(prompt, 14, static=False)
    static = model.generate(prompt, 14, static=True)
    assert plain.shape == (2, 17) and torch.equal(static, plain)
    sampled = [
        model.generate(prompt, 14, static=flag, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(2))
        for flag in (False, True)
    ]
    assert torch.equal(*sampled) and not torch.equal(sampled[0], plain)


def test_static_decoding_after_a_prompt_past_the_small_windows(small_windows):
    model = model_of("hybrid")
    prompt = torch.randint(0, 41, (2, 21), generator=torch.Generator().manual_seed(5))
    decoder = harness.decoding.StaticDecoder(model, model(prompt, use_cache=True)[1], 21, 26)
    assert decoder.windows == [26]  # 4, 8 and 16 hold no position from 21 on
    for n in (1, 2, 5):
        assert torch.equal(model.generate(prompt, n, static=True), model.generate(prompt, n, static=False))


def test_static_decoding_stops_at_eos_like_the_plain_loop():
    model = model_of("hybrid")
    prompt = torch.randint(0, 41, (1, 3), generator=torch.Generator().manual_seed(1))
    plain = model.generate(prompt, 10, static=False)
    eos = int(plain[0, 6])  # a token the greedy continuation produces
    stopped = model.generate(prompt, 10, eos_id=eos, static=True)
    first = int((plain[0, 3:] == eos).nonzero()[0]) + 3
    assert torch.equal(stopped, plain[:, : first + 1])
    assert torch.equal(stopped, model.generate(prompt, 10, eos_id=eos, static=False))


def test_bad_generation_settings_are_refused():
    model = model_of("regla")
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model and idx on a CUDA device"):
        model.generate(prompt, 3, cuda_graph=True)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(prompt, 3, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        Sampling(top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        model.generate(prompt, -1)
    assert torch.equal(model.generate(prompt, 0), prompt)


@pytest.mark.gpu
@requires_cuda
# A capture that fails falls back to eager decoding with a warning: here that is a failure, or the
# comparison below would compare eager decoding with itself.
@pytest.mark.filterwarnings("error:decoding without CUDA graphs")
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 4])
def test_captured_decoding_gives_exactly_the_tokens_of_uncaptured_decoding(name, batch, small_windows):
    model = model_of(name, "cuda", vocab=512, d_model=128, n_layers=4, n_heads=2)
    prompt = torch.randint(0, 512, (batch, 5), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    captured = model.generate(prompt, 70, cuda_graph=True)
    assert torch.equal(captured, model.generate(prompt, 70, cuda_graph=False, static=True))
    assert torch.equal(captured, model.generate(prompt, 70, cuda_graph=False, static=False))
    sampled = [
        model.generate(prompt, 70, cuda_graph=flag, do_sample=True, generator=torch.Generator("cuda").manual_seed(3))
        for flag in (True, False)
    ]
    assert torch.equal(*sampled)
    # A prompt past the smaller windows, and generations of one and two tokens.
    long_prompt = torch.randint(0, 512, (batch, 21), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    for n in (1, 2):
        assert torch.equal(model.generate(long_prompt, n), model.generate(long_prompt, n, cuda_graph=False))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_static_decoding_of_a_bf16_model_keeps_the_states_dtypes(norm):
    """Layers on the composed step take their state in the model's dtype: the static buffers keep
    the prefill's dtypes (fp32 buffers are for the fused step only)."""
    torch.manual_seed(0)
    attention = AttentionConfig(feature_map="safe_exp", gate="refined", norm=norm)
    config = ModelConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2.0, attention=attention)
    model = LanguageModel(config).to(torch.bfloat16).eval()
    prompt = torch.randint(0, 41, (2, 3), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.generate(prompt, 10, static=True), model.generate(prompt, 10, static=False))


def test_the_fused_decoding_step_is_never_taken_where_gradients_are_wanted(monkeypatch):
    """The fused step's kernel has no backward: with autograd on, one-token steps take the
    composed path (whose gradients flow), whatever the device."""
    model = model_of("regla")
    layer = model.blocks[0].attn
    monkeypatch.setattr(layer, "fuses_decode_steps", lambda device: True)
    q = torch.zeros(1, 1, 2, 8)
    _, state = model(torch.zeros(1, 3, dtype=torch.long), use_cache=True)
    with torch.no_grad():
        assert layer.takes_decode_step(q, state[0])
    assert not layer.takes_decode_step(q, state[0])  # grad mode on
    assert not layer.takes_decode_step(torch.zeros(1, 2, 2, 8), state[0])  # two tokens: the chunked path


@pytest.mark.parametrize("short_conv", [0, 4])
def test_a_decoding_state_holds_its_own_small_tensors_not_views_of_the_prompt(short_conv):
    """The state after a prefill is O(1) in the prompt's length: nothing in it keeps a view into
    the layer's [B, T, ...] tensors alive."""
    torch.manual_seed(0)
    config = AttentionConfig(feature_map="safe_exp", gate="refined", short_conv=short_conv)
    layer = LinearAttention(16, 2, 8, config).double()
    _, state = layer(torch.randn(2, 50, 16, dtype=torch.float64), use_cache=True)
    tensors = [state.memory, state.key_feature, state.last_input] + ([state.conv_inputs] if short_conv else [])
    for t in tensors:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
