"""Packed variable-length sequences (`cu_seqlens`): the packed call equals the per-sequence calls
concatenated, for the torch references, the Triton GLA op, the refined-gate op and the fused ReGLA
op: outputs, final states and every gradient, against the fp64 references run per sequence.

Without CUDA the kernels run under Triton's interpreter (tests/conftest.py) on tiny shapes; the
`gpu` tests repeat the checks at realistic shapes. Lengths are odd and cross the kernels' 64-row
chunks (1, 7, 70) so that a sequence starts mid-chunk in the packed input, one is shorter than a
chunk and one spans two; the `chunk` key-max scope uses chunks of 16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import kernels.blocks  # noqa: E402
from kernels.reference import chunked_gla, recurrent_gla  # noqa: E402
from kernels.triton_gla import triton_gla  # noqa: E402
from kernels.triton_gla_refined import triton_gla_refined_gate  # noqa: E402
from kernels.triton_regla import triton_regla  # noqa: E402
from variants.feature_maps import SafeExp  # noqa: E402

from .numerics import rel_rms, worst  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# Every buffer the kernels write starts as NaN, so an element left unwritten fails the check.
pytestmark = pytest.mark.usefixtures("nan_filled_kernel_buffers")
LENGTHS = (1, 7, 70)


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def refined_log_gate(a, b, tau, log_clamp):
    """The refining gate's log decay, as `variants.gates.RefinedGate` computes it."""
    g, r = torch.sigmoid(a), torch.sigmoid(b)
    log_f = F.logsigmoid(a) + torch.log((g + 2 * r * (1 - g)).clamp_min(torch.finfo(a.dtype).tiny))
    log_f = log_f.clamp_max(0.0) / tau
    return log_f if log_clamp is None else log_f.clamp_min(log_clamp)


