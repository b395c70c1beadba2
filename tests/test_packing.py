"""Documents packed into rows (`cu_seqlens`) through the layers and the model: attention never
crosses a boundary, so a model's loss on packed rows is the token-weighted mean of its losses on
each document alone; the fused ReGLA path on packed input equals the layer run per document."""

from __future__ import annotations

import pytest
import torch

from harness.config import AttentionConfig, ModelConfig
from harness.layers import LinearAttention
from harness.model import LanguageModel

from .numerics import rel_rms

VOCAB, D, H = 37, 16, 2
ROW_DOCUMENTS = ((5, 7), (1, 4, 7))  # two rows of T = 12: lengths 1 and odd, one document per row too
HAS_CUDA = torch.cuda.is_available()


def cu_seqlens(rows=ROW_DOCUMENTS) -> torch.Tensor:
    lengths = [n for row in rows for n in row]
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def tiny_model(gate_input: str = "x", softmax_layers: str = "odd") -> LanguageModel:
    torch.manual_seed(0)
    attention = AttentionConfig(
        feature_map="safe_exp", norm="rmsnorm", gate="refined", gate_options={"input": gate_input}
    )
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


@pytest.mark.parametrize("gate_input", ["x", "x_shift"])
def test_packed_loss_is_the_mean_of_per_document_losses(gate_input):
    # A hybrid: layer 0 linear (ReGLA), layer 1 softmax with rotary positions.
    model = tiny_model(gate_input)
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
def test_fused_layer_on_packed_documents_matches_per_document(monkeypatch):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    config = AttentionConfig(feature_map="safe_exp", norm="rmsnorm", gate="refined")
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
