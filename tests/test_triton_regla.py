"""The fused ReGLA op (kernels.triton_regla) against the composed path in fp64: the torch
safe-exp feature map (variants.feature_maps.SafeExp), the refining gate's formula and the fp64
recurrence. Output, final state, and the gradients of q, k, v, both gate logits (or the log
gate), the initial state and the initial key max.

Without CUDA the kernels run under Triton's interpreter (tests/conftest.py) on tiny shapes; the
`gpu` tests cover T up to 4096 and head dims 64 and 128 in fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels.reference import chunked_gla, recurrent_gla  # noqa: E402
from kernels.safe_exp import KEY_MAX_SCOPES, key_shifts, running_key_shifts_backward  # noqa: E402
from kernels.triton_regla import triton_regla  # noqa: E402
from variants.feature_maps import SafeExp  # noqa: E402

from .numerics import layer_outputs, rel_rms, worst  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# Every buffer the kernels write starts as NaN, so an element left unwritten fails the check.
pytestmark = pytest.mark.usefixtures("nan_filled_kernel_buffers")


def refined_log_gate(a, b, tau, log_clamp):
    """The refining gate's log decay, as `variants.gates.RefinedGate` computes it."""
    g, r = torch.sigmoid(a), torch.sigmoid(b)
    log_f = F.logsigmoid(a) + torch.log((g + 2 * r * (1 - g)).clamp_min(torch.finfo(a.dtype).tiny))
    log_f = log_f.clamp_max(0.0) / tau
    return log_f if log_clamp is None else log_f.clamp_min(log_clamp)


def composed(q, k, v, gate, *, key_max, tau, log_clamp, scale, h0=None, m0=None, log_scale=False):
    """The layer's composed path: SafeExp features, the gate's log decay plus the key-max decay,
    then the recurrence; with `log_scale`, also −(query shift + key shift) [B, T, H] as the layer
    forms it for its norm's eps frame."""
    feature_map = SafeExp(q.shape[-1], q.shape[2], key_max=key_max, variance_factor="off", chunk_size=64)
    query, key = feature_map(q, "q"), feature_map(k, "k", m0)
    log_gate = refined_log_gate(*gate, tau, log_clamp) if len(gate) == 2 else gate[0]
    if key.log_decay is not None:
        log_gate = log_gate + key.log_decay
    # The fp64 chunked form equals the recurrence (tests/test_reference_ops.py); it keeps long GPU cases fast.
    reference = recurrent_gla if q.shape[1] <= 256 else chunked_gla
    o, final = reference(
        query.features, key.features, v, log_gate, None, scale=scale, initial_state=h0, output_final_state=True
    )
    if log_scale:
        return o, final, key.state, -(query.shift + key.shift).reshape(q.shape[:3])
    return o, final, key.state


def fused(q, k, v, gate, *, key_max, tau, log_clamp, scale, h0=None, m0=None, log_scale=False):
    kwargs = dict(gate_logits=gate[0], refine_logits=gate[1]) if len(gate) == 2 else dict(log_gate=gate[0])
    out = triton_regla(
        q,
        k,
        v,
        **kwargs,
        tau=tau,
        log_clamp=log_clamp,
        key_max=key_max,
        scale=scale,
        initial_state=h0,
        initial_key_max=m0,
        output_final_state=True,
        return_log_scale=log_scale,
    )
    if log_scale:
        return out.output, out.final_state, out.key_max, out.log_scale
    return out.output, out.final_state, out.key_max


def make_inputs(
    B, T, H, K, V, *, gate="refined", gate_shift=0.0, gate_spread=3.0, key_spread=1.0, with_state=False, seed=0
):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x = dict(q=randn(B, T, H, K) * 2, k=randn(B, T, H, K) * key_spread, v=randn(B, T, H, V))
    if gate == "refined":
        x["a"] = randn(B, T, H, K) * gate_spread + gate_shift
        x["b"] = randn(B, T, H, K) * gate_spread
    else:
        width = 1 if gate == "scalar" else K
        x["g"] = F.logsigmoid(randn(B, T, H, width) * gate_spread + gate_shift).clamp_min(-8.0)
    if with_state:
        x["h0"] = randn(B, H, K, V)
        x["m0"] = randn(B, H) + 1.0
    return x


