"""The fused ReGLA op with the output norm and the swish output gate in its epilogue
(kernels.blocks.norm_epilogue) against the composed path (the op, then the layer's RMSNorm and the
gate as separate torch passes) and against the fp64 reference (torch safe-exp features, refining
gate, recurrence, norm, gate): the output and every gradient, the norm weight's and the gate
input's included, in both eps frames, with and without the gate, over odd lengths, gates near 0
and 1, outputs far below 1 (safe-exp's shifted frame under a closed gate), and packed sequences.
At the layer level a model with the epilogue on equals the same model with it off.

Without CUDA the kernels run under Triton's interpreter (tests/conftest.py) on tiny shapes; the
`gpu` tests take realistic shapes in fp32 and bf16.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from torch.func import functional_call  # noqa: E402

from harness.config import AttentionConfig, ConfigError, ModelConfig  # noqa: E402
from harness.model import LanguageModel  # noqa: E402
from kernels.reference import chunked_gla, recurrent_gla  # noqa: E402
from kernels.safe_exp import key_shifts, packed_key_shifts, query_shift  # noqa: E402
from kernels.triton_regla import triton_regla  # noqa: E402
from variants.feature_maps import SafeExp  # noqa: E402
from variants.norms import RMSNorm  # noqa: E402

from .numerics import rel_rms, worst  # noqa: E402
from .test_triton_regla import BF16_GATE_TOLERANCE, GPU_TOLERANCE, refined_log_gate  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# Every buffer the kernels write starts as NaN, so an element left unwritten fails the check.
pytestmark = pytest.mark.usefixtures("nan_filled_kernel_buffers")
TAU, CLAMP = 1.0, -8.0
# eps of the order of mean(o²) in its frame (the unshifted frame multiplies it by exp(−2 (qs + ks)),
# here ~1e-6): smaller, and neither eps nor its frame would change the result or the gradients.
EPS = {"shifted": 1e-3, "unshifted": 1e3}


def make_inputs(B, T, H, K, *, gate_shift=0.0, affine=True, gated=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x = dict(
        q=randn(B, T, H, K) * 2,
        k=randn(B, T, H, K),
        v=randn(B, T, H, K),
        a=randn(B, T, H, K) * 6 + gate_shift,
        b=randn(B, T, H, K) * 3,
    )
    if affine:
        x["w"] = randn(K) + 1.0
    if gated:
        x["g"] = randn(B, T, H, K) * 2
    return x


def norm_and_gate(o, log_scale, eps, w, g):
    """The layer's composed norm and gate: `variants.norms.RMSNorm` (per head) with the weight w, then silu(g)."""
    norm = RMSNorm(o.shape[-1], o.shape[2], eps=eps, affine=w is not None).to(o.device)
    y = functional_call(norm, {"weight": w} if w is not None else {}, (o, log_scale))
    return y * F.silu(g) if g is not None else y


def reference(x, frame, cu_seqlens=None):
    """fp64 torch: safe-exp features (running key max), refining gate, recurrence, norm, gate; with
    `cu_seqlens`, one call per packed sequence."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        pieces = [
            reference({n: t if n == "w" else t[:, start:end] for n, t in x.items()}, frame)
            for start, end in zip(bounds, bounds[1:])
        ]
        return torch.cat(pieces, dim=1)
    K = x["q"].shape[-1]
    features = SafeExp(K, x["q"].shape[2], key_max="running", variance_factor="off", chunk_size=64)
    query, key = features(x["q"], "q"), features(x["k"], "k")
    log_gate = refined_log_gate(x["a"], x["b"], TAU, CLAMP) + key.log_decay
    attention = recurrent_gla if x["q"].shape[1] <= 256 else chunked_gla
    o, _ = attention(query.features, key.features, x["v"], log_gate, None, scale=K**-0.5)
    log_scale = -(query.shift + key.shift) if frame == "unshifted" else None
    return norm_and_gate(o, log_scale, EPS[frame], x.get("w"), x.get("g"))


def composed(x, frame, cu_seqlens=None):
    """The layer's path without the epilogue: the fused op, then norm and gate as torch passes."""
    q, k = x["q"], x["k"]
    o = triton_regla(
        q, k, x["v"], gate_logits=x["a"], refine_logits=x["b"], scale=q.shape[-1] ** -0.5, cu_seqlens=cu_seqlens
    ).output
    log_scale = None
    if frame == "unshifted":
        if cu_seqlens is None:
            key_shift, _ = key_shifts(k.amax(-1), "running")
        else:
            key_shift, _ = packed_key_shifts(k.amax(-1), "running", 64, None, cu_seqlens.tolist())
        log_scale = -(query_shift(q) + key_shift).unsqueeze(-1)
    return norm_and_gate(o, log_scale, EPS[frame], x.get("w"), x.get("g"))


