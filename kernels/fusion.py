"""What the fused ops can compute inside their kernels, as plain descriptions that feature maps,
gates and norms hand to a layer.

A plugin opts in to the fused paths by returning one of these from its `fused_kernel()` method
(the base classes return None: the composed path). The layer asks the plugins rather than
checking their classes, so a third-party plugin whose math is one of these gets the fused kernels
too, and one that is not keeps the composed path. Each op takes the descriptions it computes:

- the chunked ReGLA op (`kernels.triton_regla`): `SafeExpKernel` with `RefiningGateKernel` (its
  formula inside the gate scan) or `SigmoidGateKernel` (logσ(a)/τ formed by the layer, the op's
  given log gate; with `scales_keys`, σ(−a) on v), and
  `RMSNormKernel` in its output kernel's epilogue (with the swish output gate, when the layer has one);
- the single-token decoding step (`kernels.triton_decode`): `SafeExpKernel` or `IdentityKernel`,
  `RefiningGateKernel` or `SigmoidGateKernel`, and `RMSNormKernel`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .safe_exp import KEY_MAX_SCOPES

Tensor = torch.Tensor

__all__ = ["IdentityKernel", "RMSNormKernel", "RefiningGateKernel", "SafeExpKernel", "SigmoidGateKernel"]


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


@dataclass(frozen=True)
class IdentityKernel:
    """φ(x) = x (plain gated linear attention, GLA's feature map)."""


@dataclass(frozen=True)
class SigmoidGateKernel:
    """GLA's key-side gate, log α = logσ(a) / τ, clamped below at `log_clamp`, from the logits a.

    Args:
        logits: `(x [B, T, D], x_prev [B, 1, D] | None) -> a`, [B, T, H, K] or [B, T, H, 1]: the
            plugin's own projection.
        tau: the temperature τ > 0.
        log_clamp: lower bound of log α (None: unclamped).
        scales_keys: gated RFA's form: the keys' features also multiplied by 1 − σ(a) = σ(−a)
            (`GateOutput.input_scale`); needs a per-head a ([B, T, H, 1]). A per-token, per-head
            factor on φ(k) is the same factor on the state's outer products, so the layer applies
            it to v (and to a denominator's ones column) before the op.
    """

    logits: Callable[[Tensor, Tensor | None], Tensor]
    tau: float = 1.0
    log_clamp: float | None = None
    scales_keys: bool = False

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"SigmoidGateKernel.tau must be positive; got {self.tau}")


@dataclass(frozen=True, eq=False)
class RMSNormKernel:
    """A per-head RMSNorm of the attention output, o / sqrt(mean(o²) + eps) · weight.

    Args:
        eps: the norm's eps (>= 0); the layer may put it in the unshifted frame of safe-exp's
            shifts (its `norm_eps_frame` option), as the norm's own forward does with `log_scale`.
        weight: [V] (shared by the heads), or None for no affine weight.
    """

    eps: float
    weight: Tensor | None = None

    def __post_init__(self) -> None:
        if not self.eps >= 0:
            raise ValueError(f"RMSNormKernel.eps must be >= 0; got {self.eps}")
