"""Gated linear attention kernels on one CUDA GPU: correctness first, then speed and memory.

Implementations (bf16, key-side gate, the anchor shapes of results/kernels/anchors/bench_anchors.py):
  triton          this repository's Triton kernel (kernels.triton_gla)
  A0_fla          fla's chunk_gla (the anchor)
  A1_regla_fla    ReGLA composed on fla: safe-exp feature maps + refining gate in torch ->
                  chunk_gla -> per-head RMSNorm (as in the anchor script)
  A1_regla_triton the same composition on this repository's kernel
  A1_regla_triton_fused_gate  the same, with the refining gate computed inside the gate-scan
                  kernel (kernels.triton_gla_refined) instead of in torch
  regla_fused     the fused ReGLA op (kernels.triton_regla) on the same math as A1: safe-exp maps
                  (key max over the sequence) and the refining gate inside the kernels, then RMSNorm
  regla_fused_running  the same with the causal running key max (the layers' default)
  A2_sdpa         PyTorch SDPA, flash backend, causal
  A3_chunked      kernels.reference.chunked_gla in torch (small shapes only)

With --epilogue (or when named in --impls), the output norm's epilogue side by side, the layers'
math (running key max, per-head RMSNorm with eps in the unshifted frame, swish output gate g):
  regla_norm_gate_separate  the fused op, then RMSNorm and silu(g) as torch passes
  regla_norm_gate_epilogue  the fused op with norm and gate in its epilogue
  layer_regla               a ReGLA LinearAttention layer (d_model = H·D, bf16), `fused_epilogue` off
  layer_regla_epilogue      the same layer with the epilogue
The layer rows take gradients of the layer input and every parameter, so their memory-floor
columns count the parameters among the inputs and say little; compare their times.

With --value-gate (or when named), a value-side gate gv as well (Fast Decay's), beside `triton`:
  fast_decay_kernels   kernels.triton_gla with gv = logsigmoid(N(4, 1)) (≈ 0.98 a step, Fast
                       Decay's init): the segmented rescaling onto the kernels (kernels.value_gate)
  fast_decay_fallback  the same with gv = logsigmoid(N(0, 1)) clamped at -5 (≈ 0.5 a step): spans
                       above 30 nats in a segment, so the call takes the value gate's fallback, the
                       fused recurrent kernels (kernels.triton_recurrent)
  fast_decay_recurrent kernels.triton_recurrent.fused_recurrent_gla with the first gv
  fast_decay_torch     kernels.reference.chunked_gla with the first gv (small shapes only)
With --gate-grad-operands (or when named), the gate gradient's within-chunk products with bf16
operands (as before they took fp32 ones, kernels.blocks.qkv_grad.GATE_GRADIENT_PRODUCTS = None):
  triton_gate_grad_bf16       `triton` so
  regla_fused_gate_grad_bf16  `regla_fused` so
`--shapes training` is the shape the `gpu` scales train at (B 32, T 512, H 8, D 64); `--shapes
length` times T = 512 ... 32768 at B · T = 32768 (H 16, D 128) and plots time against T
(kernels_time_vs_length.png).

Forward and forward+backward are timed with triton.testing.do_bench (median, p20, p80); peak
memory and the bytes kept for the backward (saved-tensor hooks) are read in separate, untimed
calls. The memory floor of a call is the time its compulsory
traffic takes at the copy bandwidth measured in the same run: forward reads the inputs and writes
the output; forward+backward adds reading the inputs and the output gradient and writing one
gradient per input. `*_floor_fraction` = floor / measured time (1.0 would be bandwidth-bound).
Rows go to Parquet in $OUT (or --out), with a plot.
fla's autotuning takes minutes per shape family on a fresh machine (> 200 s on the smallest anchor
shape, seen twice), so fla runs after everything else and stops when --fla-budget-s is spent; to
measure fla alone give it a call of its own, e.g. --impls A0_fla,A1_regla_fla --skip-correctness.

    python3 benchmarks/bench_kernels.py [--out DIR] [--fla-budget-s 300] [--shapes all|small|training|d64|d128|length]
                                        [--epilogue] [--value-gate]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import matplotlib
import pandas as pd
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

matplotlib.use("Agg")  # headless: plots are written on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from harness.config import AttentionConfig  # noqa: E402
from harness.layers import LinearAttention  # noqa: E402
from harness.measure import peak_memory_mib, saved_for_backward_mib  # noqa: E402
from kernels.blocks import qkv_grad  # noqa: E402
from kernels.blocks.common import LAUNCH_OPTIONS  # noqa: E402
from kernels.reference import chunked_gla, recurrent_gla  # noqa: E402
from kernels.safe_exp import key_shifts, query_shift  # noqa: E402
from kernels.triton_gla import triton_gla  # noqa: E402
from kernels.triton_gla_refined import triton_gla_refined_gate  # noqa: E402
from kernels.triton_recurrent import fused_recurrent_gla  # noqa: E402
from kernels.triton_regla import triton_regla  # noqa: E402
from variants.feature_maps import variance_reduction_factor  # noqa: E402

ANCHOR_SHAPES = [
    (1, 8192, 96, 128),
    (2, 16384, 16, 128),
    (4, 2048, 16, 128),
    (4, 4096, 64, 128),
    (8, 1024, 8, 64),
    (8, 2048, 12, 64),
    (16, 4096, 12, 64),
]
# The shape the grids' `gpu` scales train at (32 × 512 tokens, 8 heads of 64).
TRAINING_SHAPE = (32, 512, 8, 64)
#: Time against sequence length at a fixed number of tokens per call (B · T = 32768, 16 heads of
#: 128): the curve on which linear attention's cost stays flat and softmax's grows with T.
LENGTH_SWEEP_TOKENS = 32768
LENGTH_SWEEP_SHAPES = [(LENGTH_SWEEP_TOKENS // T, T, 16, 128) for T in (512, 1024, 2048, 4096, 8192, 16384, 32768)]
#: Chunk length of the FLOP model below (this repository's kernels and fla's chunk_gla both use 64).
FLOP_CHUNK = 64


def model_flops(name: str, B: int, T: int, H: int, D: int) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of one call by a stated model, for the TFLOP/s columns:
    - linear attention in chunked form, chunk C = 64: per token and head, 4·C·D for the intra-chunk
      scores and their product with V (full C×C blocks, as the kernels compute them) and 4·D² for
      the state read (q·S) and the state update (kᵀv); forward+backward = 3 × forward (the backward
      forms about twice the forward's products). Gates, feature maps and norms count nothing.
    - SDPA, causal: 2·T·D per token and head (half of QKᵀ and PV, 4·T·D each way); forward+backward
      = 3.5 × forward (FlashAttention's convention: backward = 2.5 × forward).
    The same formula for every linear implementation, so their TFLOP/s compare as their times do."""
    if name == "A2_sdpa":
        forward = 2.0 * B * H * T * T * D
        return forward, 3.5 * forward
    forward = B * H * T * (4.0 * FLOP_CHUNK * D + 4.0 * D * D)
    return forward, 3.0 * forward


