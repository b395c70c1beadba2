"""The fused recurrent op with key- and value-side gates (`kernels.triton_recurrent`) against the fp64
recurrence: output, final state and the gradients of q, k, v, gk, gv and the initial state, with a
gradient flowing into the final state too.

Without CUDA the kernels run under Triton's interpreter (tests/conftest.py) on tiny head dims, at an
odd length that spans two of the backward's checkpoint segments, a partial last one included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels import triton_recurrent  # noqa: E402
from kernels.reference import recurrent_gla  # noqa: E402
from kernels.triton_recurrent import fused_recurrent_gla  # noqa: E402

from .numerics import gla_results_with_grads, rel_rms, worst  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
pytestmark = pytest.mark.usefixtures("nan_filled_kernel_buffers")

T_ODD = 37
assert triton_recurrent.CHECKPOINT < T_ODD < 2 * triton_recurrent.CHECKPOINT


def make_inputs(B, T, H, K, V, *, key_gate=True, value_gate=True, states=True, seed=0):
    """Random q, k, v and initial state; key gate logsigmoid(N(0, 4)) per feature, value gate
    logsigmoid(N(2, 1)) per value column (either None when switched off)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V))
    x["gk"] = F.logsigmoid(randn(B, T, H, K) * 2.0) if key_gate else None
    x["gv"] = F.logsigmoid(randn(B, T, H, V) + 2.0) if value_gate else None
    x["h0"] = randn(B, H, K, V) if states else None
    return {name: t.to(DEVICE) for name, t in x.items() if t is not None}


def compare_to_recurrence(inputs, dtype=torch.float32, output_final_state=True):
    """Relative RMS errors of every result against the fp64 recurrence on the same (dtype-rounded) inputs."""
    scale = inputs["q"].shape[-1] ** -0.5
    got = gla_results_with_grads(fused_recurrent_gla, inputs, dtype, scale, output_final_state)
    rounded = {name: t.to(dtype) for name, t in inputs.items()}
    want = gla_results_with_grads(recurrent_gla, rounded, torch.float64, scale, output_final_state)
    if output_final_state:
        assert got["final_state"].dtype == torch.float32
    assert got["o"].dtype == dtype
    for name in inputs:
        assert got[f"d{name}"].dtype == dtype
    return {name: rel_rms(got[name], want[name]) for name in want}


#: Measured under the interpreter: every error <= 1.9e-7 (everything in fp32, no matrix products).
FP32_BOUND = 1e-5


@pytest.mark.parametrize(
    "B, H, key_gate, value_gate, states, output_final_state",
    [
        (2, 2, True, True, True, True),
        (1, 2, True, False, True, True),
        (1, 2, False, True, True, True),
        (1, 2, False, False, True, True),
        (2, 1, True, True, False, False),
    ],
    ids=["both_gates", "key_gate_only", "value_gate_only", "no_gates", "no_states"],
)
def test_matches_recurrence(B, H, key_gate, value_gate, states, output_final_state):
    inputs = make_inputs(B, T_ODD, H, 8, 16, key_gate=key_gate, value_gate=value_gate, states=states)
    errors = compare_to_recurrence(inputs, output_final_state=output_final_state)
    assert worst(errors) <= FP32_BOUND, errors


def test_closed_value_gate_is_exact():
    # A closed value gate (−8 a step, a log_clamp's floor) and a nearly open key gate (logσ(8) ≈ −3.4e-4):
    # the segmented rescaling cannot take it, and the closed-form gate gradient would cancel to ~1e-3.
    inputs = make_inputs(1, T_ODD, 2, 8, 16, seed=3)
    inputs["gv"] = torch.full_like(inputs["gv"], -8.0)
    inputs["gk"] = torch.full_like(inputs["gk"], F.logsigmoid(torch.tensor(8.0)).item())
    errors = compare_to_recurrence(inputs)
    assert worst(errors) <= FP32_BOUND, errors


def test_several_value_blocks(monkeypatch):
    # V = 20 in blocks of 8: three programs per head, the last one partly outside V; dq, dk and dgk
    # are summed over the blocks' partials.
    monkeypatch.setattr(triton_recurrent, "VALUE_BLOCK", 8)
    inputs = make_inputs(1, T_ODD, 2, 8, 20, seed=4)
    errors = compare_to_recurrence(inputs)
    assert worst(errors) <= FP32_BOUND, errors


def test_per_head_scalar_gates():
    inputs = make_inputs(1, 20, 2, 8, 8, seed=5)
    inputs["gk"] = inputs["gk"][..., :1].contiguous()
    inputs["gv"] = inputs["gv"][..., :1].contiguous()
    errors = compare_to_recurrence(inputs)
    assert worst(errors) <= FP32_BOUND, errors


#: bf16 inputs, compared with the recurrence on the same rounded inputs: what is left is the rounding
#: of the results to bf16 (2^-9 ≈ 2e-3 relative). Measured under the interpreter: every error <= 3.2e-3.
BF16_BOUND = 1e-2


def test_bf16_inputs():
    inputs = make_inputs(1, T_ODD, 2, 16, 16, seed=6)
    errors = compare_to_recurrence(inputs, dtype=torch.bfloat16)
    print("bf16 rel-RMS " + " ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    assert worst(errors) <= BF16_BOUND, errors


def test_unsupported_calls_raise():
    x = make_inputs(1, 4, 1, 8, 8)
    with pytest.raises(ValueError, match="packed sequences"):
        fused_recurrent_gla(x["q"], x["k"], x["v"], cu_seqlens=torch.tensor([0, 4], device=DEVICE))
    wide = torch.zeros(1, 4, 1, triton_recurrent.MAX_KEY_DIM + 1, device=DEVICE)
    with pytest.raises(ValueError, match=f"K up to {triton_recurrent.MAX_KEY_DIM}"):
        fused_recurrent_gla(wide, wide, x["v"])
    many = torch.empty(triton_recurrent.MAX_GRID_AXIS + 1, 4, 1, 8, device="meta")  # shapes only
    with pytest.raises(ValueError, match=r"B \* H = 65536 .*split the batch"):
        triton_recurrent.check_recurrent_supported(many, many)


# --- realistic shapes on a GPU ---------------------------------------------------------------------

#: Bounds against the fp64 recurrence on the rounded inputs; not yet run on a GPU when written.
GPU_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", list(GPU_TOLERANCE), ids=["fp32", "bf16"])
def test_gpu_against_recurrence(dtype):
    inputs = make_inputs(2, 1000, 4, 64, 64)
    inputs["gv"] = torch.where(torch.arange(64, device=DEVICE) < 8, -8.0, inputs["gv"])  # some closed columns
    errors = compare_to_recurrence(inputs, dtype=dtype)
    print(f"\n{dtype} T=1000 D=64 rel-RMS " + " ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    assert worst(errors) <= GPU_TOLERANCE[dtype], errors