def compare(
    B, T, H, K, V, *, dtype, key_max="running", tau=1.0, log_clamp=-8.0, seed=0, log_scale=False, **input_options
):
    # Rounded to the tested dtype first: the fp64 reference must see the same values (a max that
    # moves under rounding would route its gradient to another element).
    inputs = {n: t.to(dtype) for n, t in make_inputs(B, T, H, K, V, seed=seed, **input_options).items()}
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, T, H, V, generator=gen)
    dht = torch.randn(B, H, K, V, generator=gen)
    dm = torch.randn(B, H, generator=gen)
    dl = torch.randn(B, T, H, generator=gen)
    options = dict(key_max=key_max, tau=tau, log_clamp=log_clamp, scale=K**-0.5)
    if log_scale:
        options["log_scale"] = True

    def run(fn, dtype, device):
        leaves = {n: t.to(device, dtype).requires_grad_(True) for n, t in inputs.items()}
        gate = (leaves["a"], leaves["b"]) if "a" in leaves else (leaves["g"],)
        o, final, key_state, *shifts = fn(
            leaves["q"], leaves["k"], leaves["v"], gate, h0=leaves.get("h0"), m0=leaves.get("m0"), **options
        )
        loss = (
            (o.double() * do.to(device).double()).sum()
            + (final.double() * dht.to(device).double()).sum()
            + (key_state.double() * dm.to(device).double()).sum()
        )
        outputs = {"o": o, "final_state": final, "key_max": key_state}
        if shifts:
            loss = loss + (shifts[0].double() * dl.to(device).double()).sum()
            outputs["log_scale"] = shifts[0]
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return {**outputs, **{f"d{n}": g for n, g in zip(leaves, grads)}}

    got = run(fused, dtype, DEVICE)
    want = run(composed, torch.float64, DEVICE)
    return {n: rel_rms(got[n], want[n]) for n in want}


SMALL_LENGTHS = [1, 15, 63, 64, 65]


@pytest.mark.parametrize("T", SMALL_LENGTHS)
def test_refined_gate_running_max(T):
    errors = compare(1, T, 2, 32, 16, dtype=torch.float32)
    assert worst(errors) <= 1e-4, errors


@pytest.mark.parametrize("key_max", KEY_MAX_SCOPES)
def test_every_key_max_scope(key_max):
    # Large key spread: the running max moves often, so the rescaling decay is exercised.
    errors = compare(2, 65, 1, 16, 16, dtype=torch.float32, key_max=key_max, key_spread=3.0)
    assert worst(errors) <= 1e-4, errors


@pytest.mark.parametrize("key_max", KEY_MAX_SCOPES)
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "continued"])
def test_the_returned_log_scale_is_the_shifts_and_carries_their_gradient(key_max, with_state):
    """`return_log_scale`: −(query shift + key shift), as the layer's norm needs it for its eps
    frame, equal to the feature map's own shifts, and every input's gradient through it too."""
    errors = compare(
        2, 65, 1, 16, 16, dtype=torch.float32, key_max=key_max, key_spread=3.0, with_state=with_state, log_scale=True
    )
    assert "log_scale" in errors and worst(errors) <= 1e-4, errors


@pytest.mark.parametrize("with_previous", [False, True], ids=["fresh", "continued"])
@pytest.mark.parametrize("with_decay_grad", [True, False], ids=["decay-grad", "no-decay-grad"])
def test_the_running_key_max_backward_is_autograds_through_key_shifts(with_previous, with_decay_grad):
    """The fused op's written-out backward of the running key max equals torch's autograd through
    `key_shifts`, ties included: maxima on a grid of integers repeat, and cummax routes each
    gradient to the index it picked."""
    gen = torch.Generator().manual_seed(11)
    token_max = torch.randint(-3, 4, (2, 37, 3), generator=gen).double()
    previous = torch.randint(-3, 4, (2, 3), generator=gen).double() if with_previous else None
    d_shift = torch.randn(2, 37, 3, generator=gen, dtype=torch.float64)
    d_log_decay = torch.randn(2, 37, 3, generator=gen, dtype=torch.float64) if with_decay_grad else None
    leaves = [token_max.clone().requires_grad_(True)]
    if with_previous:
        leaves.append(previous.clone().requires_grad_(True))
    shift, log_decay = key_shifts(leaves[0], "running", previous=leaves[1] if with_previous else None)
    outputs, grads = [shift], [d_shift]
    if with_decay_grad:
        outputs.append(log_decay)
        grads.append(d_log_decay)
    want = torch.autograd.grad(outputs, leaves, grads)
    got_token, got_previous = running_key_shifts_backward(token_max, previous, d_shift, d_log_decay)
    assert got_token.is_contiguous()
    torch.testing.assert_close(got_token.double(), want[0], rtol=1e-6, atol=1e-6)
    if with_previous:
        torch.testing.assert_close(got_previous.double(), want[1], rtol=1e-6, atol=1e-6)
    else:
        assert got_previous is None


