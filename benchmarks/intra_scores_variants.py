"""Where the forward's within-chunk score kernel spends its time: variants of it, timed alone.

The forward of the plain GLA op spends most of its time in `intra_scores_kernel`
(`kernels.blocks.output`). This script times, on one GPU and at the anchor shapes, the kernel's
two parts apart (the earlier sub-chunks through tensor-core products; the exact diagonal block)
and alternatives for each, over launch options, and checks every full variant against the
op's own kernel. Plain GLA inputs (no safe-exp features), bf16, median ms of the kernel alone.

    python3 benchmarks/intra_scores_variants.py --out DIR
"""

from __future__ import annotations

import itertools
import sys
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.variant_timing import gla_inputs, parse_args, timed  # noqa: E402
from kernels.blocks.common import CHUNK, SUB_CHUNK, dims_of, head_offset, load_row, load_rows  # noqa: E402
from kernels.blocks.gate import gate_cumsum  # noqa: E402
from kernels.blocks.output import intra_scores  # noqa: E402

SHAPES = [(1, 8192, 96, 128), (16, 4096, 12, 64)]


@triton.jit
def scores_variant(
    q, k, gc, A, T, Tp, H, K,
    C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr,
    EARLIER: tl.constexpr, DIAGONAL: tl.constexpr, FP32_QUADRANT: tl.constexpr = False,
):  # fmt: skip
    """One program per (sub-chunk, batch*head), as the op's kernel, with each part chosen:

    EARLIER  0: none; 1: one [S, C] product against the whole chunk, the later columns masked (the
             form before); 2: one [S, S] product per earlier sub-chunk (the op's form).
    DIAGONAL 0: none; 1: a [S, S, BD] tensor of decays reduced over features (the form before);
             2: one column at a time, inserted into an [S, S] tile (the op's form to run 21);
             3: one column at a time over all features, stored as it is finished;
             4: in halves: the lower-left quadrant through a tensor-core product about the middle
                row, the two diagonal quadrants exact as 2 over 8 rows (half the exact work);
                FP32_QUADRANT: that product with fp32 operands (tf32 on the GPU, as fla's
                off-diagonal blocks), not DOT's: the op's form since run 21.
    """
    pid, bh = tl.program_id(0), tl.program_id(1)
    c, i = pid // (C // S), pid % (C // S)
    q_base = q + head_offset(bh, H, T, K)
    k_base = k + head_offset(bh, H, T, K)
    g_base = gc + head_offset(bh, H, Tp, K)
    t0, r0 = c * C, c * C + i * S
    cols = tl.arange(0, C)
    sub = tl.arange(0, S)
    rows_t = r0 + sub
    a_rows = A + head_offset(bh, H, Tp, C) + rows_t[:, None] * H * C
    inside = rows_t[:, None] < Tp
    if EARLIER == 1:
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
        off_diagonal = (cols[None, :] < i * S) | (cols[None, :] >= i * S + S)
        tl.store(a_rows + cols[None, :], acc, mask=off_diagonal & inside)
    if EARLIER == 2:
        for j in range(i):
            s0 = t0 + j * S
            block = tl.zeros([S, S], dtype=tl.float32)
            for k0 in range(0, K, BK):
                q_sub = load_rows(q_base, r0, T, H * K, k0, K, S, BK).to(tl.float32)
                g_sub = load_rows(g_base, r0, Tp, H * K, k0, K, S, BK)
                g_ref = load_row(g_base + r0 * H * K, 0, 1, k0, K, BK)
                k_j = load_rows(k_base, s0, T, H * K, k0, K, S, BK).to(tl.float32)
                g_j = load_rows(g_base, s0, Tp, H * K, k0, K, S, BK)
                q_ref = (q_sub * tl.exp2(g_sub - g_ref[None, :])).to(DOT)
                k_ref = (k_j * tl.exp2(g_ref[None, :] - g_j)).to(DOT)
                block += tl.dot(q_ref, tl.trans(k_ref))
            tl.store(a_rows + (j * S + sub)[None, :], block, mask=inside)
        tl.store(a_rows + cols[None, :], tl.zeros([S, C], dtype=tl.float32), mask=inside & (cols[None, :] >= i * S + S))
    if DIAGONAL == 1 or DIAGONAL == 2:
        diag = tl.zeros([S, S], dtype=tl.float32)
        causal = (sub[:, None] >= sub[None, :])[:, :, None]
        for d0 in range(0, K, BD):
            q_d = load_rows(q_base, r0, T, H * K, d0, K, S, BD).to(tl.float32)
            g_d = load_rows(g_base, r0, Tp, H * K, d0, K, S, BD)
            if DIAGONAL == 1:
                k_d = load_rows(k_base, r0, T, H * K, d0, K, S, BD).to(tl.float32)
                decay = tl.exp2(tl.where(causal, g_d[:, None, :] - g_d[None, :, :], float("-inf")))
                diag += tl.sum(q_d[:, None, :] * k_d[None, :, :] * decay, axis=2)
            else:
                for j in range(S):
                    k_j = load_rows(k_base, r0 + j, T, H * K, d0, K, 1, BD).to(tl.float32)
                    g_j = load_rows(g_base, r0 + j, Tp, H * K, d0, K, 1, BD)
                    decay = tl.exp2(tl.where(sub[:, None] >= j, g_d - g_j, float("-inf")))
                    column = tl.sum(q_d * k_j * decay, axis=1)
                    diag += tl.where(sub[None, :] == j, column[:, None], 0.0)
        tl.store(a_rows + (i * S + sub)[None, :], diag, mask=inside)
    if DIAGONAL == 4:
        # The block's lower-left 8 x 8 quadrant through one tensor-core product (reference row 8:
        # both factors <= 1), its two diagonal quadrants exact, one column at a time over 8 rows.
        HALF: tl.constexpr = S // 2
        quadrant = tl.zeros([S, S], dtype=tl.float32)
        for k0 in range(0, K, BK):
            q_sub = load_rows(q_base, r0, T, H * K, k0, K, S, BK).to(tl.float32)
            k_sub = load_rows(k_base, r0, T, H * K, k0, K, S, BK).to(tl.float32)
            g_sub = load_rows(g_base, r0, Tp, H * K, k0, K, S, BK)
            g_mid = load_row(g_base + (r0 + HALF) * H * K, 0, 1, k0, K, BK)
            q_mid = q_sub * tl.exp2(tl.where(sub[:, None] >= HALF, g_sub - g_mid[None, :], float("-inf")))
            k_mid = k_sub * tl.exp2(tl.where(sub[:, None] < HALF, g_mid[None, :] - g_sub, float("-inf")))
            if FP32_QUADRANT:
                quadrant += tl.dot(q_mid, tl.trans(k_mid))
            else:
                quadrant += tl.dot(q_mid.to(DOT), tl.trans(k_mid.to(DOT)))
        off_quadrants = (sub[:, None] >= HALF) != (sub[None, :] >= HALF)
        # zero outside the lower-left quadrant: q_mid has no rows above the middle, k_mid none below
        tl.store(a_rows + (i * S + sub)[None, :], quadrant, mask=inside & off_quadrants)
        half = tl.arange(0, HALF)
        for h in tl.static_range(2):
            h0 = r0 + h * HALF
            tile = tl.zeros([HALF, HALF], dtype=tl.float32)
            for d0 in range(0, K, BD):
                q_h = load_rows(q_base, h0, T, H * K, d0, K, HALF, BD).to(tl.float32)
                g_h = load_rows(g_base, h0, Tp, H * K, d0, K, HALF, BD)
                for j in range(HALF):
                    k_j = load_rows(k_base, h0 + j, T, H * K, d0, K, 1, BD).to(tl.float32)
                    g_j = load_rows(g_base, h0 + j, Tp, H * K, d0, K, 1, BD)
                    decay = tl.exp2(tl.where(half[:, None] >= j, g_h - g_j, float("-inf")))
                    column = tl.sum(q_h * k_j * decay, axis=1)
                    tile += tl.where(half[None, :] == j, column[:, None], 0.0)
            rows_h = h0 + half
            a_half = A + head_offset(bh, H, Tp, C) + rows_h[:, None] * H * C + (i * S + h * HALF + half)[None, :]
            tl.store(a_half, tile, mask=rows_h[:, None] < Tp)
    if DIAGONAL == 3:
        for j in range(S):
            column = tl.zeros([S], dtype=tl.float32)
            for d0 in range(0, K, BD):
                q_d = load_rows(q_base, r0, T, H * K, d0, K, S, BD).to(tl.float32)
                g_d = load_rows(g_base, r0, Tp, H * K, d0, K, S, BD)
                k_j = load_rows(k_base, r0 + j, T, H * K, d0, K, 1, BD).to(tl.float32)
                g_j = load_rows(g_base, r0 + j, Tp, H * K, d0, K, 1, BD)
                decay = tl.exp2(tl.where(sub[:, None] >= j, g_d - g_j, float("-inf")))
                column += tl.sum(q_d * k_j * decay, axis=1)
            tl.store(A + head_offset(bh, H, Tp, C) + rows_t * H * C + i * S + j, column, mask=rows_t < Tp)


