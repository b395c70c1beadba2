"""The forward's chunk-state pass (`kernels.blocks.chunk_state.state_forward_kernel`), timed alone
against variants of it: keys and gates loaded as [features, positions] tiles (so that the product
takes them without a transpose in registers, as fla's `chunk_fwd_kernel_h` loads them; the op's
form since results/kernels/run20) or as [positions, features] tiles transposed in registers (its
form before), narrower blocks of the state (more programs at head dim 64), and launch options. Plain GLA inputs, bf16,
states stored in bf16 as the forward stores them; each variant is checked against the op's states.

    python3 benchmarks/chunk_state_variants.py --out DIR
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
from kernels.blocks.chunk_state import chunk_states  # noqa: E402
from kernels.blocks.common import CHUNK, dims_of, head_offset, load_row, load_rows, operand_dtype  # noqa: E402
from kernels.blocks.gate import gate_cumsum  # noqa: E402

SHAPES = [(1, 8192, 96, 128), (16, 4096, 12, 64)]


@triton.jit
def states_variant(
    k, v, gc, states, T, Tp, H, K, V, NT,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """states[c] = the state entering chunk c, for one (key block, value block, batch*head)."""
    ik, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_base = k + head_offset(bh, H, T, K)
    v_base = v + head_offset(bh, H, T, V)
    g_base = gc + head_offset(bh, H, Tp, K)
    kv_base = bh.to(tl.int64) * NT * K * V
    state = tl.zeros([BK, BV], dtype=tl.float32)
    features = ik * BK + tl.arange(0, BK)
    positions = tl.arange(0, C)
    for c in range(NT):
        t0 = c * C
        rows = ik * BK + tl.arange(0, BK)
        cols = iv * BV + tl.arange(0, BV)
        tl.store(
            states + kv_base + c * K * V + rows[:, None] * V + cols[None, :],
            state.to(states.dtype.element_ty),
            mask=(rows[:, None] < K) & (cols[None, :] < V),
        )
        v_tile = load_rows(v_base, t0, T, H * V, iv * BV, V, C, BV).to(DOT)
        g_last = load_row(g_base + (t0 + C - 1) * H * K, 0, 1, ik * BK, K, BK)
        if TRANSPOSED:
            t = t0 + positions
            mask = (features[:, None] < K) & (t[None, :] < T)
            k_t = tl.load(k_base + t[None, :] * H * K + features[:, None], mask=mask, other=0.0).to(tl.float32)
            g_t = tl.load(g_base + t[None, :] * H * K + features[:, None], mask=mask, other=0.0)
            k_to_end = (k_t * tl.exp2(g_last[:, None] - g_t)).to(DOT)  # [BK, C]
            state = state * tl.exp2(g_last)[:, None] + tl.dot(k_to_end, v_tile)
        else:
            k_tile = load_rows(k_base, t0, T, H * K, ik * BK, K, C, BK).to(tl.float32)
            g_tile = load_rows(g_base, t0, Tp, H * K, ik * BK, K, C, BK)
            k_to_end = (k_tile * tl.exp2(g_last[None, :] - g_tile)).to(DOT)  # [C, BK]
            state = state * tl.exp2(g_last)[:, None] + tl.dot(tl.trans(k_to_end), v_tile)


def launch_variant(k, v, gc, states, dims, block, transposed, warps, stages):
    B, T, H, K = k.shape
    V = v.shape[-1]
    grid = (triton.cdiv(K, block), triton.cdiv(V, block), B * H)
    states_variant[grid](
        k, v, gc, states, T, gc.shape[1], H, K, V, dims.NT, C=CHUNK, BK=block, BV=block, DOT=tl.bfloat16,
        TRANSPOSED=transposed, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def main():
    _, out = parse_args(__doc__)
    rows = []
    for B, T, H, D in SHAPES:
        (k, v), g = gla_inputs(B, T, H, D, 2)
        dims = dims_of(k, v)
        gc = gate_cumsum(g, dims)
        shape = dict(B=B, T=T, H=H, D=D)
        op = partial(chunk_states, k, v, gc, None, False, dims, states_dtype=operand_dtype(dims))
        reference = op()[0].float()
        ms = timed(op)
        rows.append(dict(shape, variant="op's kernel", ms=ms[0], p20=ms[1], p80=ms[2], max_abs_diff=0.0))
        print(rows[-1], flush=True)
        for transposed, block, warps, stages in itertools.product((False, True), (32, 64), (2, 4, 8), (2, 3)):
            if block > D:
                continue
            states = torch.zeros_like(reference, dtype=torch.bfloat16)
            name = "keys as [features, positions]" if transposed else "keys as [positions, features]"
            setting = dict(shape, variant=name, block=block, num_warps=warps, num_stages=stages)
            try:
                ms = timed(partial(launch_variant, k, v, gc, states, dims, block, transposed, warps, stages))
            except Exception as error:  # e.g. out of shared memory: a result to record
                rows.append(dict(setting, error=repr(error)[:200]))
                continue
            diff = (states.float() - reference).abs().max().item()
            rows.append(dict(setting, ms=ms[0], p20=ms[1], p80=ms[2], max_abs_diff=diff))
            print(rows[-1], flush=True)
        pd.DataFrame(rows).to_parquet(out / "chunk_state_variants.parquet", index=False)


if __name__ == "__main__":
    main()