@pytest.mark.parametrize("gate", ["vector", "scalar"])
def test_given_log_gate(gate):
    errors = compare(1, 40, 2, 16, 16, dtype=torch.float32, gate=gate)
    assert worst(errors) <= 1e-4, errors


@pytest.mark.parametrize(
    "gate_shift, tau, log_clamp", [(8.0, 1.0, -8.0), (-8.0, 1.0, -8.0), (-8.0, 16.0, None), (0.0, 2.0, -0.5)]
)
def test_extreme_gates(gate_shift, tau, log_clamp):
    # Logits far positive (gates near 1), far negative (near 0, on the clamp or past it), and a
    # clamp that bites on most elements.
    errors = compare(
        1, 64, 1, 16, 16, dtype=torch.float32, gate_shift=gate_shift, gate_spread=6.0, tau=tau, log_clamp=log_clamp
    )
    assert worst(errors) <= 1e-4, errors


def test_continues_from_a_state():
    # Decoding-style continuation: initial state and key max; both get gradients.
    errors = compare(1, 33, 2, 16, 24, dtype=torch.float32, with_state=True, key_spread=2.0)
    assert worst(errors) <= 1e-4, errors


def test_ties_in_the_max_share_the_gradient():
    # Every query and key row holds its maximum twice: torch's amax splits the gradient evenly
    # between tied elements, and the fused op must do the same.
    inputs = make_inputs(1, 20, 1, 16, 16, seed=7)
    for name in ("q", "k"):
        x = inputs[name]
        x[..., 1] = x.amax(-1)
        x[..., 5] = x[..., 1]
    leaves = {n: t.to(DEVICE).requires_grad_(True) for n, t in inputs.items()}
    o, _, _ = fused(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        (leaves["a"], leaves["b"]),
        key_max="running",
        tau=1.0,
        log_clamp=-8.0,
        scale=0.25,
    )
    got = torch.autograd.grad(o.sum(), [leaves["q"], leaves["k"]])
    exact = {n: t.to(DEVICE, torch.float64).requires_grad_(True) for n, t in inputs.items()}
    o, _, _ = composed(
        exact["q"],
        exact["k"],
        exact["v"],
        (exact["a"], exact["b"]),
        key_max="running",
        tau=1.0,
        log_clamp=-8.0,
        scale=0.25,
    )
    want = torch.autograd.grad(o.sum(), [exact["q"], exact["k"]])
    assert worst(rel_rms(g, w) for g, w in zip(got, want)) <= 1e-4