# The torch chunked reference is many small launches and large temporaries: small shapes only.
A3_MAX_TOKENS_X_HEADS = 8 * 2048 * 12
TORCH_FORMS = ("A3_chunked", "fast_decay_torch")
DTYPE = torch.bfloat16
DEVICE = torch.device("cuda")


def load_fla_chunk_gla():
    try:
        from fla.ops.gla import chunk_gla

        return chunk_gla
    except ImportError as error:
        print(f"fla unavailable: {error!r}", flush=True)
        return None


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


# --------------------------------------------------------------------------------------------
# Implementations: each takes the shared inputs and returns the output tensor.


def paper_feature_maps(q, k):
    """Safe-exp feature maps in torch as in the anchor script: query max per token, key max over
    time and features."""
    phi_q = torch.exp(q.float() - q.float().amax(-1, keepdim=True)).to(q.dtype)
    k32 = k.float()
    return phi_q, torch.exp(k32 - k32.amax(dim=(1, 3), keepdim=True)).to(k.dtype)


def regla_composed(kernel, q, k, v, gate_logit, refine_logit, norm_weight):
    """ReGLA the paper's way on a GLA kernel: safe-exp maps, refined gate (log), per-head RMSNorm."""
    D = q.shape[-1]
    phi_q, phi_k = paper_feature_maps(q, k)
    g, r = torch.sigmoid(gate_logit.float()), torch.sigmoid(refine_logit.float())
    refined = (1 - r) * g * g + r * (1 - (1 - g) ** 2)
    log_gate = torch.log(refined.clamp_min(1e-6)).to(q.dtype)
    scale = variance_reduction_factor(D)
    o = kernel(phi_q, phi_k, v, log_gate, scale)
    return F.rms_norm(o, (D,), norm_weight)


def regla_fused_gate(q, k, v, gate_logit, refine_logit, norm_weight):
    """As `regla_composed` on our kernel, the refining gate inside the kernel (clamp at log 1e-6, as there)."""
    D = q.shape[-1]
    phi_q, phi_k = paper_feature_maps(q, k)
    scale = variance_reduction_factor(D)
    o, _ = triton_gla_refined_gate(
        phi_q, phi_k, v, gate_logit, refine_logit, tau=1.0, log_clamp=math.log(1e-6), scale=scale
    )
    return F.rms_norm(o, (D,), norm_weight)