def fused(x, frame, cu_seqlens=None):
    q = x["q"]
    return triton_regla(
        q,
        x["k"],
        x["v"],
        gate_logits=x["a"],
        refine_logits=x["b"],
        scale=q.shape[-1] ** -0.5,
        cu_seqlens=cu_seqlens,
        norm_eps=EPS[frame],
        norm_weight=x.get("w"),
        eps_unshifted=frame == "unshifted",
        output_gate=x.get("g"),
    ).output


def output_and_grads(fn, inputs, dtype, frame, cu_seqlens=None):
    leaves = {n: t.to(DEVICE, dtype).requires_grad_(True) for n, t in inputs.items()}
    y = fn(leaves, frame, cu_seqlens)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(99)).to(DEVICE, torch.float64)
    grads = torch.autograd.grad((y.double() * dy).sum(), list(leaves.values()))
    return {"y": y, **{f"d{n}": g for n, g in zip(leaves, grads)}}


def errors_against(want, got):
    return {n: rel_rms(got[n], want[n]) for n in want}


@pytest.mark.parametrize(
    "T, gate_shift, frame, gated, affine",
    [
        (37, 8.0, "shifted", True, True),  # gates near 1
        (37, -8.0, "unshifted", False, True),  # gates near 0, on the clamp
        (1, 0.0, "shifted", False, False),
    ],
)
def test_epilogue_equals_the_fp64_reference(T, gate_shift, frame, gated, affine):
    inputs = make_inputs(1, T, 1, 16, gate_shift=gate_shift, gated=gated, affine=affine)
    got = output_and_grads(fused, inputs, torch.float32, frame)
    want = output_and_grads(reference, inputs, torch.float64, frame)
    assert worst(errors_against(want, got)) <= 1e-4, errors_against(want, got)


def test_epilogue_equals_the_composed_path_and_the_fp64_reference():
    inputs = make_inputs(1, 37, 1, 16)
    got = output_and_grads(fused, inputs, torch.float32, "unshifted")
    want = output_and_grads(reference, inputs, torch.float64, "unshifted")
    assert worst(errors_against(want, got)) <= 1e-4, errors_against(want, got)
    separate = output_and_grads(composed, inputs, torch.float32, "unshifted")
    assert worst(errors_against(separate, got)) <= 1e-4, errors_against(separate, got)
    # The gradients that only the epilogue produces are there and not trivially zero.
    assert got["dw"].abs().sum() > 0 and got["dg"].abs().sum() > 0


def test_the_eps_frame_changes_the_result():
    # Guards the test above: with these eps values the frame matters, so both frames are exercised.
    inputs = {n: t.to(DEVICE) for n, t in make_inputs(1, 21, 1, 16).items()}
    y = {frame: fused(inputs, frame) for frame in EPS}
    shifted_with_unshifted_eps = triton_regla(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        gate_logits=inputs["a"],
        refine_logits=inputs["b"],
        scale=0.25,
        norm_eps=EPS["unshifted"],
        norm_weight=inputs["w"],
        output_gate=inputs["g"],
    ).output
    assert rel_rms(shifted_with_unshifted_eps, y["unshifted"]) > 1e-2


