"""Where the backward's slowest kernel (`kernels.blocks.qkv_grad.query_key_grad_kernel`) spends its
time: the op's kernel, copied with switches, each form timed alone.

With `--parts` (results/kernels/run24), one part is left out at a time (those forms compute wrong
values on purpose; only their times compare):
- the earlier and later sub-chunks' [S, S] products ("off-diagonal blocks");
- the diagonal block's rank-1 loop ("diagonal loop"), and within it the decay's exp2 alone
  (replaced by a multiply: what the special-function unit costs there).
With both left out, what remains is the kernel's loads and stores.

Without it, forms of the diagonal loop that compute the op's values: run 24's arithmetic (the
op's before the masks moved onto the score-gradient columns), and the loop unrolled or pipelined
(its loads issued ahead of the arithmetic that waits on them); and, at the first shape, the op's
form at other launch options.

Every form runs on plain GLA inputs and with `EXP` (ReGLA's safe-exp features formed on load: the
fused ReGLA op's path, with fp32 dq and dk and the shift gradients' row sums), and is compiled for
its registers per thread and spilled registers (Triton's compiled-kernel metadata): with 1 warp a
program, occupancy is bound by registers, not by shared memory. The forms that compute the op's
values are checked against the op's outputs (`rel_diff_from_op`).

    python3 benchmarks/query_key_grad_profile.py --out DIR [--parts]
"""

from __future__ import annotations

import itertools
import shutil
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
    SafeExpShifts,
    dims_of,
    feature_args,
    head_offset,
    launch_options,
    load_features,
    load_row,
    load_rows,
    load_rows_transposed,
    store_rows,
)
from kernels.blocks.gate import gate_cumsum  # noqa: E402
from kernels.blocks.qkv_grad import (  # noqa: E402
    GATE_GRADIENT_PRODUCTS,
    QUERY_KEY_GRAD_COLUMNS,
    intra_score_grads,
    query_key_grads,
)

SHAPES = [(4, 4096, 64, 128), (1, 8192, 96, 128)]

FULL = dict(OFF_DIAGONAL=True, DIAGONAL=True, DECAY_EXP2=True, OLD=False, LOOP=0)
PARTS = {
    "full (the op's kernel)": FULL,
    "diagonal decay without exp2": {**FULL, "DECAY_EXP2": False},
    "no diagonal loop": {**FULL, "DIAGONAL": False},
    "no off-diagonal blocks": {**FULL, "OFF_DIAGONAL": False},
    "loads and stores only": {**FULL, "OFF_DIAGONAL": False, "DIAGONAL": False},
}
#: The diagonal loop's forms (each computes the op's values).
LOOP_FORMS = {
    "run 24's arithmetic (masks on the products)": {**FULL, "OLD": True},
    "loop unrolled (static_range)": {**FULL, "LOOP": 1},
    "loop unrolled 4x (tl.range)": {**FULL, "LOOP": 2},
    "loop pipelined, 3 stages (tl.range)": {**FULL, "LOOP": 3},
}