def regla_fused(q, k, v, gate_logit, refine_logit, norm_weight, key_max="sequence"):
    """The fused op on `regla_composed`'s math: F clamped at 1e-6 (log_clamp = log 1e-6), tau 1."""
    D = q.shape[-1]
    scale = variance_reduction_factor(D)
    o = triton_regla(
        q,
        k,
        v,
        gate_logits=gate_logit,
        refine_logits=refine_logit,
        tau=1.0,
        log_clamp=math.log(1e-6),
        key_max=key_max,
        scale=scale,
    ).output
    return F.rms_norm(o, (D,), norm_weight)


EPILOGUE_IMPLS = ("regla_norm_gate_separate", "regla_norm_gate_epilogue", "layer_regla", "layer_regla_epilogue")
VALUE_GATE_IMPLS = ("fast_decay_kernels", "fast_decay_fallback", "fast_decay_recurrent", "fast_decay_torch")
GATE_GRAD_IMPLS = ("triton_gate_grad_bf16", "regla_fused_gate_grad_bf16")
#: the anchors on fla (its chunk_gla, and ReGLA composed on it): named even where fla is not installed
FLA_IMPLS = ("A0_fla", "A1_regla_fla")
NORM_EPS = 1e-5
LAYER_CONFIG = AttentionConfig(
    feature_map="safe_exp", gate="refined", norm="rmsnorm", output_gate="swish", norm_eps_frame="unshifted"
)


def regla_norm_gate(q, k, v, gate_logit, refine_logit, norm_weight, output_gate, epilogue):
    """The fused op on the layers' math, its output normalised per head (eps in the unshifted frame)
    and gated by silu(g): in the op's epilogue, or as separate torch passes as `variants.norms.RMSNorm`
    and the layer compute them."""
    scale = variance_reduction_factor(q.shape[-1])
    options = dict(gate_logits=gate_logit, refine_logits=refine_logit, key_max="running", scale=scale)
    if epilogue:
        return triton_regla(
            q, k, v, **options, norm_eps=NORM_EPS, norm_weight=norm_weight, eps_unshifted=True, output_gate=output_gate
        ).output
    o = triton_regla(q, k, v, **options).output
    key_shift, _ = key_shifts(k.amax(-1), "running")
    eps = NORM_EPS * torch.exp(-2 * (query_shift(q) + key_shift).float()).unsqueeze(-1)
    x = o.float()
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight).to(o.dtype)
    return normed * F.silu(output_gate)


def add_layer_inputs(x):
    """A ReGLA layer with d_model = H·D for x's shape, its input (q's values as [B, T, H·D]) and its
    parameters, entered into x as `layer`, `lx` and `layer.<name>` (the gradients are taken of them)."""
    B, T, H, D = x["q"].shape
    torch.manual_seed(0)
    layer = LinearAttention(H * D, H, D, LAYER_CONFIG).to(x["q"].device, x["q"].dtype)
    x["layer"] = layer
    x["lx"] = x["q"].detach().reshape(B, T, H * D).clone().requires_grad_(True)
    x.update({f"layer.{name}": p for name, p in layer.named_parameters()})


def layer_call(epilogue):
    """The layer's forward with the epilogue switched on or off; its output viewed as [B, T, H, D]."""
    names = ["lx"] + [f"layer.{name}" for name, _ in LinearAttention(16, 1, 16, LAYER_CONFIG).named_parameters()]

    def call(x):
        layer = x["layer"]
        layer.fused_epilogue = epilogue
        y, _ = layer(x["lx"])
        return y.view_as(x["do"])

    return call, names


@contextlib.contextmanager
def bf16_gate_gradient_products():
    """The gate gradient's within-chunk products with bf16 operands (qkv_grad.GATE_GRADIENT_PRODUCTS
    = None), as before they took fp32 ones: beside `triton` and `regla_fused` in the same process,
    what the fp32 operands cost. The launcher reads the setting at each backward, so it is set
    around the forward and the backward alike (`measure`)."""
    previous = qkv_grad.GATE_GRADIENT_PRODUCTS
    qkv_grad.GATE_GRADIENT_PRODUCTS = None
    try:
        yield
    finally:
        qkv_grad.GATE_GRADIENT_PRODUCTS = previous