def test_packed_sequences_with_the_epilogue():
    # Two sequences packed along time: the chunk-aligned layout's padding rows (φ = 0, shifts +inf)
    # must stay out of the norm; against the fp64 reference called on each sequence.
    inputs = make_inputs(1, 50, 1, 16, seed=3)
    cu_seqlens = torch.tensor([0, 21, 50], device=DEVICE)
    got = output_and_grads(fused, inputs, torch.float32, "unshifted", cu_seqlens)
    want = output_and_grads(reference, inputs, torch.float64, "unshifted", cu_seqlens)
    assert worst(errors_against(want, got)) <= 1e-4, errors_against(want, got)


@pytest.mark.parametrize(
    "factor, frame, eps_follows",
    [
        (1e-20, "unshifted", True),
        (1e-30, "unshifted", True),
        (1e-20, "shifted", True),
        (1e-30, "shifted", True),
        # eps dominates: y ~ o / sqrt(eps), as tiny as o (a cap on eps / max|o|² instead of the
        # scale sqrt(eps) would make it ~100 times too large here)
        (1e-20, "shifted", False),
    ],
)
def test_epilogue_takes_tiny_outputs(factor, frame, eps_follows, monkeypatch):
    """o scaled by `factor` (through v), as in safe-exp's shifted frame under a closed gate, and eps_t
    by factor², so that the norm is that of an ordinary o: in the unshifted frame through q and k
    raised by log(1/factor) / 2 each (safe-exp's features stay the same, qs + ks grows by
    log(1/factor)), in the shifted frame through eps itself. Squared as they are, mean(o²) and eps_t
    underflow fp32. The composed path's shifted-frame norm squares o too: only the unshifted frame
    is also checked against it."""
    shift = -math.log(factor) / 2
    inputs = make_inputs(1, 21, 1, 16)
    inputs.update(q=inputs["q"] + shift, k=inputs["k"] + shift, v=inputs["v"] * factor)
    if frame == "shifted" and eps_follows:
        monkeypatch.setitem(EPS, "shifted", EPS["shifted"] * factor**2)
    got = output_and_grads(fused, inputs, torch.float32, frame)
    assert all(torch.isfinite(t).all() for t in got.values())
    want = output_and_grads(reference, inputs, torch.float64, frame)
    assert worst(errors_against(want, got)) <= 1e-4, errors_against(want, got)
    if frame == "unshifted":
        separate = output_and_grads(composed, inputs, torch.float32, frame)
        assert worst(errors_against(separate, got)) <= 1e-4, errors_against(separate, got)


def test_epilogue_after_a_key_spike_under_a_closed_gate():
    # A key 60 above the rest at t = 0 raises the running key max, the shift of every later row, by
    # 60, and gates on the clamp (e^-8 a step) soon erase it: o's later rows are ~e^-60 and eps_t in
    # the unshifted frame ~e^-120, a mix of ordinary and tiny rows in one sequence.
    inputs = make_inputs(1, 37, 1, 16, gate_shift=-8.0)
    inputs["k"][:, 0] += 60.0
    got = output_and_grads(fused, inputs, torch.float32, "unshifted")
    want = output_and_grads(reference, inputs, torch.float64, "unshifted")
    assert worst(errors_against(want, got)) <= 1e-4, errors_against(want, got)
    separate = output_and_grads(composed, inputs, torch.float32, "unshifted")
    assert worst(errors_against(separate, got)) <= 1e-4, errors_against(separate, got)