@triton.jit
def diagonal_row(
    q, k, j, rows, g_sub, dq_acc, dk_acc,
    C: tl.constexpr, S: tl.constexpr, EXP: tl.constexpr, DECAY_EXP2: tl.constexpr, OLD: tl.constexpr,
):  # fmt: skip
    """Row j of the diagonal block's rank-1 loop: the op's arithmetic, or with OLD run 24's (the
    masks on the [S, BK] products, the exponent's two differences)."""
    qk_off, qs_base, ks_base, g_base, a_base, r0, i, T, H, K, sub, features = rows
    in_row = (features < K) & (r0 + j + features * 0 < T)  # a vector mask: the row check per column
    q_j = tl.load(q + qk_off + (r0 + j) * H * K + features, mask=in_row, other=0.0).to(tl.float32)
    k_j = tl.load(k + qk_off + (r0 + j) * H * K + features, mask=in_row, other=0.0).to(tl.float32)
    if EXP:
        row = tl.minimum(r0 + j, T - 1) * H
        q_j = tl.where(in_row, tl.exp(q_j - tl.load(qs_base + row)), 0.0)
        k_j = tl.where(in_row, tl.exp(k_j - tl.load(ks_base + row)), 0.0)
    q_j, k_j = q_j[None, :], k_j[None, :]
    g_j = tl.load(g_base + (r0 + j) * H * K + features, mask=features < K, other=0.0)[None, :]
    dA_col = tl.load(a_base + (r0 + sub) * H * C + i * S + j)[:, None]
    dA_row = tl.load(a_base + (r0 + j) * H * C + i * S + sub)[:, None]
    after = sub[:, None] >= j
    if OLD:
        exponent = tl.where(after, g_sub - g_j, g_j - g_sub)
    else:
        difference = g_sub - g_j
        exponent = tl.where(after, difference, -difference)
    if DECAY_EXP2:
        decay = tl.exp2(exponent)
    else:  # timing only: the same data flow without the special-function unit
        decay = exponent * 0.5 + 1.0
    if OLD:
        dq_acc += tl.where(after, dA_col * k_j * decay, 0.0)
        dk_acc += tl.where(sub[:, None] <= j, dA_row * q_j * decay, 0.0)
    else:
        dq_acc += tl.where(after, dA_col, 0.0) * k_j * decay
        dk_acc += tl.where(sub[:, None] <= j, dA_row, 0.0) * q_j * decay
    return dq_acc, dk_acc


