"""What the fused ReGLA op (`kernels.triton_regla`) can compute inside its kernels, as plain
descriptions that feature maps and gates hand to a layer.

A feature map or gate plugin opts in to the fused path by returning one of these from its
`fused_kernel()` method (the base classes return None: the composed path). The layer asks the
plugins rather than checking their classes, so a third-party plugin whose math is one of these
gets the fused kernel too, and one that is not keeps the composed path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .safe_exp import KEY_MAX_SCOPES

Tensor = torch.Tensor

__all__ = ["RefiningGateKernel", "SafeExpKernel"]


@dataclass(frozen=True)
class SafeExpKernel:
    """φ(q) = exp(q − max q) · query_factor and φ(k) = exp(k − m), formed as q and k are loaded.

    Args:
        key_max: the scope of the key shift m ("sequence", "chunk" or "running"), as
            `kernels.safe_exp.key_shifts` computes it; a non-constant m rescales the state.
        chunk_size: the chunk of the "chunk" scope.
        query_factor: a constant multiplying φ(q) (applied as part of the op's scale).
    """

    key_max: str = "running"
    chunk_size: int = 64
    query_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.key_max not in KEY_MAX_SCOPES:
            raise ValueError(f"SafeExpKernel.key_max must be one of {', '.join(KEY_MAX_SCOPES)}; got {self.key_max!r}")
        if self.chunk_size < 1:
            raise ValueError(f"SafeExpKernel.chunk_size must be >= 1; got {self.chunk_size}")


@dataclass(frozen=True)
class RefiningGateKernel:
    """The key-side refining gate, log F = (log σ(a) + log(σ(a) + 2σ(b)(1 − σ(a)))) / τ, clamped
    below at `log_clamp`, computed in the gate-scan kernel from the two logits a (gate) and b
    (refine).

    Args:
        logits: `(x [B, T, D], x_prev [B, 1, D] | None) -> (a, b)`, each [B, T, H, K] or
            [B, T, H, 1]: the plugin's own projections, so their parameters get gradients.
        tau: the temperature τ > 0.
        log_clamp: lower bound of log F (None: unclamped).
    """

    logits: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]
    tau: float = 1.0
    log_clamp: float | None = -8.0

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"RefiningGateKernel.tau must be positive; got {self.tau}")