def make_implementations(chunk_gla_fla):
    def ours(q, k, v, g, scale):
        return triton_gla(q, k, v, g, None, scale=scale)[0]

    def fla(q, k, v, g, scale):
        return chunk_gla_fla(q=q, k=k, v=v, g=g, scale=scale)[0]

    def sdpa(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)

    def chunked(q, k, v, g, scale):
        return chunked_gla(q, k, v, g, None, scale=scale)[0]

    def gla_call(kernel):
        return (lambda x: kernel(x["q"], x["k"], x["v"], x["g"], x["q"].shape[-1] ** -0.5), ["q", "k", "v", "g"])

    def value_gate_call(kernel, gv):
        return (
            lambda x: kernel(x["q"], x["k"], x["v"], x["g"], x[gv], scale=x["q"].shape[-1] ** -0.5)[0],
            ["q", "k", "v", "g", gv],
        )

    def regla_call(kernel):
        return (
            lambda x: regla_composed(kernel, x["q"], x["k"], x["v"], x["ag"], x["ar"], x["w"]),
            ["q", "k", "v", "ag", "ar", "w"],
        )

    impls = {
        "triton": gla_call(ours),
        "A1_regla_triton": regla_call(ours),
        "A1_regla_triton_fused_gate": (
            lambda x: regla_fused_gate(x["q"], x["k"], x["v"], x["ag"], x["ar"], x["w"]),
            ["q", "k", "v", "ag", "ar", "w"],
        ),
        "regla_fused": (
            lambda x: regla_fused(x["q"], x["k"], x["v"], x["ag"], x["ar"], x["w"]),
            ["q", "k", "v", "ag", "ar", "w"],
        ),
        "regla_fused_running": (
            lambda x: regla_fused(x["q"], x["k"], x["v"], x["ag"], x["ar"], x["w"], key_max="running"),
            ["q", "k", "v", "ag", "ar", "w"],
        ),
        "A2_sdpa": (lambda x: sdpa(x["q"], x["k"], x["v"]), ["q", "k", "v"]),
        "A3_chunked": gla_call(chunked),
        "regla_norm_gate_separate": (
            lambda x: regla_norm_gate(x["q"], x["k"], x["v"], x["ag"], x["ar"], x["w"], x["og"], epilogue=False),
            ["q", "k", "v", "ag", "ar", "w", "og"],
        ),
        "regla_norm_gate_epilogue": (
            lambda x: regla_norm_gate(x["q"], x["k"], x["v"], x["ag"], x["ar"], x["w"], x["og"], epilogue=True),
            ["q", "k", "v", "ag", "ar", "w", "og"],
        ),
        "layer_regla": layer_call(epilogue=False),
        "layer_regla_epilogue": layer_call(epilogue=True),
        "fast_decay_kernels": value_gate_call(triton_gla, "gv_open"),
        "fast_decay_fallback": value_gate_call(triton_gla, "gv_fast"),
        "fast_decay_recurrent": value_gate_call(fused_recurrent_gla, "gv_open"),
        "fast_decay_torch": value_gate_call(chunked_gla, "gv_open"),
    }
    # (call, inputs, setting): timed inside the setting's context (`measure`).
    impls["triton_gate_grad_bf16"] = (*impls["triton"], bf16_gate_gradient_products)
    impls["regla_fused_gate_grad_bf16"] = (*impls["regla_fused"], bf16_gate_gradient_products)
    fla_impls = {}
    if chunk_gla_fla is not None:
        fla_impls = dict(zip(FLA_IMPLS, (gla_call(fla), regla_call(fla))))
    return impls, fla_impls


def make_inputs(B, T, H, D, device, dtype=DTYPE, seed=0):
    """Random inputs as in the anchor script (log gate logsigmoid(N(0,1)) clamped at -5)."""
    torch.manual_seed(seed)
    leaf = lambda t: t.to(dtype).requires_grad_(True)  # noqa: E731
    return dict(
        q=leaf(torch.randn(B, T, H, D, device=device)),
        k=leaf(torch.randn(B, T, H, D, device=device)),
        v=leaf(torch.randn(B, T, H, D, device=device)),
        g=leaf(F.logsigmoid(torch.randn(B, T, H, D, device=device)).clamp_min(-5)),
        ag=leaf(torch.randn(B, T, H, D, device=device)),
        ar=leaf(torch.randn(B, T, H, D, device=device)),
        w=leaf(torch.ones(D, device=device)),
        og=leaf(torch.randn(B, T, H, D, device=device)),
        do=torch.randn(B, T, H, D, device=device, dtype=dtype),
        # Value-side gates (drawn last, so the inputs above are those of earlier runs): Fast Decay's
        # init, and one that decays too fast for the segmented rescaling (kernels.value_gate).
        gv_open=leaf(F.logsigmoid(torch.randn(B, T, H, D, device=device) + 4.0)),
        gv_fast=leaf(F.logsigmoid(torch.randn(B, T, H, D, device=device)).clamp_min(-5)),
    )


# --------------------------------------------------------------------------------------------
# Correctness on the GPU against the fp64 recurrence.