@triton.jit
def grads_parts(
    q, k, qs, ks, gc, dA, dq_inter, dk_inter, dq, dk, dG, q_rowsum, k_rowsum, T, Tp, H, K, NB,
    C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
    EXP: tl.constexpr, OFF_DIAGONAL: tl.constexpr, DIAGONAL: tl.constexpr, DECAY_EXP2: tl.constexpr,
    OLD: tl.constexpr, LOOP: tl.constexpr,
):  # fmt: skip
    """`query_key_grad_kernel` as the op has it, its parts behind the switches (see the module)."""
    ik, pid, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, i = pid // (C // S), pid % (C // S)
    b, h = bh // H, bh % H
    qk_off = head_offset(bh, H, T, K)
    qs_base = qs + head_offset(bh, H, T, 1)
    ks_base = ks + head_offset(bh, H, T, 1)
    g_base = gc + head_offset(bh, H, Tp, K)
    a_base = dA + head_offset(bh, H, Tp, C)
    t0, r0, k0 = c * C, c * C + i * S, ik * BK
    dq_acc = load_rows(dq_inter + qk_off, r0, T, H * K, k0, K, S, BK)
    dk_through_state = load_rows(dk_inter + qk_off, r0, T, H * K, k0, K, S, BK)
    dk_acc = tl.zeros([S, BK], dtype=tl.float32)
    g_sub = load_rows(g_base, r0, Tp, H * K, k0, K, S, BK)
    g_first = load_row(g_base + r0 * H * K, 0, 1, k0, K, BK)
    g_final = load_row(g_base + (r0 + S - 1) * H * K, 0, 1, k0, K, BK)
    if OFF_DIAGONAL:
        dq_part = tl.zeros([S, BK], dtype=tl.float32)
        for j in range(i):
            s0 = t0 + j * S
            k_earlier = load_features(k + qk_off, ks_base, s0, T, H * K, k0, K, H, S, BK, EXP)
            g_earlier = load_rows(g_base, s0, Tp, H * K, k0, K, S, BK)
            k_ref = (k_earlier * tl.exp2(g_first[None, :] - g_earlier)).to(DOT)
            dA_block = load_rows(a_base, r0, Tp, H * C, j * S, C, S, S)
            dq_part += tl.dot(dA_block.to(DOT), k_ref, input_precision=PREC)
        dq_acc += tl.exp2(g_sub - g_first[None, :]) * dq_part
        dk_part = tl.zeros([S, BK], dtype=tl.float32)
        for j in range(i + 1, C // S):
            s0 = t0 + j * S
            q_later = load_features(q + qk_off, qs_base, s0, T, H * K, k0, K, H, S, BK, EXP)
            g_later = load_rows(g_base, s0, Tp, H * K, k0, K, S, BK)
            q_ref = (q_later * tl.exp2(g_later - g_final[None, :])).to(DOT)
            dA_block = load_rows_transposed(a_base, s0, Tp, H * C, i * S, C, S, S)
            dk_part += tl.dot(dA_block.to(DOT), q_ref, input_precision=PREC)
        dk_acc += tl.exp2(g_final[None, :] - g_sub) * dk_part
    q_sub = load_features(q + qk_off, qs_base, r0, T, H * K, k0, K, H, S, BK, EXP)
    k_sub = load_features(k + qk_off, ks_base, r0, T, H * K, k0, K, H, S, BK, EXP)
    if DIAGONAL:
        sub = tl.arange(0, S)
        features = k0 + tl.arange(0, BK)
        rows = (qk_off, qs_base, ks_base, g_base, a_base, r0, i, T, H, K, sub, features)
        if LOOP == 0:  # the op's
            for j in range(S):
                dq_acc, dk_acc = diagonal_row(q, k, j, rows, g_sub, dq_acc, dk_acc, C, S, EXP, DECAY_EXP2, OLD)
        elif LOOP == 1:
            for j in tl.static_range(S):
                dq_acc, dk_acc = diagonal_row(q, k, j, rows, g_sub, dq_acc, dk_acc, C, S, EXP, DECAY_EXP2, OLD)
        elif LOOP == 2:
            for j in tl.range(0, S, loop_unroll_factor=4):
                dq_acc, dk_acc = diagonal_row(q, k, j, rows, g_sub, dq_acc, dk_acc, C, S, EXP, DECAY_EXP2, OLD)
        else:
            for j in tl.range(0, S, num_stages=3):
                dq_acc, dk_acc = diagonal_row(q, k, j, rows, g_sub, dq_acc, dk_acc, C, S, EXP, DECAY_EXP2, OLD)
    dq_local = q_sub * dq_acc
    store_rows(dG + qk_off, dq_local - k_sub * dk_acc, r0, T, H * K, k0, K, S, BK)
    store_rows(dk_inter + qk_off, k_sub * dk_through_state, r0, T, H * K, k0, K, S, BK)
    dk_acc += dk_through_state
    dk_local = k_sub * dk_acc
    if EXP:
        dq_acc = dq_local
        dk_acc = dk_local
        rows_t = r0 + tl.arange(0, S)
        sums_off = ((ik.to(tl.int64) * NB + b) * T + rows_t) * H + h
        tl.store(q_rowsum + sums_off, tl.sum(dq_local, axis=1), mask=rows_t < T)
        tl.store(k_rowsum + sums_off, tl.sum(dk_local, axis=1), mask=rows_t < T)
    store_rows(dq + qk_off, dq_acc, r0, T, H * K, k0, K, S, BK)
    store_rows(dk + qk_off, dk_acc, r0, T, H * K, k0, K, S, BK)


def launch(parts, tensors, shifts, block, warps, stages):
    """One launch of `grads_parts`; returns the compiled kernel (its registers and spills)."""
    q, k, gc, dA, dq_inter, dk_inter, dq, dk, dG, rowsums = tensors
    B, T, H, K = q.shape
    features = feature_args(shifts, q)
    grid = (triton.cdiv(K, block), gc.shape[1] // CHUNK * (CHUNK // SUB_CHUNK), B * H)
    return grads_parts[grid](
        q, k, features["qs"], features["ks"], gc, dA, dq_inter, dk_inter, dq, dk, dG, *rowsums,
        T, gc.shape[1], H, K, B, C=CHUNK, S=SUB_CHUNK, BK=block, EXP=features["EXP"],
        num_warps=warps, num_stages=stages, **GATE_GRADIENT_PRODUCTS, **parts,
    )  # fmt: skip


def relative_difference(outputs, references) -> float:
    return max(((x.float() - r.float()).norm() / r.float().norm()).item() for x, r in zip(outputs, references))


def main():
    args, out = parse_args(
        __doc__,
        lambda parser: parser.add_argument("--parts", action="store_true", help="time the parts (run 24) instead"),
    )
    print("ncu (Nsight Compute) on this machine:", shutil.which("ncu"), flush=True)
    rows = []
    for (B, T, H, D), exp in itertools.product(SHAPES, (False, True)):
        op_options = launch_options("query_key_grad_kernel_safe_exp" if exp else "query_key_grad_kernel")
        (q, k, v, do), g = gla_inputs(B, T, H, D, 4)
        # The safe-exp shifts as ReGLA's feature map takes them: each row's maximum.
        shifts = SafeExpShifts(q.float().amax(-1), k.float().amax(-1)) if exp else None
        dims = dims_of(q, v)
        gc = gate_cumsum(g, dims)
        dA = intra_score_grads(do, v, D**-0.5, dims)
        dq_inter, dk_inter = (torch.randn(B, T, H, D, device="cuda") for _ in range(2))
        shape = dict(B=B, T=T, H=H, D=D, safe_exp=exp)
        reference = query_key_grads(q, k, gc, dA, dq_inter.clone(), dk_inter.clone(), dims, shifts)
        scratches = dq_inter.clone(), dk_inter.clone()  # overwritten on every repetition (as the op does)
        ms = timed(partial(query_key_grads, q, k, gc, dA, *scratches, dims, shifts))
        rows.append(dict(shape, variant="op", **op_options, ms=ms[0], p20=ms[1], p80=ms[2]))
        print(rows[-1], flush=True)
        block = min(D, QUERY_KEY_GRAD_COLUMNS)
        forms = PARTS if args.parts else {"full (the op's kernel)": FULL, **LOOP_FORMS}
        settings = [
            (name, parts, block, op_options["num_warps"], op_options["num_stages"]) for name, parts in forms.items()
        ]
        if (B, T, H, D) == SHAPES[0] and not args.parts:  # the op's form at other launch options
            settings += [
                ("full (the op's kernel)", FULL, block, warps, stages)
                for warps, stages in itertools.product((1, 2, 4), (1, 2))
                if (warps, stages) != (op_options["num_warps"], op_options["num_stages"])
            ]
        for name, parts, blk, warps, stages in settings:
            nblk = triton.cdiv(D, blk)
            dq, dk = (torch.empty(B, T, H, D, device="cuda", dtype=reference[0].dtype) for _ in range(2))
            dG, fresh = torch.empty(B, T, H, D, device="cuda"), dk_inter.clone()
            rowsums = [torch.empty(nblk, B, T, H, device="cuda") for _ in range(2)] if exp else [dG, dG]
            tensors = (q, k, gc, dA, dq_inter, fresh, dq, dk, dG, rowsums)
            setting = dict(shape, variant=name, block=blk, num_warps=warps, num_stages=stages)
            try:
                compiled = launch(parts, tensors, shifts, blk, warps, stages)
                same_values = parts["DIAGONAL"] and parts["OFF_DIAGONAL"] and parts["DECAY_EXP2"]
                diff = relative_difference((dq, dk, dG), reference[:3]) if same_values else None
                timing = timed(partial(launch, parts, tensors, shifts, blk, warps, stages))
            except Exception as error:  # e.g. out of registers or shared memory: a result to record
                rows.append(dict(setting, error=repr(error)[:200]))
                continue
            rows.append(
                dict(
                    setting,
                    ms=timing[0],
                    p20=timing[1],
                    p80=timing[2],
                    registers=compiled.n_regs,
                    spills=compiled.n_spills,
                    shared_bytes=compiled.metadata.shared,
                    rel_diff_from_op=diff,
                )
            )
            print(rows[-1], flush=True)
            # Written after every row: a call cut by its time limit keeps what it measured.
            pd.DataFrame(rows).to_parquet(out / "query_key_grad_profile.parquet", index=False)


if __name__ == "__main__":
    main()
