"""The three torch references of gated linear attention compute one function.

recurrent (the ground truth) ≡ chunked ≡ parallel in fp64, forward and every gradient, at odd
lengths and at extreme gates, for every gate layout the kernels accept; the denominator,
initial and final states, and the input checks of `kernels.gated_linear_attention`.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from kernels import IMPLEMENTATIONS, chunked_gla, gated_linear_attention, parallel_gla, recurrent_gla

DTYPE = torch.float64
B, H, K, V = 2, 2, 5, 3
LENGTHS = (1, 15, 63, 64, 65, 200)
IMPLS = ("recurrent", "chunked", "parallel")


pytestmark = pytest.mark.usefixtures("single_thread")


# Which sides of the state are gated, and with how many channels: [.., K] / [.., V] per channel,
# [.., 1] a per-head scalar.
GATE_LAYOUTS = {
    "key": (K, None),  # GLA, the refining gate
    "value": (None, V),  # the refining gate on its literal (value) axis
    "both": (K, V),  # Fast Decay's outer product
    "scalar_key": (1, None),  # gated RFA's scalar gate
    "scalar_value": (None, 1),
    "none": (None, None),
}


def log_gates(shape: tuple[int, ...], regime: str, generator: torch.Generator) -> torch.Tensor:
    """Log decays <= 0 in one of four regimes."""
    u = torch.rand(shape, generator=generator, dtype=DTYPE)
    if regime == "typical":
        return torch.nn.functional.logsigmoid(2 * torch.randn(shape, generator=generator, dtype=DTYPE) + 1)
    if regime == "near_one":
        return -1e-4 * u  # g in (0.9999, 1]: almost no decay
    if regime == "near_zero":
        return -(30.0 + 20.0 * u)  # g ~ 1e-13 .. 1e-22: the state is all but erased
    if regime == "mixed":
        near_zero = torch.rand(shape, generator=generator, dtype=DTYPE) < 0.2
        return torch.where(near_zero, -(30.0 + 20.0 * u), -1e-4 * u)
    raise AssertionError(regime)


def make_inputs(T: int, layout: str, regime: str, seed: int = 0, positive: bool = False):
    generator = torch.Generator().manual_seed(seed)
    draw = (
        (lambda *s: torch.rand(s, generator=generator, dtype=DTYPE))
        if positive
        else (lambda *s: torch.randn(s, generator=generator, dtype=DTYPE))
    )
    q, k, v = draw(B, T, H, K), draw(B, T, H, K), torch.randn(B, T, H, V, generator=generator, dtype=DTYPE)
    gk_dim, gv_dim = GATE_LAYOUTS[layout]
    gk = log_gates((B, T, H, gk_dim), regime, generator) if gk_dim else None
    gv = log_gates((B, T, H, gv_dim), regime, generator) if gv_dim else None
    h0 = torch.randn(B, H, K, V, generator=generator, dtype=DTYPE)
    return q, k, v, gk, gv, h0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-10, what: str = "") -> None:
    """Max abs error within `rel` of the expected tensor's largest magnitude (fp64 round-off)."""
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    bound = rel * max(expected.abs().max().item(), 1.0)
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert error <= bound, f"{what}: max abs error {error:.3e} > {bound:.3e}"


def outputs_and_grads(fn, inputs, **kwargs):
    """Forward, then gradients of a random projection of (output, final state) w.r.t. every input."""
    leaves = [None if x is None else x.clone().requires_grad_(True) for x in inputs]
    o, final = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, **kwargs)
    generator = torch.Generator().manual_seed(1234)
    loss = (o * torch.randn(o.shape, generator=generator, dtype=DTYPE)).sum() + (
        final * torch.randn(final.shape, generator=generator, dtype=DTYPE)
    ).sum()
    differentiable = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, differentiable)
    it = iter(grads)
    return o.detach(), final.detach(), [None if x is None else next(it) for x in leaves]


GRAD_NAMES = ("q", "k", "v", "gk", "gv", "initial_state")


def assert_same_function(reference, candidate, label: str) -> None:
    o_ref, s_ref, g_ref = reference
    o, s, g = candidate
    assert_close(o, o_ref, what=f"{label}: output")
    assert_close(s, s_ref, what=f"{label}: final state")
    for name, grad, grad_ref in zip(GRAD_NAMES, g, g_ref):
        assert (grad is None) == (grad_ref is None), name
        if grad is not None:
            assert_close(grad, grad_ref, what=f"{label}: d{name}")


