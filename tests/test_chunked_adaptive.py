"""The default (factorised, adaptive-chunk) chunked form against the fp64 recurrence: outputs,
final state and every gradient, at odd lengths and at gates from near 1 to near 0 (where the
chunk must shrink to keep exponents in range), and in fp32 at extreme gates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import chunked_gla, recurrent_gla
from kernels.reference import adaptive_chunk_size

GATE_REGIMES = {
    "near_one": lambda shape: F.logsigmoid(torch.randn(shape, dtype=torch.float64) + 8.0),
    "mixed": lambda shape: F.logsigmoid(3 * torch.randn(shape, dtype=torch.float64)),
    "near_zero": lambda shape: F.logsigmoid(torch.randn(shape, dtype=torch.float64) - 25.0),
}


def outputs_and_grads(fn, tensors, **kwargs):
    tensors = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]
    o, final = fn(*tensors[:5], initial_state=tensors[5], output_final_state=True, **kwargs)
    weights = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)
    (o * weights).sum().add((final * final).sum()).backward()
    return [o, final] + [t.grad for t in tensors if t is not None]


@pytest.mark.parametrize("T", [1, 15, 63, 64, 65, 200])
@pytest.mark.parametrize("regime", sorted(GATE_REGIMES))
@pytest.mark.parametrize("sides", ["key", "both", "scalar"])
def test_factorised_chunked_matches_recurrence(T, regime, sides):
    torch.manual_seed(T)
    B, H, K, V = 2, 2, 5, 3
    q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    gk = GATE_REGIMES[regime]((B, T, H, 1 if sides == "scalar" else K))
    gv = GATE_REGIMES[regime]((B, T, H, V)) if sides == "both" else None
    h0 = torch.randn(B, H, K, V, dtype=torch.float64)
    expected = outputs_and_grads(recurrent_gla, [q, k, v, gk, gv, h0], scale=0.7)
    got = outputs_and_grads(chunked_gla, [q, k, v, gk, gv, h0], scale=0.7)
    for e, g in zip(expected, got):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-10), (e - g).abs().max()


def test_chunk_shrinks_with_steep_gates_and_refuses_infinite_ones():
    assert adaptive_chunk_size([torch.full((4,), -0.1)], torch.float32) == 64
    assert adaptive_chunk_size([torch.full((4,), -8.0)], torch.float32) == 8
    assert adaptive_chunk_size([torch.full((4,), -100.0)], torch.float32) == 1
    assert adaptive_chunk_size([torch.tensor([0.0, float("-inf")])], torch.float32) is None
    gk = torch.tensor([0.0, float("-inf"), -1.0]).reshape(1, 3, 1, 1).expand(1, 3, 1, 2)
    q = torch.ones(1, 3, 1, 2)
    with pytest.raises(ValueError, match="log gates must be finite.*log_clamp"):
        chunked_gla(q, q, q, gk)


def test_fp32_extreme_gates_stay_accurate():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 300, 2, 16) for _ in range(3))
    gk = F.logsigmoid(5 * torch.randn(2, 300, 2, 16)).clamp_min(-8.0)
    o, _ = chunked_gla(q, k, v, gk)
    ref, _ = recurrent_gla(q.double(), k.double(), v.double(), gk.double())
    assert torch.isfinite(o).all()
    assert ((o.double() - ref).norm() / ref.norm()).item() < 1e-5