VARIANTS = {
    "earlier, whole chunk masked": dict(EARLIER=1, DIAGONAL=0),
    "earlier, per earlier sub-chunk": dict(EARLIER=2, DIAGONAL=0),
    "diagonal, decay tensor": dict(EARLIER=0, DIAGONAL=1),
    "diagonal, columns into a tile": dict(EARLIER=0, DIAGONAL=2),
    "diagonal, columns stored": dict(EARLIER=0, DIAGONAL=3),
    "full, as before (whole chunk, decay tensor)": dict(EARLIER=1, DIAGONAL=1),
    "full, per sub-chunk, columns into a tile (the op's form to run 21)": dict(EARLIER=2, DIAGONAL=2),
    "full, per sub-chunk, columns stored": dict(EARLIER=2, DIAGONAL=3),
    "diagonal, halves: quadrant product + exact 8 x 8 columns": dict(EARLIER=0, DIAGONAL=4),
    "full, per sub-chunk, diagonal in halves": dict(EARLIER=2, DIAGONAL=4),
    "full, per sub-chunk, diagonal in halves, fp32 quadrant operands (the op's form)": dict(
        EARLIER=2, DIAGONAL=4, FP32_QUADRANT=True
    ),
}
WARPS = (1, 2)
FEATURE_BLOCKS = (16, 32, 64, 128)