def test_bf16_epilogue(bf16_products_as_on_gpu):
    inputs = {n: t.to(torch.bfloat16) for n, t in make_inputs(1, 37, 1, 32).items()}
    got = output_and_grads(fused, inputs, torch.bfloat16, "unshifted")
    want = output_and_grads(reference, inputs, torch.float64, "unshifted")
    errors = errors_against(want, got)
    print("bf16 epilogue under the interpreter, rel-RMS " + " ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    assert worst(errors) <= 5e-2, errors


def test_rejects_bad_epilogue_arguments():
    x = make_inputs(1, 8, 1, 16)
    q, k, v, a, b = x["q"], x["k"], x["v"], x["a"], x["b"]
    with pytest.raises(ValueError, match="give norm_eps too"):
        triton_regla(q, k, v, gate_logits=a, refine_logits=b, output_gate=x["g"])
    with pytest.raises(ValueError, match="norm_eps must be >= 0"):
        triton_regla(q, k, v, gate_logits=a, refine_logits=b, norm_eps=-1.0)
    with pytest.raises(ValueError, match=r"norm_weight must be \[V\] = \(16,\)"):
        triton_regla(q, k, v, gate_logits=a, refine_logits=b, norm_eps=1e-5, norm_weight=x["w"][:8])
    with pytest.raises(ValueError, match=r"output_gate must have v's shape"):
        triton_regla(q, k, v, gate_logits=a, refine_logits=b, norm_eps=1e-5, output_gate=x["g"][..., :8])


def regla_model(output_gate="swish", frame="unshifted", norm="rmsnorm"):
    torch.manual_seed(0)
    attention = AttentionConfig(
        feature_map="safe_exp", gate="refined", norm=norm, output_gate=output_gate, norm_eps_frame=frame
    )
    config = ModelConfig(vocab_size=53, d_model=32, n_layers=1, n_heads=2, mlp_ratio=2.0, attention=attention)
    return LanguageModel(config).to(DEVICE)


def logits_and_grads(model, tokens, epilogue):
    for layer in model.linear_attention_layers():
        layer.fused_epilogue = epilogue
    model.zero_grad()
    logits = model(tokens)[0]
    (logits * torch.linspace(-1, 1, logits.numel(), device=logits.device).view_as(logits)).sum().backward()
    return [logits.detach()] + [p.grad.detach().clone() for p in model.parameters()]


def test_a_model_with_the_epilogue_equals_the_model_without(monkeypatch):
    from harness.layers import LinearAttention

    # Off CUDA the layers take the composed path: the fused op is switched on here, under the interpreter.
    monkeypatch.setattr(LinearAttention, "takes_fused_path", lambda self, q: True)
    model = regla_model()
    for layer in model.linear_attention_layers():
        torch.nn.init.normal_(layer.norm.weight, 1.0, 0.3)
        layer.fused_epilogue = True
    assert all(layer.epilogue_norm() is not None for layer in model.linear_attention_layers())
    tokens = torch.randint(0, 53, (1, 21), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    on, off = logits_and_grads(model, tokens, True), logits_and_grads(model, tokens, False)
    errors = [rel_rms(a, b) for a, b in zip(on, off)]
    assert worst(errors) <= 1e-4, errors


def test_only_norms_that_declare_the_epilogue_get_it():
    model = regla_model(norm="layernorm")
    for layer in model.linear_attention_layers():
        layer.fused_epilogue = True
    assert all(layer.epilogue_norm() is None for layer in model.linear_attention_layers())
    layer = regla_model().linear_attention_layers()[0]
    assert layer.epilogue_norm() is not None  # on by default (see AttentionConfig.fused_epilogue)
    layer.fused_epilogue = False
    assert layer.epilogue_norm() is None


def test_the_epilogue_is_on_by_default_grids_switch_it_off_and_off_enters_the_run_id():
    """The epilogue is where the norm is computed, not what: on (the default) keeps every run id
    as it was before the switch existed; `model.attention.fused_epilogue: false` reaches every
    linear layer and gives the run its own id."""
    from harness.spec import spec_from_dict

    def model(**attention):
        config = ModelConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=2, attention=AttentionConfig(**attention))
        return LanguageModel(config)

    assert all(layer.fused_epilogue for layer in model().linear_attention_layers())
    assert not any(layer.fused_epilogue for layer in model(fused_epilogue=False).linear_attention_layers())
    base = {"data": {"source": "offline-english", "tokenizer": "bpe-4096"}, "model": {"d_model": 32}}
    default = spec_from_dict(base, name="x")
    assert "fused_epilogue" not in json.dumps(default.identity())
    # This spec's id from before the switch existed: the default must keep it.
    assert default.run_id == "60fec8b6479c"
    on = spec_from_dict({**base, "model": {"d_model": 32, "attention": {"fused_epilogue": True}}}, name="x")
    assert on.run_id == default.run_id
    off = spec_from_dict({**base, "model": {"d_model": 32, "attention": {"fused_epilogue": False}}}, name="x")
    assert off.run_id != default.run_id and "fused_epilogue" in json.dumps(off.identity())
    with pytest.raises(ConfigError, match="attention.fused_epilogue must be true or false"):
        AttentionConfig(fused_epilogue="yes")


def check_gpu_errors(errors: dict, dtype: torch.dtype) -> None:
    """The bounds of the op's own GPU tests (tests/test_triton_regla.py): in bf16 the refining gate's
    logit gradients are looser than the rest."""
    for name, error in errors.items():
        loose = dtype == torch.bfloat16 and name in ("da", "db")
        assert error <= (BF16_GATE_TOLERANCE if loose else GPU_TOLERANCE[dtype]), (name, error, errors)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, T, H, K", [(2, 999, 4, 64), (1, 2048, 4, 128)])
@pytest.mark.parametrize("frame, gated, gate_shift", [("unshifted", True, 0.0), ("shifted", False, 8.0)])
def test_epilogue_at_realistic_shapes_on_gpu(B, T, H, K, dtype, frame, gated, gate_shift):
    inputs = {n: t.to(dtype) for n, t in make_inputs(B, T, H, K, gated=gated, gate_shift=gate_shift).items()}
    got = output_and_grads(fused, inputs, dtype, frame)
    want = output_and_grads(reference, inputs, torch.float64, frame)
    errors = errors_against(want, got)
    print(f"\n{dtype} T={T} K={K} {frame} epilogue rel-RMS " + " ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    check_gpu_errors(errors, dtype)
    separate = output_and_grads(composed, inputs, dtype, frame)
    print("composed path rel-RMS " + " ".join(f"{n}={e:.2e}" for n, e in errors_against(want, separate).items()))
    check_gpu_errors(errors_against(separate, got), dtype)


@pytest.mark.gpu
@requires_cuda
def test_a_model_with_the_epilogue_equals_the_model_without_on_gpu():
    model = regla_model()
    tokens = torch.randint(0, 53, (2, 300), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert model.linear_attention_layers()[0].takes_fused_path(torch.zeros(1, 2, 1, 1, device=DEVICE))
    on, off = logits_and_grads(model, tokens, True), logits_and_grads(model, tokens, False)
    errors = [rel_rms(a, b) for a, b in zip(on, off)]
    assert worst(errors) <= 1e-4, errors


@pytest.mark.gpu
@requires_cuda
def test_a_model_with_the_epilogue_under_bf16_autocast_on_gpu():
    # As training runs on one GPU: bf16 projections, an fp32 norm weight. The composed path rounds
    # o to bf16 before the norm, the epilogue does not, so the two differ by bf16 rounding; the
    # bounds are the op's bf16 ones (the refining gate's gradients are the loose ones).
    model = regla_model()
    tokens = torch.randint(0, 53, (2, 300), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        on, off = logits_and_grads(model, tokens, True), logits_and_grads(model, tokens, False)
    errors = [rel_rms(a, b) for a, b in zip(on, off)]
    print("\nbf16 autocast, epilogue on against off, rel-RMS of logits then every gradient:", errors)
    assert errors[0] <= GPU_TOLERANCE[torch.bfloat16], errors
    assert worst(errors) <= BF16_GATE_TOLERANCE, errors