def make_inputs(lengths, H, K, V, *, gate, gate_shift=0.0, gate_spread=3.0, states=True, seed=0):
    """Packed inputs [1, T, ·]; gates spread wide (spread 3, or 6 with a shift) reach near 0 and near 1."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    T, N = sum(lengths), len(lengths)
    x = dict(q=randn(1, T, H, K), k=randn(1, T, H, K) * 2, v=randn(1, T, H, V))
    if gate == "refined":
        x["a"] = randn(1, T, H, K) * gate_spread + gate_shift
        x["b"] = randn(1, T, H, K) * gate_spread
    else:
        width = 1 if gate == "scalar" else K
        x["g"] = F.logsigmoid(randn(1, T, H, width) * gate_spread + gate_shift).clamp_min(-8.0)
    if states:
        x["h0"] = randn(N, H, K, V)
        if gate == "refined":
            x["m0"] = randn(N, H) + 1.0
    return x


def packed_vs_per_sequence(packed_fn, sequence_fn, inputs, lengths, *, dtype):
    """rel-RMS of `packed_fn` (one call, cu_seqlens, in `dtype`) against `sequence_fn` (fp64, one call
    per sequence, concatenated): outputs, final states and the gradients of a random linear loss."""
    gen = torch.Generator().manual_seed(1)
    N = len(lengths)
    T, H, V = sum(lengths), inputs["v"].shape[2], inputs["v"].shape[3]
    do = torch.randn(1, T, H, V, generator=gen).to(DEVICE)
    dht = torch.randn(N, H, inputs["q"].shape[-1], V, generator=gen).to(DEVICE)
    dm = torch.randn(N, H, generator=gen).to(DEVICE)
    dl = torch.randn(1, T, H, generator=gen).to(DEVICE)
    bounds = offsets(lengths).tolist()

    def loss_and_grads(outputs, leaves):
        o, final, *rest = outputs
        key_max = rest[0] if rest else None
        log_scale = rest[1] if len(rest) > 1 else None  # the fused op's, with return_log_scale
        loss = (o.double() * do.double()).sum()
        if final is not None:
            loss = loss + (final.double() * dht.double()).sum()
        if key_max is not None:
            loss = loss + (key_max.double() * dm.double()).sum()
        if log_scale is not None:
            loss = loss + (log_scale.double() * dl.double()).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        named = {"o": o, **{f"d{n}": g for n, g in zip(leaves, grads)}}
        if final is not None:
            named["final_state"] = final
        if key_max is not None:
            named["key_max"] = key_max
        if log_scale is not None:
            named["log_scale"] = log_scale
        return named

    leaves = {n: t.to(DEVICE, dtype).requires_grad_(True) for n, t in inputs.items()}
    got = loss_and_grads(packed_fn(leaves, offsets(lengths)), leaves)
    # Rounded to the tested dtype first: the fp64 reference must see the same values.
    exact = {n: t.to(dtype).to(DEVICE, torch.float64).requires_grad_(True) for n, t in inputs.items()}
    pieces = []
    for n, (start, end) in enumerate(zip(bounds, bounds[1:])):
        one = {name: (t[n : n + 1] if name in ("h0", "m0") else t[:, start:end]) for name, t in exact.items()}
        pieces.append(sequence_fn(one))
    # Per-token outputs (o, and the log scale) join along time, per-sequence ones along the batch.
    joined = [
        torch.cat([p[i] for p in pieces], dim=1 if i in (0, 3) else 0) if pieces[0][i] is not None else None
        for i in range(len(pieces[0]))
    ]
    want = loss_and_grads(joined, exact)
    return {n: rel_rms(got[n], want[n]) for n in want}


# --- torch references ---------------------------------------------------------------------------


def test_reference_restarts_the_state_at_each_boundary():
    # An independent form of the reset: one recurrence over the whole packed row with a log gate of
    # -inf at each sequence's first token (exp(-inf) = 0 clears the state exactly).
    lengths = (3, 1, 5)
    x = {n: t.double() for n, t in make_inputs(lengths, 2, 4, 3, gate="vector", states=False).items()}
    cut = x["g"].clone()
    cut[:, offsets(lengths).tolist()[:-1]] = float("-inf")
    want, _ = recurrent_gla(x["q"], x["k"], x["v"], cut, scale=0.5)
    for fn in (recurrent_gla, chunked_gla):
        got, final = fn(
            x["q"], x["k"], x["v"], x["g"], scale=0.5, cu_seqlens=offsets(lengths).cpu(), output_final_state=True
        )
        assert rel_rms(got, want) <= 1e-12
        assert final.shape == (3, 2, 4, 3)


@pytest.mark.parametrize(
    "cu_seqlens, batch, match",
    [
        ([1, 4, 9], 1, "start at 0"),
        ([0, 5, 4, 9], 1, "strictly increasing"),
        ([0, 4, 4, 9], 1, "strictly increasing"),
        ([0, 4, 8], 1, "must end at the packed length T = 9"),
        ([0, 4, 9], 2, "batch size must be 1"),
    ],
)
def test_malformed_cu_seqlens_are_refused(cu_seqlens, batch, match):
    q = torch.randn(batch, 9, 1, 4)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    for fn in (recurrent_gla, triton_gla):
        with pytest.raises(ValueError, match=match):
            fn(q, q, q, q.clamp_max(0), cu_seqlens=cu)
    with pytest.raises(ValueError, match=match):
        triton_regla(q, q, q, log_gate=q.clamp_max(0), cu_seqlens=cu)


def test_malformed_states_and_offsets_dtype_are_refused():
    q = torch.randn(1, 9, 1, 4)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="int32 or int64"):
        triton_gla(q, q, q, q.clamp_max(0), cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="one per sequence"):
        triton_gla(q, q, q, q.clamp_max(0), initial_state=torch.zeros(1, 1, 4, 4), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"initial_state must be \[N, H, K, V\]"):
        triton_regla(
            q,
            q,
            q,
            log_gate=q.clamp_max(0),
            initial_state=torch.zeros(1, 1, 4, 4),
            initial_key_max=torch.zeros(1, 1),
            cu_seqlens=cu,
        )
    with pytest.raises(ValueError, match="one per packed sequence"):
        kernels.gated_linear_attention(q, q, q, q.clamp_max(0), initial_state=torch.zeros(1, 1, 4, 4), cu_seqlens=cu)


# --- Triton ops under the interpreter (CUDA when present) ----------------------------------------


def gla_packed(x, cu):
    return triton_gla(
        x["q"],
        x["k"],
        x["v"],
        x["g"],
        scale=0.25,
        initial_state=x.get("h0"),
        output_final_state="h0" in x,
        cu_seqlens=cu,
    )


def reference_for(x):
    """The fp64 judge for one sequence: the recurrence, or for long ones its chunked form (equal to it,
    tests/test_reference_ops.py), which keeps the GPU cases fast."""
    return recurrent_gla if x["q"].shape[1] <= 256 else chunked_gla


def gla_sequence(x):
    return reference_for(x)(
        x["q"], x["k"], x["v"], x["g"], scale=0.25, initial_state=x.get("h0"), output_final_state="h0" in x
    )


@pytest.mark.parametrize(
    "gate, gate_shift, states, lengths",
    [("vector", 4.0, False, LENGTHS), ("scalar", -4.0, True, (64, 1, 70))],
    ids=["vector_near_one_no_state", "scalar_near_zero_with_states_whole_chunk"],
)
def test_triton_gla_packed(gate, gate_shift, states, lengths):
    # Spread 6 around the shift: gates near 1 and near 0 (on the clamp) in both cases. A vector gate
    # with states is test_refined_gate_packed's case (the refined gate is a per-feature log gate);
    # a sequence of exactly one chunk (64) needs no added rows.
    inputs = make_inputs(lengths, 1, 16, 16, gate=gate, gate_shift=gate_shift, gate_spread=6.0, states=states)
    errors = packed_vs_per_sequence(gla_packed, gla_sequence, inputs, lengths, dtype=torch.float32)
    assert worst(errors) <= 1e-4, errors


def test_through_dispatch():
    x = make_inputs(LENGTHS, 1, 16, 8, gate="vector")
    cu = offsets(LENGTHS)
    got, final = kernels.gated_linear_attention(
        x["q"], x["k"], x["v"], x["g"], initial_state=x["h0"], output_final_state=True, impl="triton", cu_seqlens=cu
    )
    want, want_final = kernels.gated_linear_attention(
        x["q"], x["k"], x["v"], x["g"], initial_state=x["h0"], output_final_state=True, impl="chunked", cu_seqlens=cu
    )
    assert rel_rms(got, want) <= 1e-4 and rel_rms(final, want_final) <= 1e-4


def refined_pair(tau, clamp):
    """The refined-gate op on packed input, and the recurrence with the gate's torch formula on one sequence."""

    def packed(x, cu):
        return triton_gla_refined_gate(
            x["q"],
            x["k"],
            x["v"],
            x["a"],
            x["b"],
            tau=tau,
            log_clamp=clamp,
            scale=0.25,
            initial_state=x["h0"],
            output_final_state=True,
            cu_seqlens=cu,
        )

    def sequence(x):
        return reference_for(x)(
            x["q"],
            x["k"],
            x["v"],
            refined_log_gate(x["a"], x["b"], tau, clamp),
            scale=0.25,
            initial_state=x["h0"],
            output_final_state=True,
        )

    return packed, sequence


