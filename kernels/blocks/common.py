"""What every Triton GLA building block shares: constants, launch options, the @triton.jit helpers for
tile loads and stores, and the host helpers of the launchers. Used by every module of
`kernels.blocks` and by the ops (`kernels.triton_gla`, `kernels.triton_gla_refined`, `kernels.triton_regla`;
`kernels.triton_recurrent` takes the host helpers and `head_offset`).

Layout: q, k, do: [B, T, H, K]; v, o: [B, T, H, V]; every tensor contiguous. The sequence is cut
into chunks of C = 64 positions; chunk c covers rows [c*C, c*C + C). `gc` holds the cumulative
log gate *within* each chunk, in fp32 and in log2 units (so every decay is one `exp2`), on a
time axis padded to a whole number of chunks (Tp) with zero log gates: padded rows then carry the
last real row's value, so every "to the chunk end" exponent is still a difference of a later
and an earlier cumulative gate, i.e. <= 0, and padded rows need no special case.

Exponents are only ever formed as b_later - b_earlier (<= 0) or masked to -inf before `exp2`,
so no gate value can overflow. Inside a chunk the pairwise decays exp2(b_t - b_s) are exact:
rows are handled in sub-chunks of S = 16; earlier sub-chunks are reached through one reference
row of cumulative gates (two factors, each <= 1, around a tensor-core product), the 16 x 16
diagonal block through pairwise decays in fp32, one row or column of the block at a time.

Matrix products take their operands in DOT, the input dtype on GPUs (bf16 on tensor cores; the one
exception is `qkv_grad.GATE_GRADIENT_PRODUCTS`); the launchers pass fp32 under Triton's CPU
interpreter, which evaluates bf16 products wrongly.

States between chunks are carried in fp32: [B, H, NT, K, V], written by one sequential pass over the
chunks (forward) and one in reverse (backward); everything else is parallel over chunks. The forward
stores them in the products' operand dtype (all its output reads), the backward in fp32.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

CHUNK = 64
SUB_CHUNK = 16
#: CUDA's limit on a launch grid's second and third axes: the value gate's segments as batch rows
#: (`kernels.value_gate`) and the recurrent kernels' batch rows × heads (`kernels.triton_recurrent`)
#: must fit under it.
MAX_GRID_AXIS = 65535
MAX_HEAD_DIM = 256
LOG2E = 1.0 / math.log(2.0)


#: Per-kernel launch options (num_warps, num_stages) by kernel name; Triton's defaults where
#: absent. Chosen by `benchmarks/tune_kernels.py` on the H200 (results/kernels/run5/tune_kernels.json:
#: fused ReGLA forward+backward 22.2 -> 18.4 ms at B4 T4096 H64 D128, 8.4 -> 6.8 ms at B16 T4096 H12 D64);
#: the score and chunk-state kernels' from the variant timings of their present forms
#: (`benchmarks/intra_scores_variants.py`, results/kernels/run18; `benchmarks/chunk_state_variants.py`, run20).
LAUNCH_OPTIONS: dict[str, dict[str, int]] = {
    "query_key_grad_kernel": dict(num_warps=1, num_stages=2),
    # The same kernel with safe-exp features (fp32 dq, dk, the shifts' row sums; 226 registers a
    # thread at 1 warp): 2 warps take 5.35 ms against 5.79 at 1 at B4 T4096 H64 D128; plain GLA
    # inputs stay fastest at 1 warp (4.25 against 4.31 ms) (results/kernels/run26).
    "query_key_grad_kernel_safe_exp": dict(num_warps=2, num_stages=2),
    "intra_scores_kernel": dict(num_warps=1, num_stages=1),
    "state_forward_kernel": dict(num_warps=4, num_stages=2),
    "query_key_inter_kernel": dict(num_warps=2, num_stages=2),
    "output_kernel": dict(num_warps=4, num_stages=2),
    "value_grad_kernel": dict(num_warps=2, num_stages=2),
    "state_backward_kernel": dict(num_warps=8, num_stages=3),
    "gate_grad_kernel": dict(num_warps=2, num_stages=2),
}


def launch_options(kernel_name: str) -> dict[str, int]:
    """The launch options of one kernel, read at launch time (so that tuning can change them)."""
    return LAUNCH_OPTIONS.get(kernel_name, {})


# ---------------------------------------------------------------------------------------------
# @triton.jit helpers


@triton.jit
def head_offset(bh, H, n_rows, row_width):
    """The per-program pointer setup of the kernels: the element offset (int64) of (b, h)'s first
    row, t = 0, in a contiguous [B, n_rows, H, row_width] tensor, where bh = b * H + h is the
    program index over batch*head. Rows of that head follow H * row_width elements apart.

    E.g. q + head_offset(bh, H, T, K) for q: [B, T, H, K], gc + head_offset(bh, H, Tp, K) for the
    padded gates, ks + head_offset(bh, H, T, 1) for per-row shifts [B, T, H].
    """
    b, h = bh // H, bh % H
    return (b.to(tl.int64) * n_rows * H + h) * row_width


@triton.jit
def load_rows(ptr, row0, n_rows, row_stride, col0, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """A [BR, BC] tile of rows row0.. and columns col0.. as fp32-ready values; zeros outside."""
    rows = row0 + tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_rows(ptr, value, row0, n_rows, row_stride, col0, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """Store a [BR, BC] tile at rows row0.. and columns col0.., in ptr's dtype; nothing outside."""
    rows = row0 + tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_rows_transposed(ptr, row0, n_rows, row_stride, col0, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """`load_rows`' tile as [BC, BR] (columns by rows), loaded in that layout rather than transposed
    in registers: a product that takes the tile as its left operand then needs no transpose (the
    chunk-state pass ran 2.2x faster so, results/kernels/run20)."""
    rows = row0 + tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    mask = (cols[:, None] < n_cols) & (rows[None, :] < n_rows)
    return tl.load(ptr + rows[None, :] * row_stride + cols[:, None], mask=mask, other=0.0)


@triton.jit
def load_row(ptr, row, n_rows, col0, n_cols, BC: tl.constexpr):
    """Columns col0.. of the row that `ptr` points at (a [BC] vector); zeros past n_cols, or
    everywhere when that row's index `row` is past n_rows."""
    cols = col0 + tl.arange(0, BC)
    return tl.load(ptr + cols, mask=(cols < n_cols) & (cols * 0 + row < n_rows), other=0.0)


@triton.jit
def load_features(
    ptr,
    shift,
    row0,
    n_rows,
    row_stride,
    col0,
    n_cols,
    shift_stride,
    BR: tl.constexpr,
    BC: tl.constexpr,
    EXP: tl.constexpr,
):
    """A [BR, BC] tile of q or k in fp32 (as `load_rows`); with EXP, the safe-exp features
    exp(x − shift_row) instead, zero outside. `shift` points at this (batch, head)'s per-row
    shifts, `shift_stride` apart. Features are formed here, on load, so they never exist in memory."""
    rows = row0 + tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if EXP:
        m = tl.load(shift + rows * shift_stride, mask=rows < n_rows, other=0.0)
        x = tl.where(mask, tl.exp(x - m[:, None]), 0.0)
    return x


@triton.jit
def load_features_transposed(
    ptr,
    shift,
    row0,
    n_rows,
    row_stride,
    col0,
    n_cols,
    shift_stride,
    BR: tl.constexpr,
    BC: tl.constexpr,
    EXP: tl.constexpr,
):
    """`load_features`' tile as [BC, BR] (features by positions), as `load_rows_transposed`."""
    x = load_rows_transposed(ptr, row0, n_rows, row_stride, col0, n_cols, BR, BC).to(tl.float32)
    if EXP:
        rows = row0 + tl.arange(0, BR)
        cols = col0 + tl.arange(0, BC)
        m = tl.load(shift + rows * shift_stride, mask=rows < n_rows, other=0.0)
        inside = (cols[:, None] < n_cols) & (rows[None, :] < n_rows)
        x = tl.where(inside, tl.exp(x - m[None, :]), 0.0)
    return x


# ---------------------------------------------------------------------------------------------
# Host helpers


def check_supported(q: Tensor, v: Tensor) -> None:
    """Head dims up to MAX_HEAD_DIM; offsets inside one batch element, and inside one head's chunk
    states, must fit in 32 bits.

    Args:
        q: [B, T, H, K].
        v: [B, T, H, V].

    Raises:
        ValueError: when the kernels cannot take these shapes.
    """
    _, T, H, K = q.shape
    V = v.shape[-1]
    if max(K, V) > MAX_HEAD_DIM:
        raise ValueError(f"the Triton GLA kernels support head dims up to {MAX_HEAD_DIM}; got K={K}, V={V}")
    padded_T = cdiv(T, CHUNK) * CHUNK
    if padded_T * H * max(K, V, CHUNK) >= 2**31:
        raise ValueError(
            f"T * H * max(K, V, {CHUNK}) must stay below 2^31 per batch element for the Triton "
            f"GLA kernels; got T={T}, H={H}, K={K}, V={V}: split the sequence or the heads"
        )
    # The chunk states of one head, [NT, K, V], are addressed in 32 bits inside the state passes.
    if cdiv(T, CHUNK) * K * V >= 2**31:
        raise ValueError(
            f"ceil(T / {CHUNK}) * K * V (one head's chunk states) must stay below 2^31 for the Triton "
            f"GLA kernels; got T={T}, K={K}, V={V}: split the sequence"
        )


def on_device_of(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for the host side. Triton 3.6's `triton.cdiv` and `triton.next_power_of_2` are
    constexpr functions that cost 4–6 µs a call on the host (against ~0.05 µs here; `python -m
    timeit -s "import triton" "triton.cdiv(1000, 64)"`), and the ops call them for every grid and
    block size: ~20 calls per forward and backward of a layer."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), for the host side (see `cdiv`)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the kernels write goes through here (tests swap in a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def reuse(buffer: Tensor) -> Tensor:
    """An output written into `buffer`, an input that each program reads before it stores into the
    same tile: one buffer less at the backward's peak. The tests swap it, as `empty`, for a fresh
    NaN-filled buffer of the same shape, so that an element a kernel leaves unwritten still shows
    (it would otherwise keep the input's finite value)."""
    return buffer


def block_size(dim: int) -> int:
    """Columns of one tile over a head dim."""
    # tl.dot needs every side >= 16; 64 keeps an fp32 [64, 64] state tile within registers.
    return min(64, max(16, next_power_of_2(dim)))


def dot_options(dtype: torch.dtype) -> dict:
    """Operand dtype and fp32 precision of the kernels' matrix products."""
    interpreted = (
        triton.knobs.runtime.interpret if hasattr(triton, "knobs") else os.environ.get("TRITON_INTERPRET") == "1"
    )
    # Triton's CPU interpreter evaluates bf16 products wrongly, so it gets fp32 operands.
    half_precision = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    operand = tl.float32 if interpreted else half_precision.get(dtype, tl.float32)
    # tf32x3: three tf32 passes, close to fp32 accuracy; ignored for bf16 operands.
    return dict(PREC="tf32x3" if operand == tl.float32 else "tf32", DOT=operand)


def operand_dtype(dims: Dims) -> torch.dtype:
    """The torch dtype of the matrix products' operands (`dot_options`' DOT): what a tensor that is
    only ever read as a product operand can be stored in without changing any result."""
    return {tl.bfloat16: torch.bfloat16, tl.float16: torch.float16}.get(dims.dot["DOT"], torch.float32)


class Dims(NamedTuple):
    """Sizes and tiling of one call, shared by all its launchers."""

    B: int
    T: int
    H: int
    K: int
    V: int
    NT: int  # chunks: the padded time axis has Tp = NT * CHUNK rows
    BK: int  # key columns per tile
    BV: int  # value columns per tile
    dot: dict  # the kernels' PREC and DOT arguments (`dot_options`)


def dims_of(q: Tensor, v: Tensor) -> Dims:
    """The `Dims` of a call with q: [B, T, H, K] and v: [B, T, H, V]; q's dtype sets the products' operands."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    return Dims(B, T, H, K, V, cdiv(T, CHUNK), block_size(K), block_size(V), dot_options(q.dtype))


class SafeExpShifts(NamedTuple):
    """Per-row shifts of ReGLA's safe-exp feature maps, [B, T, H] fp32 each: the kernels then read
    q and k as φ(q) = exp(q − query) and φ(k) = exp(k − key), formed on load."""

    query: Tensor
    key: Tensor


def feature_args(shifts: SafeExpShifts | None, placeholder: Tensor) -> dict:
    """The kernels' shift pointers and EXP switch (placeholders, never read, without features)."""
    if shifts is None:
        return dict(qs=placeholder, ks=placeholder, EXP=False)
    return dict(qs=shifts.query, ks=shifts.key, EXP=True)