@pytest.mark.parametrize("regime", ["typical", "near_one", "near_zero", "mixed"])
@pytest.mark.parametrize("layout", list(GATE_LAYOUTS))
@pytest.mark.parametrize("T", LENGTHS)
def test_recurrent_chunked_parallel_agree(T, layout, regime):
    inputs = make_inputs(T, layout, regime, seed=T)
    scale = K**-0.5
    reference = outputs_and_grads(recurrent_gla, inputs, scale=scale)
    # Chunks of 16 put several chunk boundaries inside every length above 16; the default chunk
    # is what `gated_linear_attention` uses on CPU.
    candidate = outputs_and_grads(chunked_gla, inputs, scale=scale, chunk_size=16)
    assert_same_function(reference, candidate, "chunked (C=16)")
    assert_same_function(reference, outputs_and_grads(chunked_gla, inputs, scale=scale), "chunked (default C)")
    assert_same_function(reference, outputs_and_grads(parallel_gla, inputs, scale=scale), "parallel")


@pytest.mark.parametrize("layout", list(GATE_LAYOUTS))
@pytest.mark.parametrize("T", LENGTHS)
def test_denominator_same_through_every_implementation(T, layout):
    # Positive q, k as a positive feature map gives them: the normaliser stays away from zero.
    inputs = make_inputs(T, layout, "typical", seed=7 + T, positive=True)
    h0 = torch.rand(B, H, K, V + 1, generator=torch.Generator().manual_seed(T), dtype=DTYPE)
    inputs = (*inputs[:5], h0)
    results = {}
    for impl in IMPLS:
        fn = functools.partial(gated_linear_attention, denominator=True, impl=impl)
        results[impl] = outputs_and_grads(fn, inputs, scale=0.3)
    for impl in ("chunked", "parallel"):
        assert_same_function(results["recurrent"], results[impl], f"{impl} with denominator")


def test_recurrent_matches_the_literal_sum():
    """o_t = scale Σ_{s<=t} (q_t ⊙ Π_{r=s+1..t} α_k,r)·k_s · (v_s ⊙ Π α_v,r) plus the decayed h0:
    the recurrence S_t = (α_v,t α_k,tᵀ) ⊙ S_{t-1} + v_t k_tᵀ (Fast Decay) unrolled by hand."""
    T = 9
    q, k, v, gk, gv, h0 = make_inputs(T, "both", "typical", seed=3)
    o, final = recurrent_gla(q, k, v, gk, gv, scale=0.7, initial_state=h0, output_final_state=True)
    ck, cv = gk.cumsum(1), gv.cumsum(1)  # [B, T, H, K], [B, T, H, V]
    expected = torch.zeros(B, T, H, V, dtype=DTYPE)
    for t in range(T):
        decayed_h0 = h0 * ck[:, t].exp().unsqueeze(-1) * cv[:, t].exp().unsqueeze(-2)
        expected[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], decayed_h0)
        for s in range(t + 1):
            wk = (ck[:, t] - ck[:, s]).exp()
            wv = (cv[:, t] - cv[:, s]).exp()
            expected[:, t] += (q[:, t] * wk * k[:, s]).sum(-1, keepdim=True) * v[:, s] * wv
    assert_close(o, 0.7 * expected, rel=1e-12, what="output")
    expected_final = h0 * ck[:, -1].exp().unsqueeze(-1) * cv[:, -1].exp().unsqueeze(-2)
    for s in range(T):
        weight = (ck[:, -1] - ck[:, s]).exp().unsqueeze(-1) * (cv[:, -1] - cv[:, s]).exp().unsqueeze(-2)
        expected_final = expected_final + weight * k[:, s].unsqueeze(-1) * v[:, s].unsqueeze(-2)
    assert_close(final, expected_final, rel=1e-12, what="final state")