def test_refined_gate_packed():
    inputs = make_inputs(LENGTHS, 1, 16, 16, gate="refined", gate_spread=6.0)
    inputs.pop("m0")
    errors = packed_vs_per_sequence(*refined_pair(2.0, -8.0), inputs, LENGTHS, dtype=torch.float32)
    assert worst(errors) <= 1e-4, errors


def regla_pair(key_max, chunk_size, states, log_scale=False):
    """The fused op on packed input, and the layer's composed path (SafeExp, refining gate, recurrence)
    on one sequence, both continuing from a state when `states`; with `log_scale`, both also give
    −(query shift + key shift) per token (the op's `return_log_scale`)."""
    options = dict(tau=1.0, log_clamp=-8.0, scale=0.25)

    def packed(x, cu):
        return triton_regla(
            x["q"],
            x["k"],
            x["v"],
            gate_logits=x["a"],
            refine_logits=x["b"],
            key_max=key_max,
            chunk_size=chunk_size,
            initial_state=x.get("h0"),
            initial_key_max=x.get("m0"),
            output_final_state=True,
            cu_seqlens=cu,
            return_log_scale=log_scale,
            **options,
        )

    def sequence(x):
        feature_map = SafeExp(
            x["q"].shape[-1], x["q"].shape[2], key_max=key_max, variance_factor="off", chunk_size=chunk_size
        )
        query, key = feature_map(x["q"], "q"), feature_map(x["k"], "k", x.get("m0"))
        log_gate = refined_log_gate(x["a"], x["b"], options["tau"], options["log_clamp"])
        if key.log_decay is not None:
            log_gate = log_gate + key.log_decay
        o, final = recurrent_gla(
            query.features,
            key.features,
            x["v"],
            log_gate,
            scale=options["scale"],
            initial_state=x.get("h0"),
            output_final_state=True,
        )
        if log_scale:
            return o, final, key.state, -(query.shift + key.shift).reshape(x["q"].shape[:3])
        return o, final, key.state

    return packed, sequence


