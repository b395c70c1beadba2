"""The backward's within-chunk kernel (`kernels.blocks.qkv_grad.query_key_grad_kernel`), the
largest single cost of the op's backward, timed alone against variants of it:

- the earlier and later sub-chunks as one [S, S] product per such sub-chunk, reading only their
  rows (as fla's `chunk_gla_bwd_kernel_intra`), instead of one product against the whole chunk with
  the rows outside masked (the op's form to run 21; run 22 measured the first 33% faster, and the
  op took it with the columns below);
- the score gradient's columns loaded in the layout the product takes ([S, C], not [C, S]
  transposed in registers: what made the chunk-state pass 2.2x faster, results/kernels/run20);
- key blocks of 32 or 64 columns, and launch options.

Plain GLA inputs (no safe-exp features), bf16 q and k, the products' operands as the op's
(`qkv_grad.GATE_GRADIENT_PRODUCTS`); every variant's dq, dk and gate term is checked against the
op's. Median ms of the kernel alone.

    python3 benchmarks/query_key_grad_variants.py --out DIR
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
from kernels.blocks.common import (  # noqa: E402
    CHUNK,
    SUB_CHUNK,
    dims_of,
    head_offset,
    load_row,
    load_rows,
    load_rows_transposed,
    store_rows,
)
from kernels.blocks.gate import gate_cumsum  # noqa: E402
from kernels.blocks.qkv_grad import GATE_GRADIENT_PRODUCTS, intra_score_grads, query_key_grads  # noqa: E402

SHAPES = [(1, 8192, 96, 128), (16, 4096, 12, 64)]


@triton.jit
def grads_variant(
    q, k, gc, dA, dq_inter, dk_inter, dq, dk, dG, T, Tp, H, K,
    C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
    BLOCKS: tl.constexpr, COLUMNS_AS_ROWS: tl.constexpr,
):  # fmt: skip
    """The op's kernel without the safe-exp features. BLOCKS: earlier / later sub-chunks one
    [S, S] product each (the op's form); else masked whole-chunk products (its form to run 21).
    COLUMNS_AS_ROWS: dA's columns of this sub-chunk loaded as [S, rows] tiles; else loaded
    [rows, S] and transposed."""
    ik, pid, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, i = pid // (C // S), pid % (C // S)
    qk_off = head_offset(bh, H, T, K)
    g_base = gc + head_offset(bh, H, Tp, K)
    a_base = dA + head_offset(bh, H, Tp, C)
    t0, r0, k0 = c * C, c * C + i * S, ik * BK
    dq_acc = load_rows(dq_inter + qk_off, r0, T, H * K, k0, K, S, BK)
    dk_through_state = load_rows(dk_inter + qk_off, r0, T, H * K, k0, K, S, BK)
    dk_acc = tl.zeros([S, BK], dtype=tl.float32)
    g_sub = load_rows(g_base, r0, Tp, H * K, k0, K, S, BK)
    g_first = load_row(g_base + r0 * H * K, 0, 1, k0, K, BK)
    g_final = load_row(g_base + (r0 + S - 1) * H * K, 0, 1, k0, K, BK)
    if BLOCKS:
        dq_part = tl.zeros([S, BK], dtype=tl.float32)
        for j in range(i):
            s0 = t0 + j * S
            k_j = load_rows(k + qk_off, s0, T, H * K, k0, K, S, BK).to(tl.float32)
            g_j = load_rows(g_base, s0, Tp, H * K, k0, K, S, BK)
            k_ref = (k_j * tl.exp2(g_first[None, :] - g_j)).to(DOT)
            dA_block = load_rows(a_base, r0, Tp, H * C, j * S, C, S, S)  # dA[t in i, s in j]
            dq_part += tl.dot(dA_block.to(DOT), k_ref, input_precision=PREC)
        dq_acc += tl.exp2(g_sub - g_first[None, :]) * dq_part
        dk_part = tl.zeros([S, BK], dtype=tl.float32)
        for j in range(i + 1, C // S):
            s0 = t0 + j * S
            q_j = load_rows(q + qk_off, s0, T, H * K, k0, K, S, BK).to(tl.float32)
            g_j = load_rows(g_base, s0, Tp, H * K, k0, K, S, BK)
            q_ref = (q_j * tl.exp2(g_j - g_final[None, :])).to(DOT)
            if COLUMNS_AS_ROWS:
                dA_block = load_rows_transposed(a_base, s0, Tp, H * C, i * S, C, S, S)  # [s in i, t in j]
            else:
                dA_block = tl.trans(load_rows(a_base, s0, Tp, H * C, i * S, C, S, S))
            dk_part += tl.dot(dA_block.to(DOT), q_ref, input_precision=PREC)
        dk_acc += tl.exp2(g_final[None, :] - g_sub) * dk_part
    else:
        cols = tl.arange(0, C)
        q_chunk = load_rows(q + qk_off, t0, T, H * K, k0, K, C, BK).to(tl.float32)
        k_chunk = load_rows(k + qk_off, t0, T, H * K, k0, K, C, BK).to(tl.float32)
        g_chunk = load_rows(g_base, t0, Tp, H * K, k0, K, C, BK)
        earlier = cols[:, None] < i * S
        later = cols[:, None] >= i * S + S
        k_ref = (k_chunk * tl.exp2(tl.where(earlier, g_first[None, :] - g_chunk, float("-inf")))).to(DOT)
        q_ref = (q_chunk * tl.exp2(tl.where(later, g_chunk - g_final[None, :], float("-inf")))).to(DOT)
        dA_rows = load_rows(a_base, r0, Tp, H * C, 0, C, S, C)
        if COLUMNS_AS_ROWS:
            dA_cols = load_rows_transposed(a_base, t0, Tp, H * C, i * S, C, C, S)  # [S, C]
        else:
            dA_cols = tl.trans(load_rows(a_base, t0, Tp, H * C, i * S, C, C, S))
        dq_acc += tl.exp2(g_sub - g_first[None, :]) * tl.dot(dA_rows.to(DOT), k_ref, input_precision=PREC)
        dk_acc += tl.exp2(g_final[None, :] - g_sub) * tl.dot(dA_cols.to(DOT), q_ref, input_precision=PREC)
    q_sub = load_rows(q + qk_off, r0, T, H * K, k0, K, S, BK).to(tl.float32)
    k_sub = load_rows(k + qk_off, r0, T, H * K, k0, K, S, BK).to(tl.float32)
    sub = tl.arange(0, S)
    for j in range(S):
        q_j = load_rows(q + qk_off, r0 + j, T, H * K, k0, K, 1, BK).to(tl.float32)
        k_j = load_rows(k + qk_off, r0 + j, T, H * K, k0, K, 1, BK).to(tl.float32)
        g_j = load_rows(g_base, r0 + j, Tp, H * K, k0, K, 1, BK)
        dA_col = load_rows(a_base, r0, Tp, H * C, i * S + j, C, S, 1)
        dA_row = tl.trans(load_rows(a_base, r0 + j, Tp, H * C, i * S, C, 1, S))
        after = sub[:, None] >= j
        decay = tl.exp2(tl.where(after, g_sub - g_j, g_j - g_sub))
        dq_acc += tl.where(after, dA_col * k_j * decay, 0.0)
        dk_acc += tl.where(sub[:, None] <= j, dA_row * q_j * decay, 0.0)
    store_rows(dG + qk_off, q_sub * dq_acc - k_sub * dk_acc, r0, T, H * K, k0, K, S, BK)
    store_rows(dk_inter + qk_off, k_sub * dk_through_state, r0, T, H * K, k0, K, S, BK)
    store_rows(dq + qk_off, dq_acc, r0, T, H * K, k0, K, S, BK)
    store_rows(dk + qk_off, dk_acc + dk_through_state, r0, T, H * K, k0, K, S, BK)


VARIANTS = {
    "whole chunk masked, columns transposed (the op's form to run 21)": dict(BLOCKS=False, COLUMNS_AS_ROWS=False),
    "whole chunk masked, columns loaded as rows": dict(BLOCKS=False, COLUMNS_AS_ROWS=True),
    "per sub-chunk blocks, columns transposed": dict(BLOCKS=True, COLUMNS_AS_ROWS=False),
    "per sub-chunk blocks, columns loaded as rows (the op's form)": dict(BLOCKS=True, COLUMNS_AS_ROWS=True),
}


def launch_variant(flags, tensors, dims, block, warps, stages, operands):
    q, k, gc, dA, dq_inter, dk_inter, dq, dk, dG = tensors
    B, T, H, K = q.shape
    grid = (triton.cdiv(K, block), dims.NT * (CHUNK // SUB_CHUNK), B * H)
    grads_variant[grid](
        q, k, gc, dA, dq_inter, dk_inter, dq, dk, dG, T, gc.shape[1], H, K, C=CHUNK, S=SUB_CHUNK, BK=block,
        num_warps=warps, num_stages=stages, **operands, **flags,
    )  # fmt: skip


def main():
    _, out = parse_args(__doc__)
    rows = []
    for B, T, H, D in SHAPES:
        (q, k, v, do), g = gla_inputs(B, T, H, D, 4)
        dims = dims_of(q, v)
        gc = gate_cumsum(g, dims)
        dA = intra_score_grads(do, v, D**-0.5, dims)
        dq_inter, dk_inter = (torch.randn(B, T, H, D, device="cuda") for _ in range(2))
        shape = dict(B=B, T=T, H=H, D=D)
        dq_ref, dk_ref, dG_ref, _, _ = query_key_grads(q, k, gc, dA, dq_inter.clone(), dk_inter.clone(), dims)
        # The op overwrites both inputs (with dG and k ⊙ dk_inter): timed on copies, which each
        # repetition overwrites again (the values drift; the work per launch does not change).
        scratches = dq_inter.clone(), dk_inter.clone()
        ms = timed(partial(query_key_grads, q, k, gc, dA, *scratches, dims))
        rows.append(dict(shape, variant="op's kernel", ms=ms[0], p20=ms[1], p80=ms[2], max_rel_diff=0.0))
        print(rows[-1], flush=True)
        operands = GATE_GRADIENT_PRODUCTS or dims.dot
        # Launch options outermost, so that every variant is timed at each option before the next.
        for block, warps, stages, (name, flags) in itertools.product((32, 64), (4, 2, 1), (2, 1), VARIANTS.items()):
            if block > D:
                continue
            dq, dk = torch.empty_like(dq_ref), torch.empty_like(dk_ref)
            dG = torch.empty_like(dG_ref)
            fresh = dk_inter.clone()
            tensors = (q, k, gc, dA, dq_inter, fresh, dq, dk, dG)
            setting = dict(shape, variant=name, block=block, num_warps=warps, num_stages=stages)
            try:
                launch_variant(flags, tensors, dims, block, warps, stages, operands)
                diff = max(
                    ((x.float() - ref.float()).norm() / ref.float().norm()).item()
                    for x, ref in ((dq, dq_ref), (dk, dk_ref), (dG, dG_ref))
                )
                ms = timed(partial(launch_variant, flags, tensors, dims, block, warps, stages, operands))
            except Exception as error:  # e.g. out of registers or shared memory: a result to record
                rows.append(dict(setting, error=repr(error)[:200]))
                continue
            rows.append(dict(setting, ms=ms[0], p20=ms[1], p80=ms[2], max_rel_diff=diff))
            print(rows[-1], flush=True)
            # Written after every row: a call cut by its time limit keeps what it measured.
            pd.DataFrame(rows).to_parquet(out / "query_key_grad_variants.parquet", index=False)


if __name__ == "__main__":
    main()