def test_denominator_is_gated_rfa():
    """Peng et al. 2021 literally: S_t = g S_{t-1} + (1 − g) v φ(k)ᵀ, c_t = g c_{t-1} + (1 − g) φ(k),
    h_t = S_t φ(q) / (c_tᵀ φ(q)); the op gets log g and keys pre-scaled by 1 − g."""
    T = 11
    generator = torch.Generator().manual_seed(5)
    q, k = (
        torch.rand(B, T, H, K, generator=generator, dtype=DTYPE),
        torch.rand(B, T, H, K, generator=generator, dtype=DTYPE),
    )
    v = torch.randn(B, T, H, V, generator=generator, dtype=DTYPE)
    g = torch.rand(B, T, H, 1, generator=generator, dtype=DTYPE)
    o, _ = gated_linear_attention(
        q, k * (1 - g), v, g.log(), scale=0.5, denominator=True, denominator_eps=0.0, impl="recurrent"
    )
    S, c = torch.zeros(B, H, V, K, dtype=DTYPE), torch.zeros(B, H, K, dtype=DTYPE)
    for t in range(T):
        gt = g[:, t]  # [B, H, 1]
        S = gt.unsqueeze(-1) * S + (1 - gt).unsqueeze(-1) * v[:, t].unsqueeze(-1) * k[:, t].unsqueeze(-2)
        c = gt * c + (1 - gt) * k[:, t]
        h = torch.einsum("bhvk,bhk->bhv", S, q[:, t]) / (c * q[:, t]).sum(-1, keepdim=True)
        assert_close(o[:, t], h, rel=1e-12, what=f"t={t}")


@pytest.mark.parametrize("denominator", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("split", [1, 17, 40])
def test_streaming_with_states_equals_one_pass(split, impl, denominator):
    """Running a prefix, then the rest from the prefix's final state, gives the one-pass result."""
    T = 41
    q, k, v, gk, gv, _ = make_inputs(T, "both", "typical", seed=11, positive=True)
    kwargs = dict(scale=0.4, denominator=denominator, impl=impl)
    full, full_state = gated_linear_attention(q, k, v, gk, gv, output_final_state=True, **kwargs)
    head = [x[:, :split] for x in (q, k, v, gk, gv)]
    tail = [x[:, split:] for x in (q, k, v, gk, gv)]
    o1, state = gated_linear_attention(*head, output_final_state=True, **kwargs)
    o2, final = gated_linear_attention(*tail, initial_state=state, output_final_state=True, **kwargs)
    assert state.shape == (B, H, K, V + denominator)
    assert_close(torch.cat([o1, o2], dim=1), full, what="streamed output")
    assert_close(final, full_state, what="final state")


def test_without_initial_state_and_without_final_state():
    q, k, v, gk, gv, _ = make_inputs(20, "key", "typical", seed=2)
    expected, _ = recurrent_gla(q, k, v, gk, gv, initial_state=torch.zeros(B, H, K, V, dtype=DTYPE))
    for impl in IMPLS:
        o, final = gated_linear_attention(q, k, v, gk, gv, impl=impl)
        assert final is None
        assert_close(o, expected, what=impl)


def test_default_implementation_on_cpu():
    q, k, v, gk, gv, _ = make_inputs(33, "key", "typical")
    expected, _ = recurrent_gla(q, k, v, gk, gv)
    o, _ = gated_linear_attention(q, k, v, gk, gv)  # auto: chunked on CPU, recurrent at T = 1
    assert_close(o, expected, what="auto")
    o1, _ = gated_linear_attention(q[:, :1], k[:, :1], v[:, :1], gk[:, :1])
    assert_close(o1, expected[:, :1], what="auto at T=1")


# -- input checks -----------------------------------------------------------------------------------


def _ok_inputs(T: int = 4):
    return make_inputs(T, "both", "typical")


@pytest.mark.parametrize(
    "broken, expected_message",
    [
        (lambda q, k, v, gk, gv, h0: dict(q=q[0]), "must be [batch, time, heads, dim]"),
        (lambda q, k, v, gk, gv, h0: dict(k=k[..., :-1]), "q and k must have the same shape [B, T, H, K]"),
        (lambda q, k, v, gk, gv, h0: dict(v=v[:, :-1]), "v must be [B, T, H, V] with the same B, T, H as q"),
        (lambda q, k, v, gk, gv, h0: dict(gk=gk[..., :2]), f"gk must be [B, T, H, {K}] or [B, T, H, 1]"),
        (lambda q, k, v, gk, gv, h0: dict(gv=gv[:, :, :1]), f"gv must be [B, T, H, {V}] or [B, T, H, 1]"),
        (
            lambda q, k, v, gk, gv, h0: dict(initial_state=h0[..., :-1]),
            f"initial_state must be [B, H, K, V] = {(B, H, K, V)}",
        ),
        (
            lambda q, k, v, gk, gv, h0: dict(q=q[:, :0], k=k[:, :0], v=v[:, :0], gk=gk[:, :0], gv=gv[:, :0]),
            "sequence length must be at least 1",
        ),
    ],
)
def test_wrong_shapes_say_what_is_expected(broken, expected_message):
    q, k, v, gk, gv, h0 = _ok_inputs()
    args = dict(q=q, k=k, v=v, gk=gk, gv=gv, initial_state=h0)
    args.update(broken(q, k, v, gk, gv, h0))
    with pytest.raises(ValueError) as info:
        gated_linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("gk"), args.pop("gv"), **args)
    assert expected_message in str(info.value)


