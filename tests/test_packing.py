"""Documents packed into rows (`cu_seqlens`) through the layers and the model: attention never
crosses a boundary, so a model's loss on packed rows is the token-weighted mean of its losses on
each document alone; the fused ReGLA path on packed input equals the layer run per document."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness.config import AttentionConfig, ConfigError, DataConfig, ModelConfig
from harness.data.batching import TokenDataset, document_offsets
from harness.layers import LinearAttention
from harness.model import LanguageModel
from harness.spec import spec_from_dict
from harness.train import train

from .numerics import rel_rms

VOCAB, D, H = 37, 16, 2
ROW_DOCUMENTS = ((5, 7), (1, 4, 7))  # two rows of T = 12: lengths 1 and odd, one document per row too
HAS_CUDA = torch.cuda.is_available()


def cu_seqlens(rows=ROW_DOCUMENTS) -> torch.Tensor:
    lengths = [n for row in rows for n in row]
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def tiny_model(softmax_layers: str = "odd", **attention) -> LanguageModel:
    torch.manual_seed(0)
    attention = AttentionConfig(**{"feature_map": "safe_exp", "norm": "rmsnorm", "gate": "refined", **attention})
    config = ModelConfig(
        vocab_size=VOCAB,
        d_model=D,
        n_layers=2,
        n_heads=H,
        mlp_ratio=2.0,
        attention=attention,
        softmax_layers=softmax_layers,
    )
    return LanguageModel(config).double().eval()


@pytest.mark.parametrize(
    "attention",
    [
        {},
        {"gate": "scalar", "gate_options": {"input": "x_shift"}},
        {"feature_map": "elu_plus_one", "gate": "fast_decay", "norm": "denominator"},
        {"feature_map": "identity", "gate": "gla", "output_gate": "swish"},
        {"feature_map": "identity", "gate": "gla", "short_conv": 4},
    ],
    ids=["regla", "key_scaling_gate_of_previous_token", "fast_decay_denominator", "gla_output_gate", "gla_short_conv"],
)
def test_packed_loss_is_the_mean_of_per_document_losses(attention):
    # A hybrid: layer 0 linear, layer 1 softmax with rotary positions.
    model = tiny_model(**attention)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 12), generator=gen)
    targets = torch.randint(0, VOCAB, (2, 12), generator=gen)
    with torch.no_grad():
        packed = model.loss(idx, targets, cu_seqlens=cu_seqlens())
        bounds = cu_seqlens().tolist()
        flat_idx, flat_targets = idx.reshape(1, -1), targets.reshape(1, -1)
        per_document = [
            (end - start) * model.loss(flat_idx[:, start:end], flat_targets[:, start:end])
            for start, end in zip(bounds, bounds[1:])
        ]
        unpacked = model.loss(idx, targets)
    want = torch.stack(per_document).sum() / idx.numel()
    assert abs(packed.item() - want.item()) <= 1e-12 * abs(want.item())
    assert abs(unpacked.item() - want.item()) > 1e-6  # the boundaries do change the loss


def test_packed_rows_must_start_documents():
    model = tiny_model()
    idx = torch.zeros(2, 12, dtype=torch.long)
    with pytest.raises(ValueError, match="every row start"):
        model(idx, cu_seqlens=torch.tensor([0, 5, 24], dtype=torch.int32))
    with pytest.raises(ValueError, match="for training"):
        model(idx, use_cache=True, cu_seqlens=cu_seqlens())


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter case; on CUDA the gpu test covers the fused path")
@pytest.mark.parametrize("gate_input", ["x", "x_shift"])
def test_fused_layer_on_packed_documents_matches_per_document(gate_input, monkeypatch):
    # x_shift: one gate call reads across boundaries, harmlessly (the state it decays there is zero).
    pytest.importorskip("triton")
    torch.manual_seed(0)
    config = AttentionConfig(feature_map="safe_exp", norm="rmsnorm", gate="refined", gate_options={"input": gate_input})
    layer = LinearAttention(16, 1, 16, config)
    # Force the fused op under Triton's interpreter (it otherwise runs on CUDA only).
    monkeypatch.setattr(LinearAttention, "takes_fused_path", lambda self, q: True)
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(2))
    got = layer(x, cu_seqlens=cu_seqlens())[0]
    monkeypatch.setattr(LinearAttention, "takes_fused_path", lambda self, q: False)
    flat, bounds = x.reshape(1, 24, 16), cu_seqlens().tolist()
    want = torch.cat([layer(flat[:, a:b])[0] for a, b in zip(bounds, bounds[1:])], dim=1).view(2, 12, 16)
    assert rel_rms(got, want) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_packed_model_loss_and_gradients():
    # The fused ReGLA op on packed documents against the model run one document at a time (fp32).
    torch.manual_seed(0)
    attention = AttentionConfig(feature_map="safe_exp", norm="rmsnorm", gate="refined")
    config = ModelConfig(
        vocab_size=VOCAB, d_model=128, n_layers=2, n_heads=2, attention=attention, softmax_layers="odd"
    )
    model = LanguageModel(config).cuda()
    rows = ((1, 300, 211), (512,), (63, 64, 65, 320))
    idx = torch.randint(0, VOCAB, (3, 512), device="cuda")
    targets = torch.randint(0, VOCAB, (3, 512), device="cuda")
    cu = cu_seqlens(rows).cuda()
    packed = model.loss(idx, targets, cu_seqlens=cu)
    packed_grads = torch.autograd.grad(packed, list(model.parameters()))
    bounds = cu.tolist()
    flat_idx, flat_targets = idx.reshape(1, -1), targets.reshape(1, -1)
    per_document = (
        sum(
            (end - start) * model.loss(flat_idx[:, start:end], flat_targets[:, start:end])
            for start, end in zip(bounds, bounds[1:])
        )
        / idx.numel()
    )
    grads = torch.autograd.grad(per_document, list(model.parameters()))
    assert abs(packed.item() - per_document.item()) <= 1e-4 * abs(per_document.item())
    assert max(rel_rms(a, b) for a, b in zip(packed_grads, grads)) <= 1e-3


# --- the data path -----------------------------------------------------------------------------

EOT = 36


def test_document_offsets_start_rows_and_follow_each_eot():
    x = torch.tensor([[3, EOT, 4, 5, EOT, 6], [EOT, 7, 8, 9, 10, EOT]])
    assert document_offsets(x, EOT).tolist() == [0, 2, 5, 6, 7, 12]


def test_document_batches_are_the_windows_cut_at_documents():
    tokens = np.array([1, 2, EOT, 3, 4, 5, 6, EOT, 7, EOT] * 20, dtype=np.uint16)
    data = TokenDataset(tokens, eot_id=EOT)
    x, y, cu = data.sample_document_batch(3, 8, torch.Generator().manual_seed(5))
    x_windows, y_windows = data.sample_batch(3, 8, torch.Generator().manual_seed(5))
    assert torch.equal(x, x_windows) and torch.equal(y, y_windows)  # the same tokens, only cut
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 24
    flat = x.flatten().tolist()
    for start, end in zip(cu.tolist(), cu.tolist()[1:]):
        assert EOT not in flat[start : end - 1]  # an eot only ever ends a document
        assert start % 8 == 0 or flat[start - 1] == EOT
    with pytest.raises(ValueError, match="needs the token that ends each document"):
        TokenDataset(tokens).sample_document_batch(1, 8)


def test_packing_option_is_checked_and_leaves_run_ids_alone():
    assert DataConfig().packing == "windows"
    with pytest.raises(ConfigError, match="data.packing must be one of windows, documents"):
        DataConfig(packing="rows")
    windows, documents = spec_from_dict({}, name="w"), spec_from_dict({"data": {"packing": "documents"}}, name="d")
    assert "packing" not in windows.identity()["data"]  # run ids from before the option still match
    assert windows.run_id != documents.run_id


def test_training_on_packed_documents(tmp_path):
    # Two steps of the training loop with data.packing = documents: the batches reach the model
    # with their cu_seqlens (a model that ignored them would see no call with it).
    tokens = np.array(([1, 2, 3, EOT, 4, 5, EOT, 6, 7, 8, 9, EOT] * 40), dtype=np.uint16)
    split = TokenDataset(tokens, eot_id=EOT)
    data = SimpleNamespace(
        tokenizer=SimpleNamespace(vocab_size=VOCAB),
        train=split,
        validation=split,
        bytes_per_token={"validation": 1.0},
    )
    spec = spec_from_dict(
        {
            "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "softmax_layers": "odd"},
            "data": {"packing": "documents"},
            "train": {
                "steps": 2,
                "batch_size": 2,
                "seq_len": 16,
                "eval_every": 2,
                "eval_batches": 1,
                "log_every": 1,
                "warmup_steps": 1,
            },
        },
        name="packed",
    )
    seen = []
    original = LanguageModel.forward

    def recording_forward(self, idx, *args, cu_seqlens=None, **kwargs):
        if self.training:
            seen.append(cu_seqlens)
        return original(self, idx, *args, cu_seqlens=cu_seqlens, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LanguageModel, "forward", recording_forward)
        _, records = train(spec, data, tmp_path, device="cpu", progress=False)
    assert len(seen) == 2 and all(cu is not None and cu[-1] == 32 for cu in seen)
    assert all(math.isfinite(r["value"]) for r in records if r["metric"] == "train/loss")