def test_bf16_inputs(bf16_products_as_on_gpu):
    # bf16 operands on (emulated) tensor cores, fp32 accumulation; the figures are printed so that
    # they can be read beside the GPU ones.
    errors = compare(1, 65, 2, 32, 32, dtype=torch.bfloat16, key_spread=2.0)
    print("bf16 under the interpreter, rel-RMS " + " ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    assert worst(errors) <= 5e-2, errors


def test_rejects_bad_arguments():
    x = make_inputs(1, 8, 1, 16, 16)
    q, k, v, a, b = x["q"], x["k"], x["v"], x["a"], x["b"]
    with pytest.raises(ValueError, match="either gate_logits and refine_logits"):
        triton_regla(q, k, v, gate_logits=a)
    with pytest.raises(ValueError, match="either gate_logits and refine_logits"):
        triton_regla(q, k, v, gate_logits=a, refine_logits=b, log_gate=a)
    with pytest.raises(ValueError, match=r"refine_logits must have q's shape"):
        triton_regla(q, k, v, gate_logits=a, refine_logits=b[..., :8])
    with pytest.raises(ValueError, match="key_max must be one of sequence, chunk, running"):
        triton_regla(q, k, v, gate_logits=a, refine_logits=b, key_max="global")
    with pytest.raises(ValueError, match="initial_state and initial_key_max go together"):
        triton_regla(q, k, v, gate_logits=a, refine_logits=b, initial_state=torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="tau must be > 0"):
        triton_regla(q, k, v, gate_logits=a, refine_logits=b, tau=0.0)
    with pytest.raises(ValueError, match=r"q must be \[B, T, H, K\]"):
        triton_regla(q[0], k, v, gate_logits=a, refine_logits=b)
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, K, V\] = \(1, 1, 16, 16\)"):
        triton_regla(
            q,
            k,
            v,
            gate_logits=a,
            refine_logits=b,
            initial_state=torch.zeros(1, 1, 16, 8),
            initial_key_max=torch.zeros(1, 1),
        )
    with pytest.raises(ValueError, match=r"initial_key_max must be \[B, H\]"):
        triton_regla(
            q,
            k,
            v,
            gate_logits=a,
            refine_logits=b,
            initial_state=torch.zeros(1, 1, 16, 16),
            initial_key_max=torch.zeros(1),
        )
    with pytest.raises(ValueError, match="must share one dtype"):
        triton_regla(q, k, v.double(), gate_logits=a, refine_logits=b)
    with pytest.raises(ValueError, match="chunk_size"):
        triton_regla(q, k, v, gate_logits=a, refine_logits=b, key_max="chunk", chunk_size=0)


GPU_LENGTHS = [1, 15, 63, 64, 65, 1000, 4096]
#: fp32: 5e-3 for everything. bf16 operands on tensor cores (H200, results/kernels/run5): o, the
#: state and dq, dk, dv land near 2-4e-3; the gate logits' gradients near 3-15e-2, as the log
#: gate's gradient is a difference of nearly equal sums (q ⊙ dq − k ⊙ dk plus the state term),
#: each carrying bf16 product error. The figures are printed and committed.
GPU_TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 5e-2}
GATE_GRADIENTS = ("da", "db", "dg")
BF16_GATE_TOLERANCE = 2.5e-1


