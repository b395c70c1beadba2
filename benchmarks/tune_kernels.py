"""Launch options (num_warps, num_stages) of the Triton GLA kernels, chosen by measurement on a GPU.

Coordinate descent: for each kernel in turn (all, or --kernels), every option pair is tried with
the kernels already tuned kept at their best and the others at `LAUNCH_OPTIONS`, and the pair
with the lowest summed relative forward+backward time of
the fused ReGLA op over one D=128 and one D=64 shape is kept. Writes every measurement to
tune_kernels.parquet and the chosen options to tune_kernels.json in --out; copy the JSON into
kernels.blocks.common.LAUNCH_OPTIONS to adopt them.

With --epilogue the op runs with the output norm and the swish gate in its epilogue
(`kernels.blocks.norm_epilogue`), and its two kernels are tuned (by default, only they).

    python3 benchmarks/tune_kernels.py [--out DIR] [--epilogue]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triton.testing import do_bench  # noqa: E402

from kernels.blocks.common import LAUNCH_OPTIONS  # noqa: E402
from kernels.triton_regla import triton_regla  # noqa: E402
from variants.feature_maps import variance_reduction_factor  # noqa: E402

SHAPES = [(4, 4096, 64, 128), (16, 4096, 12, 64)]
KERNELS = [
    # The fused ReGLA op's (safe-exp features) launch key of `qkv_grad.query_key_grad_kernel`;
    # plain GLA's, "query_key_grad_kernel", is not reached by this op.
    "query_key_grad_kernel_safe_exp",
    "intra_scores_kernel",
    "state_forward_kernel",
    "query_key_inter_kernel",
    "output_kernel",
    "value_grad_kernel",
    "state_backward_kernel",
    "gate_grad_kernel",
]
EPILOGUE_KERNELS = ["normed_output_kernel", "normed_output_grad_kernel"]
OPTIONS = [dict(num_warps=w, num_stages=s) for w, s in itertools.product((1, 2, 4, 8), (1, 2, 3))]


def make_step(B, T, H, D, epilogue=False):
    torch.manual_seed(0)
    leaf = lambda: torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).requires_grad_(True)  # noqa: E731
    q, k, v, a, r, g = (leaf() for _ in range(6))
    weight = torch.ones(D, device="cuda", requires_grad=True)
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    scale = variance_reduction_factor(D)
    norm = dict(norm_eps=1e-5, norm_weight=weight, eps_unshifted=True, output_gate=g) if epilogue else {}
    inputs = (q, k, v, a, r, weight, g) if epilogue else (q, k, v, a, r)

    def step():
        o = triton_regla(q, k, v, gate_logits=a, refine_logits=r, key_max="running", scale=scale, **norm).output
        torch.autograd.grad(o, inputs, do)

    return step


def measure(steps) -> list[float]:
    times = []
    for step in steps:
        step()  # compile outside the timing
        times.append(do_bench(step, warmup=10, rep=60))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget-s", type=float, default=400.0, help="stop tuning further kernels after this")
    parser.add_argument(
        "--kernels",
        help="comma-separated kernels to tune, in order; the others keep LAUNCH_OPTIONS "
        f"(default: {', '.join(KERNELS)}; with --epilogue {', '.join(EPILOGUE_KERNELS)})",
    )
    parser.add_argument("--epilogue", action="store_true", help="the op with the output norm in its epilogue")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = [make_step(*shape, epilogue=args.epilogue) for shape in SHAPES]
    names = args.kernels.split(",") if args.kernels else (EPILOGUE_KERNELS if args.epilogue else KERNELS)
    for name in names:  # the kernels being tuned start from Triton's defaults
        LAUNCH_OPTIONS.pop(name, None)
    baseline = measure(steps)
    print(f"defaults: {baseline}", flush=True)
    rows, chosen, start = [], {}, time.time()
    for name in names:
        if time.time() - start > args.budget_s:
            print(f"budget spent: {name} and later kernels keep Triton's defaults", flush=True)
            break
        best = None
        for option in OPTIONS:
            LAUNCH_OPTIONS[name] = option
            try:
                times = measure(steps)
            except Exception as error:  # e.g. out of shared memory: a result to record
                rows.append(dict(kernel=name, **option, error=repr(error)[:200]))
                continue
            score = sum(t / b for t, b in zip(times, baseline))
            rows.append(
                dict(
                    kernel=name,
                    **option,
                    score=score,
                    **{f"ms_{'x'.join(map(str, s))}": t for s, t in zip(SHAPES, times)},
                )
            )
            print(f"{name} {option} score {score:.3f} {times}", flush=True)
            if best is None or score < best[0]:
                best = (score, option)
        if best is None:  # every option failed: Triton's defaults stay, and the rows say why
            LAUNCH_OPTIONS.pop(name, None)
            continue
        LAUNCH_OPTIONS[name] = best[1]
        chosen[name] = best[1]
        pd.DataFrame(rows).to_parquet(out / "tune_kernels.parquet", index=False)
        (out / "tune_kernels.json").write_text(json.dumps(dict(chosen=chosen), indent=1))
    final = measure(steps)
    print(f"tuned: {final} (defaults {baseline})", flush=True)
    (out / "tune_kernels.json").write_text(
        json.dumps(dict(chosen=chosen, shapes=SHAPES, default_ms=baseline, tuned_ms=final), indent=1)
    )


if __name__ == "__main__":
    main()
