"""bf16 accuracy of the log gate's gradient against the fp64 references on the same (bf16-rounded)
inputs. The gradient is a within-chunk sum of q ⊙ dq − k ⊙ dk plus a state term, whose parts
cancel; the kernels compute it in a rearranged form with fp32 operands where the cancelling parts
are formed (`kernels.blocks.gate.gate_grad_kernel`, `kernels.blocks.qkv_grad.GATE_GRADIENT_PRODUCTS`).

Without CUDA the bf16 operand path runs under Triton's interpreter with bf16 products emulated as a
tensor core computes them (tests/conftest.py `bf16_products_as_on_gpu`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels.reference import chunked_gla  # noqa: E402
from kernels.triton_gla import triton_gla  # noqa: E402

from .numerics import rel_rms  # noqa: E402
from .test_triton_kernels import compare_to_recurrence  # noqa: E402
from .test_triton_regla import compare  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

#: Measured under the interpreter's bf16 emulation (rel-RMS of the refining gate's logits' gradients
#: da, db): 8.8e-3 / 9.3e-3 and 4.3e-3 / 4.7e-3 for the two cases below; with the earlier form of the
#: gradient (rowsum(S_end ⊙ dS) minus the later rows' k ⊙ dk, bf16 operands in the within-chunk
#: products) 9.8e-2 / 1.07e-1 and 5.4e-2 / 7.7e-2. The bound, about twice the worst now, fails for
#: both cases under the earlier form.
BF16_GATE_BOUND = 2e-2


@pytest.mark.parametrize(
    "gate_spread, gate_shift, seed", [(3.0, 0.0, 0), (6.0, 8.0, 2)], ids=["spread_gates", "gates_near_one"]
)
def test_bf16_refined_gate_gradients(gate_spread, gate_shift, seed, bf16_products_as_on_gpu):
    errors = compare(
        1,
        256,
        1,
        32,
        32,
        dtype=torch.bfloat16,
        key_spread=2.0,
        gate_spread=gate_spread,
        gate_shift=gate_shift,
        seed=seed,
    )
    print("bf16 gate gradients, rel-RMS " + " ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    assert errors["da"] <= BF16_GATE_BOUND and errors["db"] <= BF16_GATE_BOUND, errors


# --- realistic shapes on a GPU ---------------------------------------------------------------------

#: Not measured on an H200 when written: 5e-2 is the bound the other bf16 gradients meet there
#: (tests/test_triton_kernels.py, tests/test_triton_regla.py), where the gate gradients had 2.5e-1.
GPU_BF16_GATE_BOUND = 5e-2


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("T", [1000, 4096])
def test_gpu_bf16_gate_gradients(T):
    plain = compare_to_recurrence(2, T, 2, 128, 128, dtype=torch.bfloat16, gate_spread=6.0)
    regla = compare(2, T, 2, 128, 128, dtype=torch.bfloat16, key_spread=2.0)
    print(f"\nbf16 T={T}: plain dgk={plain['dgk']:.2e}; regla da={regla['da']:.2e} db={regla['db']:.2e}")
    assert max(plain["dgk"], regla["da"], regla["db"]) <= GPU_BF16_GATE_BOUND, (plain, regla)


@pytest.mark.gpu
@requires_cuda
def test_gpu_gate_gradient_against_fla():
    # The goal: the bf16 gate gradient no worse than 2x fla's chunk_gla on the same inputs.
    fla_gla = pytest.importorskip("fla.ops.gla")
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 4096, 4, 128
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, D, generator=gen) * 3.0).clamp_min(-8.0)
    do = torch.randn(B, T, H, D, generator=gen).cuda()
    inputs = [t.to("cuda", torch.bfloat16) for t in (q, k, v, g)]

    def gate_grad(fn, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in inputs]
        o = fn(*leaves)
        return torch.autograd.grad((o.double() * do.double()).sum(), leaves[3])[0]

    scale = D**-0.5
    want = gate_grad(lambda q, k, v, g: chunked_gla(q, k, v, g, scale=scale)[0], torch.float64)
    ours = rel_rms(gate_grad(lambda q, k, v, g: triton_gla(q, k, v, g, scale=scale)[0], torch.bfloat16), want)
    fla = rel_rms(
        gate_grad(lambda q, k, v, g: fla_gla.chunk_gla(q=q, k=k, v=v, g=g, scale=scale)[0], torch.bfloat16), want
    )
    print(f"\nbf16 dg rel-RMS against fp64: ours {ours:.2e}, fla {fla:.2e}")
    assert ours <= 2 * fla, (ours, fla)
