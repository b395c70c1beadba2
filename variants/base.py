"""The contracts every plugin follows. Three small module types, one per registry axis.

Feature map  `FeatureMap(head_dim, num_heads, **options)`
    forward(x [B, T, H, K], role "q" | "k", state=None) -> FeatureOutput
    `feature_dim` is the output size F; `kernel_scale` the scale handed to the attention op;
    `fused_kernel()` a `kernels.fusion` description when the fused ops can form the features.
Norm         `OutputNorm(head_dim, num_heads, **options)`
    forward(o [B, T, H, V]) -> [B, T, H, V]; `uses_denominator` asks the op to divide by q·z;
    with `scales_eps`, forward(o, log_scale=[B, T, H, 1]) puts its eps in the unshifted frame;
    `fused_kernel()` a `kernels.fusion` description when the fused decoding step can apply it.
Gate         `Gate(d_model, num_heads, key_dim, value_dim, **options)`
    forward(x [B, T, D], x_prev [B, 1, D] | None) -> GateOutput with log-space decays <= 0
    on the key side [B, T, H, K or 1] and/or the value side [B, T, H, V or 1], an optional
    input scale for the keys [B, T, H, 1], and the raw activations for the saturation probes;
    `fused_kernel()` a `kernels.fusion` description when the fused ops can compute the gate.

Options are keyword-only constructor arguments; the registry validates them and lists them
in its errors. Each plugin class gets `registry_name` and `version` from its decorator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kernels.fusion import IdentityKernel, RefiningGateKernel, RMSNormKernel, SafeExpKernel, SigmoidGateKernel

Tensor = torch.Tensor


@dataclass
class FeatureOutput:
    features: Tensor  # [B, T, H, F]
    log_decay: Tensor | None = None  # [B, T, H, 1]: extra key-side decay (max rescaling), <= 0
    state: Any = None  # carried between decoding steps (e.g. a running max)
    #: [B, T, H, 1]: what the map subtracted inside its exponent for numerical range (features
    #: = exp(x − shift)), so the layer can give an output norm's eps the unshifted frame
    shift: Tensor | None = None


@dataclass
class GateOutput:
    log_k: Tensor | None = None  # [B, T, H, K] or [B, T, H, 1], <= 0
    log_v: Tensor | None = None  # [B, T, H, V] or [B, T, H, 1], <= 0
    input_scale: Tensor | None = None  # [B, T, H, 1]: multiplies the keys (gated RFA's 1 - g)
    activations: dict[str, Tensor] = field(default_factory=dict)  # values in (0, 1], for probes
    preactivations: dict[str, Tensor] = field(default_factory=dict)  # logits, for gradient probes


class FeatureMap(nn.Module):
    """Base class: maps per-head queries/keys to features phi(x)."""

    #: phi(q)·phi(k) >= 0 for all inputs, required by the denominator normalisation.
    positive_kernel: bool = False
    #: output at position t depends on inputs <= t only.
    causal: bool = True
    #: set by the layer where its norm cancels the features' shifts exactly (`FeatureOutput.shift`:
    #: a per-head norm with its eps in the unshifted frame): a feature map that shifts its inputs
    #: then passes no gradient through the shifts, which is exact there and keeps a low-precision
    #: backward from summing large terms that cancel.
    detach_shifts: bool = False
    #: the composed path runs the attention op on these features in fp32 at least (bf16 models
    #: included): exponential features span many orders of magnitude, and the op's gradients with
    #: respect to them, rounded to bf16, left q_proj's and k_proj's gradients wrong by O(1) (the
    #: fused op keeps them in fp32 itself)
    needs_fp32_op: bool = False

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.feature_dim = head_dim

    @property
    def kernel_scale(self) -> float:
        return 1.0

    def fused_kernel(self) -> SafeExpKernel | IdentityKernel | None:
        """How the fused attention op forms these features inside its kernels (a description from
        `kernels.fusion`), or None when it cannot: the layer then takes the composed path."""
        return None

    def forward(self, x: Tensor, role: str, state: Any = None) -> FeatureOutput:  # pragma: no cover
        raise NotImplementedError


class OutputNorm(nn.Module):
    """Base class: normalises the attention output per token."""

    uses_denominator: bool = False
    #: True when forward takes `log_scale` [B, T, H, 1], the log of the factor by which o is scaled
    #: against the frame the norm's eps is meant for (safe-exp's shifts): eps is then scaled by
    #: exp(2 log_scale), so the shifts cancel exactly, eps included
    scales_eps: bool = False

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads

    def fused_kernel(self) -> RMSNormKernel | None:
        """How the fused decoding step applies this norm (a description from `kernels.fusion`), or
        None when it cannot: the layer then normalises the output itself."""
        return None


class Gate(nn.Module):
    """Base class: produces log-space decays from the layer input."""

    #: Option sets that start the gate far from its default, e.g. saturated open and closed. The
    #: shared contract tests (tests/test_variants.py) build the gate with each of them as well as
    #: with its defaults; a gate that declares none is tested with its defaults only.
    extreme_options: tuple[dict[str, Any], ...] = ()

    def __init__(self, d_model: int, num_heads: int, key_dim: int, value_dim: int):
        super().__init__()
        self.d_model = d_model
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = value_dim

    def fused_kernel(self) -> RefiningGateKernel | SigmoidGateKernel | None:
        """How the fused attention op computes this gate inside its kernels (a description from
        `kernels.fusion`), or None when it cannot: the layer then takes the composed path."""
        return None

    def forward(self, x: Tensor, x_prev: Tensor | None = None) -> GateOutput:  # pragma: no cover
        raise NotImplementedError