@pytest.mark.parametrize(
    "key_max, states, lengths",
    [("running", True, (1, 7, 33, 70)), ("chunk", False, (1, 7, 33)), ("sequence", False, (33, 1, 7))],
)
def test_fused_regla_packed(key_max, states, lengths):
    # The key-max scopes, each inside its sequence (`chunk` over chunks of 16, so 33 spans three).
    inputs = make_inputs(lengths, 1, 16, 16, gate="refined", gate_spread=6.0, states=states)
    errors = packed_vs_per_sequence(*regla_pair(key_max, 16, states), inputs, lengths, dtype=torch.float32)
    assert worst(errors) <= 1e-4, errors


@pytest.mark.parametrize("key_max, states", [("running", True), ("chunk", False), ("sequence", False)])
def test_fused_regla_packed_returns_each_sequences_log_scale(key_max, states):
    """`return_log_scale` over packed sequences: each sequence's shifts, and the gradients through them."""
    lengths = (1, 7, 33)
    inputs = make_inputs(lengths, 1, 16, 16, gate="refined", gate_spread=6.0, states=states)
    pair = regla_pair(key_max, 16, states, log_scale=True)
    errors = packed_vs_per_sequence(*pair, inputs, lengths, dtype=torch.float32)
    assert "log_scale" in errors and worst(errors) <= 1e-4, errors


# --- realistic shapes on a GPU --------------------------------------------------------------------

GPU_LENGTHS = (1, 100, 1000, 2047, 64, 63, 900)
#: as tests/test_triton_kernels.py and tests/test_triton_regla.py bound the unpacked ops: fp32 5e-3;
#: bf16 5e-2, the refining gate's logits' gradients 2.5e-1 (a cancelling difference of bf16 products).
GPU_TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 5e-2}
BF16_GATE_TOLERANCE = 2.5e-1


def check_gpu_errors(label: str, errors: dict, dtype: torch.dtype) -> None:
    print(f"\n{label} {dtype} rel-RMS " + " ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    for name, error in errors.items():
        gate_grad = name in ("da", "db", "dg")
        bound = BF16_GATE_TOLERANCE if dtype == torch.bfloat16 and gate_grad else GPU_TOLERANCE[dtype]
        assert error <= bound, (name, error, errors)


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", list(GPU_TOLERANCE), ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_triton_gla_packed(D, dtype):
    inputs = make_inputs(GPU_LENGTHS, 4, D, D, gate="vector", gate_spread=6.0)
    errors = packed_vs_per_sequence(gla_packed, gla_sequence, inputs, GPU_LENGTHS, dtype=dtype)
    check_gpu_errors(f"packed triton_gla D={D}", errors, dtype)


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", list(GPU_TOLERANCE), ids=["fp32", "bf16"])
@pytest.mark.parametrize("key_max", ["running", "chunk", "sequence"])
def test_gpu_fused_regla_packed(key_max, dtype):
    states = key_max == "running"
    inputs = make_inputs(GPU_LENGTHS, 4, 128, 128, gate="refined", gate_spread=6.0, states=states)
    errors = packed_vs_per_sequence(*regla_pair(key_max, 64, states), inputs, GPU_LENGTHS, dtype=dtype)
    check_gpu_errors(f"packed triton_regla key_max={key_max}", errors, dtype)


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", list(GPU_TOLERANCE), ids=["fp32", "bf16"])
def test_gpu_refined_gate_packed(dtype):
    inputs = make_inputs(GPU_LENGTHS, 4, 128, 128, gate="refined", gate_spread=6.0)
    inputs.pop("m0")
    errors = packed_vs_per_sequence(*refined_pair(2.0, -8.0), inputs, GPU_LENGTHS, dtype=dtype)
    check_gpu_errors("packed triton_gla_refined_gate", errors, dtype)
