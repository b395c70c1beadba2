"""The variant kernels that benchmarks/intra_scores_variants.py, chunk_state_variants.py,
query_key_grad_variants.py and query_key_grad_profile.py time compute what the op's kernels
compute (so their timings compare like with like), under Triton's interpreter on CPU (on a GPU,
with the GPU's operands, the scripts check it themselves)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from kernels.blocks.chunk_state import chunk_states  # noqa: E402
from kernels.blocks.common import CHUNK, SUB_CHUNK, dims_of  # noqa: E402
from kernels.blocks.gate import gate_cumsum  # noqa: E402
from kernels.blocks.output import intra_scores  # noqa: E402

from .benchmark_modules import load_benchmark  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's check; on a GPU the scripts check")


@pytest.fixture(scope="module")
def score_variants():
    return load_benchmark("intra_scores_variants")


@pytest.fixture(scope="module")
def state_variants():
    return load_benchmark("chunk_state_variants")


def inputs(T, H, D, gate_min, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, T, H, D, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(1, T, H, D, generator=gen) * 2).clamp_min(gate_min)
    dims = dims_of(q, v)
    return q, k, v, gate_cumsum(g, dims), dims


@pytest.mark.parametrize("gate_min", [-5.0, -100.0])
def test_every_full_score_variant_computes_the_ops_scores(score_variants, gate_min):
    q, k, _, gc, dims = inputs(T=80, H=1, D=32, gate_min=gate_min)
    expected = intra_scores(q, k, gc, dims)
    full = {name: flags for name, flags in score_variants.VARIANTS.items() if name.startswith("full")}
    assert len(full) >= 4
    for name, flags in full.items():
        scores = torch.full_like(expected, float("nan"))  # every element must be written
        score_variants.scores_variant[(dims.NT * (CHUNK // SUB_CHUNK), 1)](
            q, k, gc, scores, 80, gc.shape[1], 1, 32, C=CHUNK, S=SUB_CHUNK, BK=32, BD=16, DOT=tl.float32, **flags
        )
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("transposed", [False, True])
def test_chunk_state_variants_compute_the_ops_states(state_variants, transposed):
    _, k, v, gc, dims = inputs(T=150, H=2, D=32, gate_min=-8.0)
    expected = chunk_states(k, v, gc, None, False, dims)[0]
    states = torch.full_like(expected, float("nan"))
    state_variants.states_variant[(1, 1, 2)](
        k, v, gc, states, 150, gc.shape[1], 2, 32, 32, dims.NT, C=CHUNK, BK=32, BV=32, DOT=tl.float32,
        TRANSPOSED=transposed,
    )  # fmt: skip
    torch.testing.assert_close(states, expected, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def grad_variants():
    return load_benchmark("query_key_grad_variants")


def test_every_query_key_grad_variant_computes_the_ops_gradients(grad_variants):
    from kernels.blocks.qkv_grad import GATE_GRADIENT_PRODUCTS, intra_score_grads, query_key_grads

    q, k, v, gc, dims = inputs(T=80, H=1, D=32, gate_min=-100.0)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(v.shape, generator=gen)
    dA = intra_score_grads(do, v, 0.5, dims)
    dq_inter, dk_inter = (torch.randn(q.shape, generator=gen) for _ in range(2))
    expected = query_key_grads(q, k, gc, dA, dq_inter.clone(), dk_inter.clone(), dims)[:3]  # both overwritten
    for name, flags in grad_variants.VARIANTS.items():
        outputs = [torch.full_like(x, float("nan")) for x in expected]  # every element must be written
        tensors = (q, k, gc, dA, dq_inter, dk_inter.clone(), *outputs)
        grad_variants.launch_variant(flags, tensors, dims, 32, 1, 1, GATE_GRADIENT_PRODUCTS or dims.dot)
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("safe_exp", [False, True])
def test_the_profiled_forms_that_claim_the_ops_values_compute_them(safe_exp):
    """benchmarks/query_key_grad_profile.py: its full form and the diagonal loop's forms give the
    op's dq, dk and gate term (rows past T, a gate near 0 and features formed on load included)."""
    from kernels.blocks.common import SafeExpShifts
    from kernels.blocks.qkv_grad import intra_score_grads, query_key_grads

    profile = load_benchmark("query_key_grad_profile")
    q, k, v, gc, dims = inputs(T=45, H=1, D=32, gate_min=-100.0)
    shifts = SafeExpShifts(q.amax(-1), k.amax(-1)) if safe_exp else None
    gen = torch.Generator().manual_seed(2)
    dA = intra_score_grads(torch.randn(v.shape, generator=gen), v, 0.5, dims)
    dq_inter, dk_inter = (torch.randn(q.shape, generator=gen) for _ in range(2))
    expected = query_key_grads(q, k, gc, dA, dq_inter.clone(), dk_inter.clone(), dims, shifts)[:3]
    forms = {"full": profile.FULL, **profile.LOOP_FORMS}
    assert len(forms) == 5
    for name, form in forms.items():
        outputs = [torch.full_like(x, float("nan")) for x in expected]  # every element must be written
        rowsums = [torch.empty(1, 1, 45, 1) for _ in range(2)] if safe_exp else outputs[2:] * 2
        profile.launch(form, (q, k, gc, dA, dq_inter, dk_inter.clone(), *outputs, rowsums), shifts, 32, 1, 2)
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


def test_variant_inputs_are_the_anchor_benchmarks_draws():
    variant_timing = load_benchmark("variant_timing")
    (q, k), g = variant_timing.gla_inputs(2, 5, 3, 4, 2, device="cpu")
    assert q.shape == k.shape == g.shape == (2, 5, 3, 4)
    assert q.dtype == torch.bfloat16 and g.dtype == torch.float32
    assert (g <= 0).all() and (g >= -5).all()
    (q_again, _), _ = variant_timing.gla_inputs(2, 5, 3, 4, 2, device="cpu")
    assert torch.equal(q, q_again)  # seeded: every script times the same inputs
