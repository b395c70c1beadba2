"""The target of an Nsight Compute profile of the backward's within-chunk kernels: one
implementation's forward+backward, run twice on the benchmark's inputs (the first run compiles;
profile the second launch).

    ncu --clock-control none -k regex:query_key_grad_kernel --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        --section SchedulerStats --csv --page details \\
        python3 benchmarks/ncu_backward_intra.py --impl regla_fused --shape 4,4096,64,128

`--impl` is one of `bench_kernels`' implementations (`triton`: our plain GLA op; `regla_fused`:
the fused ReGLA op; `A0_fla`: fla's `chunk_gla`, whose within-chunk backward kernel is
`chunk_gla_bwd_kernel_intra`). `--clock-control none` leaves the GPU's clocks as they are.
fla's kernels autotune on their first launches unless their tuning is in Triton's cache: restore
`benchmarks/fla_autotune/` first (its README), or a skipped launch may be a tuning trial.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernels import load_fla_chunk_gla, make_implementations, make_inputs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", required=True)
    parser.add_argument("--shape", default="4,4096,64,128", help="B,T,H,D")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cpu: a check of the script under TRITON_INTERPRET=1")
    args = parser.parse_args()
    B, T, H, D = (int(x) for x in args.shape.split(","))
    impls, fla_impls = make_implementations(load_fla_chunk_gla() if args.impl.endswith("_fla") else None)
    impls = {**impls, **fla_impls}
    if args.impl not in impls:
        raise SystemExit(f"unknown --impl {args.impl!r}; choose from: {', '.join(sorted(impls))}")
    call, names, *setting = impls[args.impl]
    inputs = make_inputs(B, T, H, D, args.device)
    with (setting[0] if setting else contextlib.nullcontext)():  # e.g. the bf16 gate-gradient products
        for _ in range(args.runs):
            for name in names:
                inputs[name].grad = None
            out = call(inputs)
            out.backward(inputs["do"])
    if args.device != "cpu":
        torch.cuda.synchronize()
    print(f"{args.impl} at {B}x{T}x{H}x{D}: {args.runs} forward+backward runs done", flush=True)


if __name__ == "__main__":
    main()
