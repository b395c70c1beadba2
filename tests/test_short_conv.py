"""The short convolution over q, k, v (`attention.short_conv`): the same function as torch's
depthwise Conv1d, continued exactly from its history, never reading across a packed document's
start; a checked setting that leaves every existing run id alone."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from harness.config import AttentionConfig, ConfigError, DataConfig, ModelConfig, TrainConfig
from harness.hf import reorder_state
from harness.layers import LinearAttention
from harness.model import LanguageModel
from harness.report import _recorded_switches
from harness.short_conv import ShortConvolution
from harness.spec import RunSpec

C, W = 6, 4


def conv(width: int = W, channels: int = C) -> ShortConvolution:
    torch.manual_seed(0)
    return ShortConvolution(channels, width).double()


def inputs(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("T", [1, 3, 17])
def test_is_silu_of_a_causal_depthwise_conv1d(T):
    layer = conv()
    x = inputs(2, T)
    reference = torch.nn.Conv1d(C, C, W, groups=C, padding=W - 1, bias=False).double()
    reference.weight.data.copy_(layer.weight)
    want = F.silu(reference(x.transpose(1, 2))[..., :T].transpose(1, 2))
    got, tail = layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    # The tail is the last W − 1 inputs, zeros in front where the sequence is shorter.
    padded = torch.cat([x.new_zeros(2, W - 1, C), x], dim=1)
    assert torch.equal(tail, padded[:, -(W - 1) :])


def test_continues_exactly_from_its_history():
    layer = conv()
    x = inputs(2, 20)
    full, _ = layer(x)
    pieces, history = [], None
    for start, end in ((0, 2), (2, 3), (3, 11), (11, 20)):
        y, history = layer(x[:, start:end], history)
        pieces.append(y)
    # To fp64 rounding, not bit for bit: F.conv1d's summation order can depend on the input's
    # length (oneDNN picks its kernel by shape and CPU; on one CPU 4 of 240 values differed by 1e-16).
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-14)


def test_packed_documents_do_not_see_each_other():
    layer = conv()
    x = inputs(1, 15)
    bounds = [0, 1, 6, 9, 15]
    positions = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])]).unsqueeze(0)
    got, _ = layer(x, positions=positions)
    want = torch.cat([layer(x[:, a:b])[0] for a, b in zip(bounds, bounds[1:])], dim=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    assert (got - layer(x)[0]).abs().max() > 1e-3  # the boundaries do matter


def test_bad_history_shape_is_refused():
    with pytest.raises(ValueError, match=r"history must be \[B, W - 1, C\]"):
        conv()(inputs(2, 5), torch.zeros(2, W, C, dtype=torch.float64))


@pytest.mark.parametrize("width", [1, -2, True, 2.5, "4"])
def test_width_is_checked_with_what_is_allowed(width):
    with pytest.raises(ConfigError, match="short_conv is a convolution width in tokens, 0 \\(none\\) or at least 2"):
        AttentionConfig(short_conv=width)


def test_layer_convolves_q_k_v_and_carries_the_inputs_in_its_state():
    torch.manual_seed(0)
    layer = LinearAttention(16, 2, 8, AttentionConfig(feature_map="identity", gate="gla", short_conv=3)).double()
    assert layer.short_conv.weight.shape == (3 * 16, 1, 3)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    _, state = layer(x, use_cache=True)
    projections = torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], dim=-1)
    assert torch.equal(state.conv_inputs, projections[:, -2:])
    # Beam search reorders the convolution's inputs with the rest of the state.
    reordered = reorder_state(state, torch.tensor([1, 0, 1]))
    assert torch.equal(reordered.conv_inputs, state.conv_inputs[[1, 0, 1]])


def run_spec(name: str = "r", **attention) -> RunSpec:
    model = ModelConfig(attention=AttentionConfig(feature_map="identity", **attention))
    return RunSpec(name=name, model=model, data=DataConfig(), train=TrainConfig())


def test_unset_leaves_run_ids_alone_and_a_width_makes_another_run():
    spec = run_spec

    assert "short_conv" not in spec().identity()["model"]["attention"]
    assert spec().run_id == spec(short_conv=0).run_id
    assert spec(short_conv=4).run_id != spec().run_id != spec(short_conv=2).run_id


def test_reports_name_the_convolution_among_a_runs_switches():
    def row(name: str, **attention) -> dict:
        spec = run_spec(name, **attention)
        return {"run_id": spec.run_id, "run_name": name, "spec_json": spec.to_json()}

    frame = pd.DataFrame([row("with", short_conv=4), row("without")])
    lines = _recorded_switches(frame).splitlines()
    assert lines[0].endswith("; short_conv=4") and "short_conv" not in lines[1]
    assert json.loads(frame.spec_json[0])["model"]["attention"]["short_conv"] == 4


# --- softmax layers (`model.softmax_short_conv`) -------------------------------------------------


def hybrid_with_convolutions() -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=37, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2.0, softmax_layers="odd",
        softmax_short_conv=4, attention=AttentionConfig(feature_map="identity", gate="gla", short_conv=3),
    )  # fmt: skip
    return LanguageModel(config).double().eval()


def test_softmax_layers_convolve_and_keep_packed_documents_apart():
    model = hybrid_with_convolutions()
    assert model.blocks[1].attn.short_conv.weight.shape == (3 * 16, 1, 4)
    gen = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 37, (2, 12), generator=gen), torch.randint(0, 37, (2, 12), generator=gen)
    lengths = [5, 7, 1, 4, 7]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    with torch.no_grad():
        packed = model.loss(idx, targets, cu_seqlens=torch.tensor(bounds, dtype=torch.int32))
        flat_idx, flat_targets = idx.reshape(1, -1), targets.reshape(1, -1)
        want = (
            sum((b - a) * model.loss(flat_idx[:, a:b], flat_targets[:, a:b]) for a, b in zip(bounds, bounds[1:]))
            / idx.numel()
        )
    assert abs(packed.item() - want.item()) <= 1e-12 * abs(want.item())


def test_softmax_layers_cache_carries_the_convolutions_inputs_and_follows_beams():
    model = hybrid_with_convolutions()
    _, cache = model(torch.randint(0, 37, (2, 9)), use_cache=True)
    kv = cache[1]
    assert kv.conv_inputs.shape == (2, 3, 3 * 16)
    assert kv.conv_inputs.untyped_storage().nbytes() == kv.conv_inputs.numel() * kv.conv_inputs.element_size()
    assert torch.equal(reorder_state(kv, torch.tensor([1, 1])).conv_inputs, kv.conv_inputs[[1, 1]])


def test_softmax_convolution_width_is_checked_and_unset_leaves_run_ids_alone():
    with pytest.raises(ConfigError, match=r"model.softmax_short_conv is a convolution width in tokens"):
        ModelConfig(softmax_short_conv=1)
    plain = RunSpec(name="s", model=ModelConfig(softmax_layers="all"), data=DataConfig(), train=TrainConfig())
    assert "softmax_short_conv" not in plain.identity()["model"]
    with_conv = RunSpec(
        name="s", model=ModelConfig(softmax_layers="all", softmax_short_conv=4), data=DataConfig(), train=TrainConfig()
    )
    assert with_conv.run_id != plain.run_id
    frame = pd.DataFrame([{"run_id": with_conv.run_id, "run_name": "s", "spec_json": with_conv.to_json()}])
    assert _recorded_switches(frame).endswith("(rotary=True); softmax short_conv=4")
