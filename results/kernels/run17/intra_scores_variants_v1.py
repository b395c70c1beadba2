"""The first version of benchmarks/intra_scores_variants.py, as run for run17 (kept for the record;
the script in benchmarks/ is its successor). Kernel names: scores_by_sub_chunk (EARLIER: the whole
chunk masked; DIAGONAL 1: decay tensor, 2: columns into a tile) and scores_by_chunk (one program
per chunk, the chunk's keys loaded once per key block for its four sub-chunks)."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import pandas as pd
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from kernels.blocks.common import CHUNK, SUB_CHUNK, dims_of, head_offset, load_row, load_rows  # noqa: E402
from kernels.blocks.gate import gate_cumsum  # noqa: E402
from kernels.blocks.output import intra_scores  # noqa: E402

SHAPES = [(1, 8192, 96, 128), (16, 4096, 12, 64)]


@triton.jit
def scores_by_sub_chunk(
    q, k, gc, A, T, Tp, H, K,
    C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr,
    EARLIER: tl.constexpr, DIAGONAL: tl.constexpr,
):  # fmt: skip
    pid, bh = tl.program_id(0), tl.program_id(1)
    c, i = pid // (C // S), pid % (C // S)
    q_base = q + head_offset(bh, H, T, K)
    k_base = k + head_offset(bh, H, T, K)
    g_base = gc + head_offset(bh, H, Tp, K)
    t0, r0 = c * C, c * C + i * S
    cols = tl.arange(0, C)
    acc = tl.zeros([S, C], dtype=tl.float32)
    if EARLIER:
        for k0 in range(0, K, BK):
            q_sub = load_rows(q_base, r0, T, H * K, k0, K, S, BK).to(tl.float32)
            g_sub = load_rows(g_base, r0, Tp, H * K, k0, K, S, BK)
            k_chunk = load_rows(k_base, t0, T, H * K, k0, K, C, BK).to(tl.float32)
            g_chunk = load_rows(g_base, t0, Tp, H * K, k0, K, C, BK)
            g_ref = load_row(g_base + r0 * H * K, 0, 1, k0, K, BK)
            q_ref = (q_sub * tl.exp2(g_sub - g_ref[None, :])).to(DOT)
            earlier = cols[:, None] < i * S
            k_ref = (k_chunk * tl.exp2(tl.where(earlier, g_ref[None, :] - g_chunk, float("-inf")))).to(DOT)
            acc += tl.dot(q_ref, tl.trans(k_ref))
    diag = tl.zeros([S, S], dtype=tl.float32)
    sub = tl.arange(0, S)
    if DIAGONAL == 1:
        causal = (sub[:, None] >= sub[None, :])[:, :, None]
        for d0 in range(0, K, BD):
            q_d = load_rows(q_base, r0, T, H * K, d0, K, S, BD).to(tl.float32)
            k_d = load_rows(k_base, r0, T, H * K, d0, K, S, BD).to(tl.float32)
            g_d = load_rows(g_base, r0, Tp, H * K, d0, K, S, BD)
            decay = tl.exp2(tl.where(causal, g_d[:, None, :] - g_d[None, :, :], float("-inf")))
            diag += tl.sum(q_d[:, None, :] * k_d[None, :, :] * decay, axis=2)
    if DIAGONAL == 2:
        for d0 in range(0, K, BD):
            q_d = load_rows(q_base, r0, T, H * K, d0, K, S, BD).to(tl.float32)
            g_d = load_rows(g_base, r0, Tp, H * K, d0, K, S, BD)
            for j in range(S):
                k_j = load_rows(k_base, r0 + j, T, H * K, d0, K, 1, BD).to(tl.float32)
                g_j = load_rows(g_base, r0 + j, Tp, H * K, d0, K, 1, BD)
                decay = tl.exp2(tl.where(sub[:, None] >= j, g_d - g_j, float("-inf")))
                column = tl.sum(q_d * k_j * decay, axis=1)
                diag += tl.where(sub[None, :] == j, column[:, None], 0.0)
    a_base = A + head_offset(bh, H, Tp, C)
    off_diagonal = (cols[None, :] < i * S) | (cols[None, :] >= i * S + S)
    rows_t = r0 + tl.arange(0, S)
    tl.store(a_base + rows_t[:, None] * H * C + cols[None, :], acc, mask=off_diagonal & (rows_t[:, None] < Tp))
    diag_cols = i * S + sub
    tl.store(a_base + rows_t[:, None] * H * C + diag_cols[None, :], diag, mask=rows_t[:, None] < Tp)


@triton.jit
def scores_by_chunk(
    q, k, gc, A, T, Tp, H, K,
    C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr,
    EARLIER: tl.constexpr, DIAGONAL: tl.constexpr,
):  # fmt: skip
    c, bh = tl.program_id(0), tl.program_id(1)
    q_base = q + head_offset(bh, H, T, K)
    k_base = k + head_offset(bh, H, T, K)
    g_base = gc + head_offset(bh, H, Tp, K)
    a_base = A + head_offset(bh, H, Tp, C)
    t0 = c * C
    cols = tl.arange(0, C)
    sub = tl.arange(0, S)
    causal = (sub[:, None] >= sub[None, :])[:, :, None]
    for i in tl.static_range(C // S):
        r0 = t0 + i * S
        rows_t = r0 + sub
        if EARLIER and i > 0:
            acc = tl.zeros([S, C], dtype=tl.float32)
            for k0 in range(0, K, BK):
                q_sub = load_rows(q_base, r0, T, H * K, k0, K, S, BK).to(tl.float32)
                g_sub = load_rows(g_base, r0, Tp, H * K, k0, K, S, BK)
                k_chunk = load_rows(k_base, t0, T, H * K, k0, K, C, BK).to(tl.float32)
                g_chunk = load_rows(g_base, t0, Tp, H * K, k0, K, C, BK)
                g_ref = load_row(g_base + r0 * H * K, 0, 1, k0, K, BK)
                q_ref = (q_sub * tl.exp2(g_sub - g_ref[None, :])).to(DOT)
                earlier = cols[:, None] < i * S
                k_ref = (k_chunk * tl.exp2(tl.where(earlier, g_ref[None, :] - g_chunk, float("-inf")))).to(DOT)
                acc += tl.dot(q_ref, tl.trans(k_ref))
        else:
            acc = tl.zeros([S, C], dtype=tl.float32)
        off_diagonal = (cols[None, :] < i * S) | (cols[None, :] >= i * S + S)
        tl.store(a_base + rows_t[:, None] * H * C + cols[None, :], acc, mask=off_diagonal & (rows_t[:, None] < Tp))
        if DIAGONAL == 1:
            diag = tl.zeros([S, S], dtype=tl.float32)
            for d0 in range(0, K, BD):
                q_d = load_rows(q_base, r0, T, H * K, d0, K, S, BD).to(tl.float32)
                k_d = load_rows(k_base, r0, T, H * K, d0, K, S, BD).to(tl.float32)
                g_d = load_rows(g_base, r0, Tp, H * K, d0, K, S, BD)
                decay = tl.exp2(tl.where(causal, g_d[:, None, :] - g_d[None, :, :], float("-inf")))
                diag += tl.sum(q_d[:, None, :] * k_d[None, :, :] * decay, axis=2)
            diag_cols = i * S + sub
            tl.store(a_base + rows_t[:, None] * H * C + diag_cols[None, :], diag, mask=rows_t[:, None] < Tp)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from triton.testing import do_bench

    rows = []
    for B, T, H, D in SHAPES:
        torch.manual_seed(0)
        q, k = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device="cuda")).clamp_min(-5)
        dims = dims_of(q, q)
        gc = gate_cumsum(g, dims)
        Tp = gc.shape[1]
        reference = intra_scores(q, k, gc, dims)
        ms = do_bench(lambda: intra_scores(q, k, gc, dims), warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])  # noqa: B023
        rows.append(dict(B=B, T=T, H=H, D=D, variant="op's kernel", num_warps=None, BD=None, ms=ms[0], p20=ms[1], p80=ms[2], max_abs_diff=0.0))
        print(rows[-1], flush=True)
        BK = min(64, D)
        variants = [
            ("earlier only", scores_by_sub_chunk, dict(EARLIER=True, DIAGONAL=0), 4),
            ("diagonal only, decay tensor", scores_by_sub_chunk, dict(EARLIER=False, DIAGONAL=1), 4),
            ("diagonal only, column loop", scores_by_sub_chunk, dict(EARLIER=False, DIAGONAL=2), 4),
            ("full, decay tensor", scores_by_sub_chunk, dict(EARLIER=True, DIAGONAL=1), 4),
            ("full, column loop", scores_by_sub_chunk, dict(EARLIER=True, DIAGONAL=2), 4),
            ("full by chunk, decay tensor", scores_by_chunk, dict(EARLIER=True, DIAGONAL=1), 1),
        ]
        for (name, kernel, flags, per_chunk), warps, BD in itertools.product(variants, (1, 2, 4, 8), (16, 32, 64, 128)):
            if BD > D or (flags["DIAGONAL"] == 1 and BD > 32) or (flags["DIAGONAL"] == 0 and BD != 32):
                continue
            A = torch.zeros_like(reference)
            grid = (dims.NT * per_chunk, B * H)

            def launch():
                kernel[grid](q, k, gc, A, T, Tp, H, D, C=CHUNK, S=SUB_CHUNK, BK=BK, BD=BD, DOT=tl.bfloat16, num_warps=warps, num_stages=1, **flags)  # noqa: B023

            try:
                launch()
                ms = do_bench(launch, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
            except Exception as error:
                rows.append(dict(B=B, T=T, H=H, D=D, variant=name, num_warps=warps, BD=BD, error=repr(error)[:200]))
                print(rows[-1], flush=True)
                continue
            diff = (A - reference).abs().max().item() if name.startswith("full") else float("nan")
            rows.append(dict(B=B, T=T, H=H, D=D, variant=name, num_warps=warps, BD=BD, ms=ms[0], p20=ms[1], p80=ms[2], max_abs_diff=diff))
            print(rows[-1], flush=True)
        pd.DataFrame(rows).to_parquet(out / "intra_scores_variants.parquet", index=False)


if __name__ == "__main__":
    main()
