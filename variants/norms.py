"""Built-in normalisations of the attention output (REGLA.md §2, "Normalization").

The paper places a NORM block on the attention output, replacing or complementing the
denominator of classic linear attention; which norm, per head or full width, is not stated.
All are offered; `denominator` can also be combined with any other norm through the attention
config's `denominator: true` switch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fusion import RMSNormKernel

from .base import OutputNorm
from .registry import Registry

Tensor = torch.Tensor

NORMS: Registry[OutputNorm] = Registry("norm", "regla.norms")
norm = NORMS.register


@norm("none")
class NoNorm(OutputNorm):
    """o_t unchanged."""

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__(head_dim, num_heads)

    def forward(self, o: Tensor) -> Tensor:
        return o


@norm("denominator")
class Denominator(OutputNorm):
    """h_t = S_t phi(q_t) / (c_tᵀ phi(q_t)) (Katharopoulos 2020; gated: Peng 2021), no other norm."""

    uses_denominator = True

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__(head_dim, num_heads)

    def forward(self, o: Tensor) -> Tensor:
        return o


def unit_rows(x: Tensor, eps: float, log_scale: Tensor) -> tuple[Tensor, Tensor]:
    """x [.., V] divided by a per-row scale s, and the eps of the unshifted frame,
    eps_t = eps · exp(2 log_scale), divided by s²: a norm of the two equals the norm of x with
    eps_t, but never squares a tiny x. In safe-exp's shifted frame the attention output is as
    small as e^-(shifts) (under a closed gate, the state holds only recent keys, and their
    features exp(k − running max) can be far below 1): mean(x²) underflowed, or the backward of
    rsqrt (mean^-3/2) overflowed from mean(x²) ~ 1e-26 on, in fp32 and bf16.

    s is the row's largest magnitude, or sqrt(eps_t) where that is larger, chosen in log space:
    then either mean((x/s)²) >= 1/V or eps_t/s² = 1, so the sum under the root lies in [1/V, 2]
    however small or large x and eps_t are, and nothing needs a cap. s is detached: the
    normalised output does not depend on it (exact, not an approximation); eps_t/s² keeps its
    gradient with respect to log_scale. A zero row stays zero."""
    log_magnitude = x.detach().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny).log()
    if not eps > 0:
        return x * torch.exp(-log_magnitude), torch.zeros_like(log_magnitude)
    log_eps = math.log(eps) + 2 * log_scale.to(x.dtype)
    log_s = torch.maximum(log_magnitude, 0.5 * log_eps.detach())
    return x * torch.exp(-log_s), torch.exp(log_eps - 2 * log_s)


class _PerHeadOrFullWidth(OutputNorm):
    def __init__(self, head_dim: int, num_heads: int, per_head: bool, eps: float, affine: bool):
        super().__init__(head_dim, num_heads)
        # Per head, a per-token, per-head factor on o is a factor on what is normalised: eps can
        # follow it. Full width mixes heads with different factors, which no eps can undo.
        self.scales_eps = per_head
        self.per_head = per_head
        self.eps = eps
        # Per-head norms share one weight across heads (as fla's GLA does); full width has its own.
        width = head_dim if per_head else head_dim * num_heads
        self.normalized_shape = (width,)
        self.weight = nn.Parameter(torch.ones(width)) if affine else None

    def _normalize(self, o: Tensor, fn) -> Tensor:
        if self.per_head:
            return fn(o)
        B, T, H, V = o.shape
        return fn(o.reshape(B, T, H * V)).reshape(B, T, H, V)


@norm("rmsnorm")
class RMSNorm(_PerHeadOrFullWidth):
    """o / rms(o) · w, per head by default (fla GLA's per-head RMSNorm)."""

    def __init__(self, head_dim: int, num_heads: int, *, per_head: bool = True, eps: float = 1e-5, affine: bool = True):
        super().__init__(head_dim, num_heads, per_head, eps, affine)

    def fused_kernel(self) -> RMSNormKernel | None:
        """The fused decoding step and the fused op's epilogue normalise each head's output themselves;
        full width is not per head."""
        return RMSNormKernel(self.eps, self.weight) if self.per_head else None

    def forward(self, o: Tensor, log_scale: Tensor | None = None) -> Tensor:
        if log_scale is None or not self.per_head:
            return self._normalize(o, lambda x: F.rms_norm(x, self.normalized_shape, self.weight, self.eps))
        x, eps = unit_rows(o.to(torch.promote_types(o.dtype, torch.float32)), self.eps, log_scale)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return (x if self.weight is None else x * self.weight).to(o.dtype)


@norm("layernorm")
class LayerNorm(_PerHeadOrFullWidth):
    """(o − mean) / std · w + b, per head by default."""

    def __init__(self, head_dim: int, num_heads: int, *, per_head: bool = True, eps: float = 1e-5, affine: bool = True):
        super().__init__(head_dim, num_heads, per_head, eps, affine)
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape)) if affine else None

    def forward(self, o: Tensor, log_scale: Tensor | None = None) -> Tensor:
        if log_scale is None or not self.per_head:
            return self._normalize(
                o, lambda x: F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            )
        return affine(standardize(o, self.eps, log_scale), self.weight, self.bias)


@norm("groupnorm")
class GroupNorm(OutputNorm):
    """GroupNorm with one group per head: statistics per head, affine per channel (H·V weights),
    as in RetNet's output norm."""

    def __init__(self, head_dim: int, num_heads: int, *, eps: float = 1e-5, affine: bool = True):
        super().__init__(head_dim, num_heads)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim)) if affine else None

    scales_eps = True

    def forward(self, o: Tensor, log_scale: Tensor | None = None) -> Tensor:
        if log_scale is None:
            normalized = F.layer_norm(o, (self.head_dim,), eps=self.eps)
        else:
            normalized = standardize(o, self.eps, log_scale)
        return affine(normalized, self.weight, self.bias)


def standardize(o: Tensor, eps: float, log_scale: Tensor | None = None) -> Tensor:
    """(o − mean) / sqrt(var + eps) over the last dimension, in fp32 at least; with `log_scale`,
    eps in that frame (eps · exp(2 log_scale)), through `unit_rows`."""
    x = o.to(torch.promote_types(o.dtype, torch.float32))
    if log_scale is not None:
        x, eps = unit_rows(x, eps, log_scale)
    centred = x - x.mean(-1, keepdim=True)
    return (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)).to(o.dtype)


def affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is None:
        return x
    return x * weight + bias