def check_gpu_errors(errors: dict, dtype: torch.dtype) -> None:
    for name, error in errors.items():
        bound = BF16_GATE_TOLERANCE if dtype == torch.bfloat16 and name in GATE_GRADIENTS else GPU_TOLERANCE[dtype]
        assert error <= bound, (name, error, errors)


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", list(GPU_TOLERANCE), ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", GPU_LENGTHS)
def test_gpu_fused_regla(T, D, dtype):
    errors = compare(2, T, 2, D, D, dtype=dtype)
    print(f"\nfused regla {dtype} T={T} D={D} rel-RMS " + " ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    check_gpu_errors(errors, dtype)


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", list(GPU_TOLERANCE), ids=["fp32", "bf16"])
@pytest.mark.parametrize("gate_shift", [8.0, -8.0], ids=["near_one", "near_zero"])
def test_gpu_fused_regla_extreme_gates(gate_shift, dtype):
    errors = compare(1, 1000, 2, 128, 128, dtype=dtype, gate_shift=gate_shift, gate_spread=6.0, key_spread=2.0)
    print(
        f"\nfused regla {dtype} T=1000 D=128 gates {gate_shift:+} rel-RMS "
        + " ".join(f"{n}={e:.2e}" for n, e in errors.items())
    )
    check_gpu_errors(errors, dtype)


# --------------------------------------------------------------------------------------------
# The layer: the fused path is the composed one, for every switch it covers.


def make_layer(feature_options, norm="rmsnorm", denominator=False, gate_options=None):
    from harness.config import AttentionConfig
    from harness.layers import LinearAttention

    torch.manual_seed(0)
    # A large denominator eps makes any difference in how the two paths scale it visible.
    config = AttentionConfig(
        feature_map="safe_exp",
        feature_map_options=feature_options,
        norm=norm,
        gate="refined",
        gate_options=gate_options or {},
        denominator=denominator,
        denominator_eps=1e-2,
    )
    return LinearAttention(32, 2, 16, config).to(DEVICE)


@pytest.mark.parametrize(
    "feature_options, norm, denominator, gate_options",
    [
        ({}, "rmsnorm", False, {}),
        ({"key_max": "sequence", "variance_factor": "query"}, "layernorm", False, {"tau": 4.0}),
        ({"key_max": "chunk", "chunk_size": 16}, "none", True, {"log_clamp": None, "rank": 4}),
        ({"variance_factor": "query"}, "none", True, {"input": "x_shift"}),
    ],
    ids=["default", "sequence_query_factor", "chunk_denominator_lowrank", "query_factor_denominator_shifted_input"],
)
def test_layer_fused_path_matches_composed(feature_options, norm, denominator, gate_options, monkeypatch):
    layer = make_layer(feature_options, norm, denominator, gate_options)
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fused_results = layer_outputs(layer, x, True, monkeypatch)
    composed_results = layer_outputs(layer, x, False, monkeypatch)
    errors = [rel_rms(a, b) for a, b in zip(fused_results, composed_results)]
    assert worst(errors) <= 1e-4, errors


def test_layer_decodes_after_a_fused_prefill(monkeypatch):
    # Prefill through the fused op, then single-token steps through the composed recurrence: the
    # state (memory, key max) handed over must continue the sequence exactly.
    layer = make_layer({"key_max": "running"})
    x = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    monkeypatch.setattr(type(layer), "takes_fused_path", lambda self, q: q.shape[1] > 1)
    with torch.no_grad():
        full, _ = layer(x)
        y, state = layer(x[:, :20], use_cache=True)
        steps = [y]
        for t in range(20, 24):
            y, state = layer(x[:, t : t + 1], state, use_cache=True)
            steps.append(y)
    assert rel_rms(torch.cat(steps, dim=1), full) <= 1e-5


def test_layer_takes_fused_path_only_where_it_applies():
    layer = make_layer({})
    q = torch.zeros(1, 8, 2, 16)
    assert not layer.takes_fused_path(q)  # CPU: the composed torch path
    if HAS_CUDA:
        assert layer.takes_fused_path(q.cuda())
        assert not layer.takes_fused_path(q[:, :1].cuda())  # one decoding step: the recurrence
        layer.capture_gates = True
        assert not layer.takes_fused_path(q.cuda())  # probes read the gate's activations


def test_fused_path_keeps_less_for_the_backward(monkeypatch):
    # What autograd keeps between forward and backward decides training memory; the fused op
    # keeps the raw inputs, [B, T, H] shifts and the cumulative gates, not φ(q), φ(k) and the gate.
    from harness.measure import saved_for_backward_mib

    layer = make_layer({})
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    saved = {}
    for fused_path in (True, False):
        monkeypatch.setattr(type(layer), "takes_fused_path", lambda self, q, fused_path=fused_path: fused_path)
        saved[fused_path] = saved_for_backward_mib(lambda: layer(x))
    assert 0 < saved[True] < 0.8 * saved[False], saved


def test_saved_for_backward_counts_each_storage_once():
    from harness.measure import saved_for_backward_mib

    a = torch.randn(1024, 256, requires_grad=True)
    b = torch.randn(1024, 256, requires_grad=True)
    assert saved_for_backward_mib(lambda: (a * b).sum()) == pytest.approx(2.0)  # a and b, 1 MiB each
    assert saved_for_backward_mib(lambda: (a * a).sum()) == pytest.approx(1.0)  # one storage


def test_benchmark_plots_committed_rows(tmp_path):
    # The benchmark's plotting runs without a GPU (--replot): on the committed H200 rows and the anchors.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "bench_kernels.py"),
            "--out",
            str(tmp_path),
            "--replot",
            str(root / "results/kernels/run5/kernels_timing.parquet"),
            "--anchors",
            str(root / "results/kernels/anchors/h200-fla-sdpa-2026-11-28.json"),
        ],
        check=True,
    )
    assert (tmp_path / "kernels_timing.png").stat().st_size > 10_000