def test_denominator_state_has_the_extra_column():
    q, k, v, gk, gv, h0 = _ok_inputs()
    with pytest.raises(ValueError, match=re.escape(f"initial_state must be [B, H, K, V] = {(B, H, K, V + 1)}")):
        gated_linear_attention(q, k, v, gk, gv, initial_state=h0, denominator=True)


def test_unknown_implementation_lists_the_available_ones():
    q, k, v, gk, gv, _ = _ok_inputs()
    with pytest.raises(ValueError) as info:
        gated_linear_attention(q, k, v, gk, gv, impl="cuda_magic")
    message = str(info.value)
    assert "unknown attention implementation 'cuda_magic'" in message
    for name in IMPLEMENTATIONS:
        assert name in message
    assert "'auto'" in message


def test_state_decays_to_nothing_under_near_zero_gates():
    """With g ~ e^-40 the output is the last token's own contribution (a sanity anchor for the
    extreme regime: the references agree with each other, and with this)."""
    q, k, v, _, _, h0 = make_inputs(30, "none", "typical", seed=4)
    gk = torch.full((B, 30, H, K), -40.0, dtype=DTYPE)
    o, _ = chunked_gla(q, k, v, gk, None, initial_state=h0)
    last_only = (q * k).sum(-1, keepdim=True) * v
    assert_close(o, last_only, rel=1e-12, what="near-zero gates")


def _closed_gate_inputs(dtype: torch.dtype):
    """Inputs of a closed gate (log decay -6..-8 per step, GLA's clamp at -8 with τ = 1) and
    safe-exp-like features in (0, 1], rounded to `dtype`; an upstream gradient for the output."""
    generator = torch.Generator().manual_seed(11)
    shape = (1, 130, 1, 16)
    gk = (-6.0 - 2.5 * torch.rand(shape, generator=generator)).clamp_min(-8.0)
    q = torch.exp(-torch.rand(shape, generator=generator) * 4)
    k = torch.exp(-torch.rand(shape, generator=generator) * 4)
    v = torch.randn(shape, generator=generator)
    do = torch.randn(shape, generator=generator)
    return [x.to(dtype) for x in (q, k, v, gk)], do


def _log_gate_grad(fn, inputs, do, dtype, autocast=False):
    """The log gate's gradient; with `autocast`, the forward under CPU bf16 autocast (the backward
    outside it, as in training)."""
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        o, _ = fn(*leaves, None, scale=0.25)
    (gk_grad,) = torch.autograd.grad((o.double() * do.double()).sum(), leaves[3])
    return gk_grad


@pytest.mark.parametrize("precision", ["bf16 inputs", "fp32 inputs under bf16 autocast"])
def test_chunked_gate_gradient_of_closed_gates_below_fp32(precision):
    """The chunked form's log-gate gradient cancels each position's own q_t·k_t term, which no gate
    decays; with gates of e^-8 the rest is ~3e-4 of it, below bf16's rounding. It must still match
    the fp64 recurrence (computed in bf16 the error was 2e1 relative; in fp32 it is ~2e-3)."""
    inputs, do = _closed_gate_inputs(torch.bfloat16)
    want = _log_gate_grad(recurrent_gla, inputs, do, torch.float64)
    if precision == "bf16 inputs":
        got = _log_gate_grad(chunked_gla, inputs, do, torch.bfloat16)
        assert got.dtype == torch.bfloat16
    else:
        got = _log_gate_grad(chunked_gla, inputs, do, torch.float32, autocast=True)
    error = ((got.double() - want).norm() / want.norm()).item()
    assert error <= 1e-2, error


def test_chunked_below_fp32_returns_inputs_dtype():
    inputs, _ = _closed_gate_inputs(torch.bfloat16)
    o, state = chunked_gla(*inputs, None, output_final_state=True)
    assert o.dtype == state.dtype == torch.bfloat16
    o32, state32 = chunked_gla(*(x.float() for x in inputs), None, output_final_state=True)
    assert torch.equal(o, o32.to(torch.bfloat16)) and torch.equal(state, state32.to(torch.bfloat16))