def launch_variant(flags, inputs, A, dims, warps, BD):
    q, k, gc = inputs
    B, T, H, K = q.shape
    scores_variant[(dims.NT * (CHUNK // SUB_CHUNK), B * H)](
        q, k, gc, A, T, gc.shape[1], H, K, C=CHUNK, S=SUB_CHUNK, BK=min(64, K), BD=BD, DOT=tl.bfloat16,
        num_warps=warps, num_stages=1, **flags,
    )  # fmt: skip


def main():
    args, out = parse_args(
        __doc__, lambda parser: parser.add_argument("--only", help="time only the variants whose names contain this")
    )
    rows = []
    for B, T, H, D in SHAPES:
        (q, k), g = gla_inputs(B, T, H, D, 2)
        dims = dims_of(q, q)
        gc = gate_cumsum(g, dims)
        shape = dict(B=B, T=T, H=H, D=D)
        reference = intra_scores(q, k, gc, dims)
        ms = timed(partial(intra_scores, q, k, gc, dims))
        rows.append(dict(shape, variant="op's kernel", ms=ms[0], p20=ms[1], p80=ms[2], max_abs_diff=0.0))
        print(rows[-1], flush=True)
        chosen = {n: f for n, f in VARIANTS.items() if args.only is None or args.only in n}
        for (name, flags), warps, BD in itertools.product(chosen.items(), WARPS, FEATURE_BLOCKS):
            if BD > D or (flags["DIAGONAL"] == 1 and BD > 32) or (flags["DIAGONAL"] == 0 and BD != 32):
                continue
            A = torch.zeros_like(reference)
            setting = dict(shape, variant=name, num_warps=warps, BD=BD)
            try:
                ms = timed(partial(launch_variant, flags, (q, k, gc), A, dims, warps, BD))
            except Exception as error:  # e.g. out of registers or shared memory: a result to record
                rows.append(dict(setting, error=repr(error)[:200]))
                continue
            diff = (A - reference).abs().max().item() if name.startswith("full") else float("nan")
            rows.append(dict(setting, ms=ms[0], p20=ms[1], p80=ms[2], max_abs_diff=diff))
            print(rows[-1], flush=True)
        pd.DataFrame(rows).to_parquet(out / "intra_scores_variants.parquet", index=False)


if __name__ == "__main__":
    main()