def check_correctness(chunk_gla_fla, device, log):
    rows = []
    B, T, H, D = 2, 1000, 4, 128
    for dtype in (torch.float32, torch.bfloat16):
        x = make_inputs(B, T, H, D, device, dtype=dtype, seed=1)
        names = ["q", "k", "v", "g"]
        exact = {n: x[n].detach().double().requires_grad_(True) for n in names}
        o_ref, _ = recurrent_gla(*(exact[n] for n in names), None, scale=D**-0.5)
        grads_ref = torch.autograd.grad(o_ref, [exact[n] for n in names], x["do"].double())
        candidates = {"triton": lambda *a: triton_gla(*a, None, scale=D**-0.5)[0]}
        if chunk_gla_fla is not None and dtype == torch.bfloat16:
            candidates["A0_fla"] = lambda q, k, v, g: chunk_gla_fla(q=q, k=k, v=v, g=g, scale=D**-0.5)[0]
        for impl, fn in candidates.items():
            o = fn(*(x[n] for n in names))
            grads = torch.autograd.grad(o, [x[n] for n in names], x["do"])
            errors = {"o": rel_rms(o, o_ref), **{f"d{n}": rel_rms(g, r) for n, g, r in zip(names, grads, grads_ref)}}
            rows.append(
                dict(
                    impl=impl,
                    dtype=str(dtype).removeprefix("torch."),
                    B=B,
                    T=T,
                    H=H,
                    D=D,
                    **{f"rel_rms_{n}": e for n, e in errors.items()},
                )
            )
            log(f"correctness {impl:8s} {dtype}: " + " ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    return rows


# --------------------------------------------------------------------------------------------
# Timing and memory.


def measure(name, call, x, shape, meta):
    fn, input_names, *setting = call
    with (setting[0] if setting else contextlib.nullcontext)():
        return measure_in_setting(name, fn, input_names, x, shape, meta)


def measure_in_setting(name, fn, input_names, x, shape, meta):
    inputs = [x[n] for n in input_names]

    def forward():
        with torch.no_grad():
            fn(x)

    def forward_backward():
        torch.autograd.grad(fn(x), inputs, x["do"])

    row = dict(impl=name, B=shape[0], T=shape[1], H=shape[2], D=shape[3], dtype="bfloat16", **meta)
    # Compulsory traffic (see the module docstring); the output is the size of `do`.
    in_bytes = sum(t.numel() * t.element_size() for t in inputs)
    out_bytes = x["do"].numel() * x["do"].element_size()
    bandwidth = meta["copy_TBps"] * 1e12 / 1e3  # bytes per ms
    floor_fwd_ms = (in_bytes + out_bytes) / bandwidth
    floor_fwdbwd_ms = floor_fwd_ms + (2 * in_bytes + out_bytes) / bandwidth
    try:
        fwd = do_bench(forward, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        fb = do_bench(forward_backward, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        row.update(
            fwd_ms=fwd[0],
            fwd_p20=fwd[1],
            fwd_p80=fwd[2],
            fwdbwd_ms=fb[0],
            fwdbwd_p20=fb[1],
            fwdbwd_p80=fb[2],
            fwd_peak_mib=peak_memory_mib(forward, DEVICE),
            fwdbwd_peak_mib=peak_memory_mib(forward_backward, DEVICE),
            fwd_floor_ms=floor_fwd_ms,
            fwdbwd_floor_ms=floor_fwdbwd_ms,
            fwd_floor_fraction=floor_fwd_ms / fwd[0],
            fwdbwd_floor_fraction=floor_fwdbwd_ms / fb[0],
            fwd_GBps=(in_bytes + out_bytes) / (fwd[0] * 1e-3) / 1e9,
            fwd_TFLOPs=model_flops(name, *shape)[0] / (fwd[0] * 1e-3) / 1e12,
            fwdbwd_TFLOPs=model_flops(name, *shape)[1] / (fb[0] * 1e-3) / 1e12,
            saved_for_backward_mib=saved_for_backward_mib(lambda: fn(x)),
        )
    except Exception as error:  # a failing implementation is a result to record, not a crash
        row["error"] = repr(error)[:300]
    torch.cuda.empty_cache()
    return row


def kernel_breakdown(call, x, shape, log, steps=5):
    """GPU time per kernel of `steps` forward passes and of `steps` forward+backward passes, from the
    PyTorch profiler; rows carry `passes` ("fwd" or "fwd+bwd")."""
    fn, input_names = call[:2]
    inputs = [x[n] for n in input_names]
    for _ in range(2):  # compile, autotune and warm up outside the profile
        torch.autograd.grad(fn(x), inputs, x["do"])
    torch.cuda.synchronize()

    def forward():
        with torch.no_grad():
            fn(x)

    def forward_backward():
        torch.autograd.grad(fn(x), inputs, x["do"])

    rows = []
    for passes, step in (("fwd", forward), ("fwd+bwd", forward_backward)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        these = []
        for event in prof.key_averages():
            total_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            if total_us > 0:
                these.append(
                    dict(
                        B=shape[0],
                        T=shape[1],
                        H=shape[2],
                        D=shape[3],
                        passes=passes,
                        kernel=event.key[:120],
                        ms_per_step=total_us / 1e3 / steps,
                        calls_per_step=event.count / steps,
                    )
                )
        these.sort(key=lambda r: -r["ms_per_step"])
        log(f"  {passes}: {sum(r['ms_per_step'] for r in these):.3f} ms/step of kernels")
        for r in these[:14]:
            log(f"  {r['ms_per_step']:8.3f} ms/step  x{r['calls_per_step']:.0f}  {r['kernel'][:90]}")
        rows += these
    return rows


def ceilings(device):
    """Copy bandwidth (read + write) and bf16 matmul rate, measured now, for context."""
    x = torch.empty(2**30, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    copy_ms = do_bench(lambda: y.copy_(x), warmup=25, rep=100)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn_like(a)
    mm_ms = do_bench(lambda: a @ b, warmup=25, rep=100)
    return dict(copy_TBps=4 * x.numel() / (copy_ms * 1e-3) / 1e12, matmul_TFLOPs=2 * 8192**3 / (mm_ms * 1e-3) / 1e12)


def write_results(out: Path, timing_rows, correctness_rows, breakdown_rows=()):
    if breakdown_rows:
        pd.DataFrame(list(breakdown_rows)).to_parquet(out / "kernels_breakdown.parquet", index=False)
    if timing_rows:
        pd.DataFrame(timing_rows).to_parquet(out / "kernels_timing.parquet", index=False)
    if correctness_rows:
        pd.DataFrame(correctness_rows).to_parquet(out / "kernels_correctness.parquet", index=False)


PANELS = [
    ("fwd_ms", "forward, median ms", True),
    ("fwdbwd_ms", "forward + backward, median ms", True),
    ("fwdbwd_peak_mib", "forward + backward, peak MiB", True),
    ("fwdbwd_floor_fraction", "forward + backward, fraction of the memory floor", False),
]


def plot(out: Path, timing_rows, anchor_json: str | None = None):
    """Grouped bars per shape and impl: forward and forward+backward time, peak memory, and the
    fraction of the memory floor reached.

    With `anchor_json`, fla/SDPA rows of the anchor file are drawn too, labelled as such (their
    peak memory is the file's `peak_mib`; they have no floor fraction).
    """

    rows = [r for r in timing_rows if r.get("fwdbwd_ms") == r.get("fwdbwd_ms") and r.get("fwdbwd_ms")]
    if anchor_json:
        for r in json.load(open(anchor_json))["rows"]:
            if "fwd_ms" in r:
                rows.append(dict(r, impl=f"{r['impl']} (anchor file)", fwdbwd_peak_mib=r.get("peak_mib")))
    if not rows:
        return
    shapes = list(dict.fromkeys((r["B"], r["T"], r["H"], r["D"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / len(impls)
    fig, axes = plt.subplots(2, 2, figsize=(16, 10))
    for ax, (column, title, log_scale) in zip(axes.flat, PANELS):
        for j, impl in enumerate(impls):
            values = {(r["B"], r["T"], r["H"], r["D"]): r.get(column) for r in rows if r["impl"] == impl}
            values = {s: v for s, v in values.items() if v is not None and v == v}
            xs = [i + j * width for i, s in enumerate(shapes) if s in values]
            ax.bar(xs, [values[s] for s in shapes if s in values], width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
        ax.set_xticklabels(["x".join(map(str, s)) for s in shapes], rotation=30, fontsize=8)
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("B x T x H x D, bf16")
        ax.set_title(title)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8)
    fig.subplots_adjust(top=0.9, bottom=0.1, hspace=0.45, wspace=0.15)
    fig.savefig(out / "kernels_timing.png", dpi=110)
    plt.close(fig)
    plot_against_length(out, rows)


def length_sweeps(rows) -> dict[tuple[int, int, int], list[dict]]:
    """Rows grouped by (B · T, H, D) where a group holds at least three lengths: the series of a
    time-against-length plot at a fixed number of tokens per call."""
    groups: dict[tuple[int, int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["B"] * r["T"], r["H"], r["D"]), []).append(r)
    return {key: group for key, group in groups.items() if len({r["T"] for r in group}) >= 3}


def plot_against_length(out: Path, rows):
    """Forward+backward time against T at fixed B · T, one line per impl, for each such series
    (`--shapes length`): kernels_time_vs_length.png."""
    sweeps = length_sweeps(rows)
    if not sweeps:
        return
    fig, axes = plt.subplots(1, len(sweeps), figsize=(8 * len(sweeps), 5.5), squeeze=False)
    for ax, ((tokens, H, D), group) in zip(axes.flat, sorted(sweeps.items())):
        for impl in dict.fromkeys(r["impl"] for r in group):
            points = sorted((r["T"], r["fwdbwd_ms"]) for r in group if r["impl"] == impl)
            ax.plot(*zip(*points), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"sequence length T (B = {tokens} / T, H {H}, D {D}, bf16)")
        ax.set_ylabel("forward+backward ms (median)")
        ax.set_title(f"time against length at {tokens} tokens per call")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kernels_time_vs_length.png", dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--fla-budget-s", type=float, default=300.0)
    parser.add_argument(
        "--shapes",
        choices=["all", "small", "training", "d64", "d128", "length"],
        default="all",
        help="anchor shapes to time: all, two small ones, the training shape, or one head-dim family "
        "(fla autotunes once per family: d128 or d64 alone fits fla's tuning and every row in one call); "
        "or `length`: T from 512 to 32768 at B · T = 32768 (16 heads of 128), plotted against T",
    )
    parser.add_argument("--impls", default="all", help="comma-separated implementation names, or all")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument(
        "--epilogue",
        action="store_true",
        help="time the output norm's epilogue: the op and the layer with and without it ("
        + ", ".join(EPILOGUE_IMPLS)
        + ")",
    )
    parser.add_argument(
        "--value-gate",
        action="store_true",
        help="time a value-side gate (Fast Decay's) too: " + ", ".join(VALUE_GATE_IMPLS),
    )
    parser.add_argument(
        "--gate-grad-operands",
        action="store_true",
        help="time the gate gradient with bf16 operands beside the default fp32 ones: " + ", ".join(GATE_GRAD_IMPLS),
    )
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-kernel profiles")
    parser.add_argument(
        "--breakdown-fla", action="store_true", help="profile fla's chunk_gla (A0) kernel by kernel too"
    )
    parser.add_argument("--breakdown-only", action="store_true", help="only the per-kernel profiles, no timing table")
    parser.add_argument("--launch-options", help="tune_kernels.json whose chosen launch options to use")
    parser.add_argument(
        "--replot",
        nargs="+",
        metavar="PARQUET",
        help="only redraw the plot into --out from these timing files (no GPU needed)",
    )
    parser.add_argument("--anchors", help="anchor JSON whose rows the plot draws too")
    args = parser.parse_args()
    if args.impls != "all":  # before any GPU work: a misspelt name should not cost the time of a call
        known = set(make_implementations(None)[0]) | set(FLA_IMPLS)
        unknown = set(args.impls.split(",")) - known
        if unknown:
            parser.error(f"unknown --impls {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    if args.breakdown_only and args.no_breakdown:
        parser.error("--breakdown-only and --no-breakdown together would measure nothing; give one of them")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        rows = pd.concat([pd.read_parquet(p) for p in args.replot]).to_dict("records")
        plot(out, rows, args.anchors)
        return
    log_file = open(out / "bench_kernels.log", "a")

    def log(message):
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.launch_options:
        chosen = json.loads(Path(args.launch_options).read_text())["chosen"]
        if "query_key_grad_kernel" in chosen and "query_key_grad_kernel_safe_exp" not in chosen:
            # Written before the kernel's safe-exp path had options of its own: then one key
            # served both paths (tuned through the fused ReGLA op), and it does so again here.
            chosen["query_key_grad_kernel_safe_exp"] = chosen["query_key_grad_kernel"]
        LAUNCH_OPTIONS.update(chosen)
        log(f"launch options from {args.launch_options}: {chosen}")
    chunk_gla_fla = load_fla_chunk_gla()
    fla_version = None
    if chunk_gla_fla is not None:
        import fla

        fla_version = fla.__version__
    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        fla=fla_version,
        python=platform.python_version(),
    )
    meta.update(ceilings(device))
    log(f"meta {meta}")

    correctness_rows = [] if args.skip_correctness else check_correctness(chunk_gla_fla, device, log)
    impls, fla_impls = make_implementations(chunk_gla_fla)
    breakdown_rows = []
    breakdowns = [("triton", ANCHOR_SHAPES[0]), ("triton", ANCHOR_SHAPES[-1]), ("regla_fused", ANCHOR_SHAPES[3])]
    if args.breakdown_fla and fla_impls:  # fla's kernels at the same shapes, for a kernel-by-kernel comparison
        breakdowns += [("A0_fla", ANCHOR_SHAPES[0]), ("A0_fla", ANCHOR_SHAPES[-1])]
    elif args.breakdown_fla:
        log("--breakdown-fla: fla is not installed here, so its kernels are not profiled")
    for impl, shape in breakdowns:
        if args.no_breakdown:
            break
        log(f"kernel breakdown, {impl}, {shape}:")
        x = make_inputs(*shape, device)
        call = impls[impl] if impl in impls else fla_impls[impl]
        breakdown_rows += [dict(r, impl=impl) for r in kernel_breakdown(call, x, shape, log)]
        del x
    if args.breakdown_only:
        write_results(out, [], correctness_rows, breakdown_rows)
        return
    # The epilogue and value-gate comparisons run when asked for (--epilogue, --value-gate) or named;
    # "all" is the kernel table.
    known = set(impls) | set(fla_impls)  # fla's anchors belong to "all" too (timed last, within their budget)
    opt_in = set(EPILOGUE_IMPLS) | set(VALUE_GATE_IMPLS) | set(GATE_GRAD_IMPLS)
    chosen = known - opt_in if args.impls == "all" else set(args.impls.split(","))
    if args.epilogue:
        chosen |= set(EPILOGUE_IMPLS)
    if args.value_gate:
        chosen |= set(VALUE_GATE_IMPLS)
    if args.gate_grad_operands:
        chosen |= set(GATE_GRAD_IMPLS)
    impls = {n: c for n, c in impls.items() if n in chosen}
    fla_impls = {n: c for n, c in fla_impls.items() if n in chosen}
    shapes = {
        "all": ANCHOR_SHAPES,
        "small": ANCHOR_SHAPES[2:3] + ANCHOR_SHAPES[4:5],
        "training": [TRAINING_SHAPE],
        "d64": [s for s in ANCHOR_SHAPES if s[3] == 64],
        "d128": [s for s in ANCHOR_SHAPES if s[3] == 128],
        "length": LENGTH_SWEEP_SHAPES,
    }[args.shapes]
    timing_rows = []

    def run(shape, names_calls):
        x = make_inputs(*shape, device)
        if any(name.startswith("layer_") for name in names_calls):
            add_layer_inputs(x)
        for name, call in names_calls.items():
            if name in TORCH_FORMS and shape[0] * shape[1] * shape[2] > A3_MAX_TOKENS_X_HEADS:
                continue
            start = time.time()
            row = measure(name, call, x, shape, meta)
            timing_rows.append(row)
            summary = (
                row.get("error")
                or f"fwd {row['fwd_ms']:.3f} ms  fwd+bwd {row['fwdbwd_ms']:.3f} ms  "
                f"peak {row['fwdbwd_peak_mib']:.0f} MiB"
            )
            log(f"{name:26s} {shape}  {summary}  ({time.time() - start:.0f} s)")
            write_results(out, timing_rows, correctness_rows, breakdown_rows)
        plot(out, timing_rows)  # after every shape, so a run stopped at its time limit still has one
        del x
        torch.cuda.empty_cache()

    for shape in shapes:
        run(shape, impls)
    fla_start = time.time()
    # Smallest shape of each head-dim family first: fla autotunes once per family, and then the
    # budget check between shapes still leaves one measured fla point per family.
    for shape in sorted(shapes, key=lambda s: (s[0] * s[1] * s[2] > 4 * 2048 * 16, s[3], s[0] * s[1] * s[2])):
        if not fla_impls:
            break
        if time.time() - fla_start > args.fla_budget_s:
            log(f"fla budget of {args.fla_budget_s:.0f} s spent: skipping fla from shape {shape} on")
            break
        run(shape, fla_impls)
    write_results(out, timing_rows, correctness_rows, breakdown_rows)
    plot(out, timing_rows)
    summarise(timing_rows, log)


def summarise(timing_rows, log):
    log(
        f"{'impl':20s} {'B':>2} {'T':>6} {'H':>3} {'D':>4} {'fwd_ms':>8} {'fb_ms':>8} {'peakMiB':>8} "
        f"{'floor_f':>7} {'floor_fb':>8} {'TFLOP/s':>8}"
    )
    for r in timing_rows:
        if "error" in r:
            log(f"{r['impl']:20s} {r['B']:>2} {r['T']:>6} {r['H']:>3} {r['D']:>4} ERROR {r['error'][:80]}")
        else:
            log(
                f"{r['impl']:20s} {r['B']:>2} {r['T']:>6} {r['H']:>3} {r['D']:>4} {r['fwd_ms']:8.3f} "
                f"{r['fwdbwd_ms']:8.3f} {r['fwdbwd_peak_mib']:8.0f} {r['fwd_floor_fraction']:7.1%} "
                f"{r['fwdbwd_floor_fraction']:8.1%} {r['fwdbwd_TFLOPs']:8.1f}"
            )


if __name__ == "__main__":
    main()
