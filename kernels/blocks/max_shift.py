"""Max-shift gradient building block: the gradient through safe-exp's per-token max over features
(`kernels.safe_exp`), added to the gradient at fixed shifts in fp32 and rounded once.

Used by `kernels.triton_regla`: the two terms nearly cancel at the maxima, so rounding them to
the input dtype first would lose the difference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, empty, next_power_of_2

Tensor = torch.Tensor


@triton.jit
def max_shift_grad_kernel(x, grad, d_max, out, N, K, R: tl.constexpr, BK: tl.constexpr):
    """out = grad + d_max · 1[x = max x] / (number of ties), per row of K features: the gradient
    through a row max added to the gradient at a fixed max, in fp32, rounded once. torch's amax
    splits its gradient evenly between tied elements; so does this."""
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    cols = tl.arange(0, BK)
    inside = (rows[:, None] < N) & (cols[None, :] < K)
    offsets = rows[:, None] * K + cols[None, :]
    values = tl.load(x + offsets, mask=inside, other=float("-inf")).to(tl.float32)
    ties = (values == tl.max(values, axis=1)[:, None]) & inside
    count = tl.maximum(tl.sum(ties.to(tl.float32), axis=1), 1.0)
    share = tl.load(d_max + rows, mask=rows < N, other=0.0) / count
    total = tl.load(grad + offsets, mask=inside, other=0.0) + tl.where(ties, share[:, None], 0.0)
    tl.store(out + offsets, total.to(out.dtype.element_ty), mask=inside)


def add_max_gradient(x: Tensor, grad: Tensor, d_max: Tensor) -> Tensor:
    """The gradient of x through its per-token max over features, added to its gradient at a fixed max.

    Args:
        x: [B, T, H, K] contiguous, the raw q or k.
        grad: [B, T, H, K] fp32 contiguous, x's gradient at fixed shifts.
        d_max: [B, T, H] fp32, the gradient of x's per-token max, x.amax(-1).

    Returns:
        [B, T, H, K] in x's dtype: grad plus d_max shared evenly between each row's tied maxima.
    """
    out = empty(x.shape, x.dtype, x.device)
    n, K = x.numel() // x.shape[-1], x.shape[-1]
    rows = 16
    max_shift_grad_kernel[(cdiv(n, rows),)](x, grad, d_max.contiguous(), out, n, K, R=rows, BK=next_power_of_2(K))
    return out
