"""What the kernel-variant timing scripts (`intra_scores_variants.py`, `chunk_state_variants.py`,
`query_key_grad_variants.py`) share: their command line, their random plain-GLA inputs and the
timing of one launch."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(doc: str, add_arguments=None) -> tuple[argparse.Namespace, Path]:
    """The script's arguments (--out, and whatever `add_arguments(parser)` adds) and its output folder, created."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, out


def gla_inputs(B: int, T: int, H: int, D: int, count: int, device: str = "cuda", seed: int = 0):
    """`count` bf16 [B, T, H, D] tensors from N(0, 1) and a log gate logsigmoid(N(0, 1)) clamped at
    -5 (fp32), as the anchor benchmarks draw them."""
    torch.manual_seed(seed)
    tensors = [torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16) for _ in range(count)]
    log_gate = F.logsigmoid(torch.randn(B, T, H, D, device=device)).clamp_min(-5)
    return tensors, log_gate


def timed(launch) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile ms of `launch()`, compiled outside the timing."""
    from triton.testing import do_bench

    launch()
    return tuple(do_bench(launch, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8]))
