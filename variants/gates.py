"""Built-in forget gates, all returning log-space decays <= 0 (REGLA.md §1–2).

Shared switches of the learnable gates (recorded with every result):
- `axis`: which side of the state the gate decays, "key" (fla's chunk_gla convention, the
  default) or "value" (the literal reading of the refining-gate formula, F 1ᵀ ⊙ S);
- `rank`: None for a full-rank projection, or a low-rank bottleneck (GLA uses 16);
- `bias_init`: a constant, a [low, high] range drawn uniformly, or "uniform_gate" (UR-LSTM's
  init, Gu et al. 2020: gate activations spread uniformly in [1/n, 1 − 1/n]); extreme values
  (e.g. 6.0) give the saturated start of the paper's Fig. 4 experiment;
- `input`: "x" (the layer input x_t) or "x_shift" (the previous token's x_{t-1});
- `log_clamp`: lower bound on the log decay (None: none); keeps the kernels' exponents bounded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fusion import RefiningGateKernel, SigmoidGateKernel

from .base import Gate, GateOutput
from .registry import Registry

Tensor = torch.Tensor

GATES: Registry[Gate] = Registry("gate", "regla.gates")
gate = GATES.register

AXES = ("key", "value")
INPUTS = ("x", "x_shift")
BiasInit = float | Sequence[float] | str


def initialise_bias(bias: Tensor, spec: BiasInit) -> None:
    """Fill a gate bias from a constant, a [low, high] uniform range, or "uniform_gate"."""
    with torch.no_grad():
        if isinstance(spec, str):
            if spec != "uniform_gate":
                raise ValueError(f"bias_init must be a number, [low, high], or 'uniform_gate'; got {spec!r}")
            n = bias.numel()
            u = torch.rand(n) * (1 - 2 / max(n, 3)) + 1 / max(n, 3)
            bias.copy_(torch.logit(u).reshape(bias.shape))
        elif isinstance(spec, (int, float)):
            bias.fill_(float(spec))
        elif len(spec) == 2 and spec[0] <= spec[1]:
            bias.uniform_(float(spec[0]), float(spec[1]))
        else:
            raise ValueError(
                f"bias_init must be a number, [low, high] with low <= high, or 'uniform_gate'; got {spec!r}"
            )


class GateProjection(nn.Module):
    """x [B, T, D] -> logits [B, T, H, n]: full rank, or through a rank-r bottleneck."""

    def __init__(self, d_model: int, num_heads: int, width: int, rank: int | None, bias_init: BiasInit):
        super().__init__()
        if rank is not None and rank < 1:
            raise ValueError(f"gate rank must be a positive integer or null (full rank); got {rank}")
        self.num_heads, self.width = num_heads, width
        out = num_heads * width
        self.down = nn.Linear(d_model, rank, bias=False) if rank else None
        self.up = nn.Linear(rank or d_model, out, bias=True)
        initialise_bias(self.up.bias, bias_init)

    def forward(self, x: Tensor) -> Tensor:
        h = self.down(x) if self.down is not None else x
        return self.up(h).unflatten(-1, (self.num_heads, self.width))


class ProjectedGate(Gate):
    """Common machinery of the learnable gates: options, input selection, clamping."""

    #: Biases that start the gate saturated open, closed, and spread over both (the paper's
    #: saturation experiment starts there).
    extreme_options = ({"bias_init": 6.0}, {"bias_init": -6.0}, {"bias_init": [-3.0, 3.0]})

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        key_dim: int,
        value_dim: int,
        *,
        axis: str,
        rank: int | None,
        input: str,
        log_clamp: float | None,
        tau: float = 1.0,
    ):
        super().__init__(d_model, num_heads, key_dim, value_dim)
        name = type(self).registry_name
        if tau <= 0:
            raise ValueError(f"gate {name!r}: tau must be positive; got {tau}")
        if axis not in AXES:
            raise ValueError(f"gate {name!r}: axis must be one of {', '.join(AXES)}; got {axis!r}")
        if input not in INPUTS:
            raise ValueError(f"gate {name!r}: input must be one of {', '.join(INPUTS)}; got {input!r}")
        if log_clamp is not None and not log_clamp < 0:
            raise ValueError(f"gate {name!r}: log_clamp must be negative or null; got {log_clamp}")
        self.axis, self.rank, self.input, self.log_clamp, self.tau = axis, rank, input, log_clamp, tau
        self.width = key_dim if axis == "key" else value_dim

    def select_input(self, x: Tensor, x_prev: Tensor | None) -> Tensor:
        if self.input == "x":
            return x
        first = x_prev if x_prev is not None else torch.zeros_like(x[:, :1])
        return torch.cat([first, x[:, :-1]], dim=1)

    def clamp(self, log_gate: Tensor) -> Tensor:
        return log_gate if self.log_clamp is None else log_gate.clamp_min(self.log_clamp)

    def on_axis(self, log_gate: Tensor, **extra) -> GateOutput:
        if self.axis == "key":
            return GateOutput(log_k=log_gate, **extra)
        return GateOutput(log_v=log_gate, **extra)


@gate("none")
class NoGate(Gate):
    """S_t = S_{t-1} + v_t phi(k_t)ᵀ: ungated linear attention (Katharopoulos 2020)."""

    def __init__(self, d_model: int, num_heads: int, key_dim: int, value_dim: int):
        super().__init__(d_model, num_heads, key_dim, value_dim)

    def forward(self, x: Tensor, x_prev: Tensor | None = None) -> GateOutput:
        return GateOutput()


@gate("scalar")
class ScalarGate(ProjectedGate):
    """Gated RFA (Peng et al. 2021): g_t = σ(w_gᵀ x_t + b) per head,
    S_t = g_t S_{t-1} + (1 − g_t) v_t phi(k_t)ᵀ, c_t = g_t c_{t-1} + (1 − g_t) phi(k_t)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        key_dim: int,
        value_dim: int,
        *,
        bias_init: BiasInit = 0.0,
        input: str = "x",
        log_clamp: float | None = None,
    ):
        super().__init__(
            d_model, num_heads, key_dim, value_dim, axis="key", rank=None, input=input, log_clamp=log_clamp
        )
        self.proj = GateProjection(d_model, num_heads, 1, None, bias_init)

    def fused_kernel(self) -> SigmoidGateKernel:
        """A sigmoid gate per head (τ = 1) whose 1 − g also scales the keys: the fused op and the
        fused decoding step compute it from its logits."""
        return SigmoidGateKernel(self.logits, tau=1.0, log_clamp=self.log_clamp, scales_keys=True)

    def logits(self, x: Tensor, x_prev: Tensor | None = None) -> Tensor:
        """The gate logits [B, T, H, 1]."""
        return self.proj(self.select_input(x, x_prev))

    def forward(self, x: Tensor, x_prev: Tensor | None = None) -> GateOutput:
        logits = self.logits(x, x_prev)  # [B, T, H, 1]
        log_g = self.clamp(F.logsigmoid(logits))
        return GateOutput(
            log_k=log_g,
            input_scale=torch.sigmoid(-logits),
            activations={"g": log_g.exp()},
            preactivations={"g": logits},
        )


@gate("fixed_decay")
class FixedDecay(Gate):
    """RetNet's constant per-head decay (Sun et al. 2023): γ_h = 1 − 2^(−5−h), S_t = γ_h S_{t-1} + v_t k_tᵀ."""

    def __init__(self, d_model: int, num_heads: int, key_dim: int, value_dim: int):
        super().__init__(d_model, num_heads, key_dim, value_dim)
        gammas = 1 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64))
        self.register_buffer("log_gamma", gammas.log().float().reshape(num_heads, 1), persistent=False)

    def forward(self, x: Tensor, x_prev: Tensor | None = None) -> GateOutput:
        B, T, _ = x.shape
        log_g = self.log_gamma.to(x.dtype).expand(B, T, self.num_heads, 1)
        return GateOutput(log_k=log_g, activations={"g": log_g.exp()})


#: GLA's decay at initialisation: σ(0)^(1/16) ≈ 0.958 per step (logsigmoid / τ, τ = 16; Yang et al. 2024).
GLA_INITIAL_DECAY = 0.5 ** (1 / 16)
#: The bias that makes each of Fast Decay's two sigmoids √GLA_INITIAL_DECAY ≈ 0.979, so that their
#: product, the decay per step, starts where GLA's does (≈ 3.82).
FAST_DECAY_BIAS = math.log(math.sqrt(GLA_INITIAL_DECAY) / (1 - math.sqrt(GLA_INITIAL_DECAY)))


@gate("fast_decay", version=2)
class FastDecay(ProjectedGate):
    """Mao (2022): G_t = σ(W_z x_t + b_z) σ(W_f x_t + b_f)ᵀ, an outer product of a value-side and a
    key-side sigmoid: S_t = G_t ⊙ S_{t-1} + v_t k_tᵀ. Both sides are returned as log decays.

    Initialisation: with zero biases the decay starts at σ(0)² = 0.25 per step, forgetting almost
    everything, while GLA starts at ≈ 0.958; that handicaps the baseline. The paper does not
    state an init, so both biases start at FAST_DECAY_BIAS ≈ 3.82, which makes the product start
    at GLA's initial decay (`bias_init: 0.0` restores zero biases)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        key_dim: int,
        value_dim: int,
        *,
        rank: int | None = None,
        bias_init: BiasInit = FAST_DECAY_BIAS,
        input: str = "x",
        log_clamp: float | None = None,
    ):
        super().__init__(
            d_model, num_heads, key_dim, value_dim, axis="key", rank=rank, input=input, log_clamp=log_clamp
        )
        self.key_proj = GateProjection(d_model, num_heads, key_dim, rank, bias_init)
        self.value_proj = GateProjection(d_model, num_heads, value_dim, rank, bias_init)

    def forward(self, x: Tensor, x_prev: Tensor | None = None) -> GateOutput:
        h = self.select_input(x, x_prev)
        f_logits, z_logits = self.key_proj(h), self.value_proj(h)
        log_f, log_z = self.clamp(F.logsigmoid(f_logits)), self.clamp(F.logsigmoid(z_logits))
        return GateOutput(
            log_k=log_f,
            log_v=log_z,
            activations={"f": log_f.exp(), "z": log_z.exp()},
            preactivations={"f": f_logits, "z": z_logits},
        )


@gate("gla")
class GLAGate(ProjectedGate):
    """GLA (Yang et al. 2024, fla's layer): α_t = σ(W₂W₁x_t + b)^(1/τ), τ = 16, rank 16, key dim."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        key_dim: int,
        value_dim: int,
        *,
        rank: int | None = 16,
        tau: float = 16.0,
        bias_init: BiasInit = 0.0,
        axis: str = "key",
        input: str = "x",
        log_clamp: float | None = None,
    ):
        super().__init__(
            d_model, num_heads, key_dim, value_dim, axis=axis, rank=rank, input=input, log_clamp=log_clamp, tau=tau
        )
        self.proj = GateProjection(d_model, num_heads, self.width, rank, bias_init)

    def fused_kernel(self) -> SigmoidGateKernel | None:
        """The fused decoding step computes this gate from its logits when it acts on the keys."""
        if self.axis != "key":
            return None
        return SigmoidGateKernel(self.logits, tau=self.tau, log_clamp=self.log_clamp)

    def logits(self, x: Tensor, x_prev: Tensor | None = None) -> Tensor:
        """The gate logits [B, T, H, width]: what a fused kernel takes instead of log α."""
        return self.proj(self.select_input(x, x_prev))

    def forward(self, x: Tensor, x_prev: Tensor | None = None) -> GateOutput:
        logits = self.logits(x, x_prev)
        log_alpha = self.clamp(F.logsigmoid(logits) / self.tau)
        return self.on_axis(log_alpha, activations={"alpha": log_alpha.exp()}, preactivations={"alpha": logits})


@gate("refined", version=2)
class RefinedGate(ProjectedGate):
    """ReGLA's refining gate (the refine gate of Gu et al. 2020; REGLA.md §2):
    g_t = σ(W_g x_t + b_g), r_t = σ(W_r x_t + b_r),
    F_t = (1 − r_t) ⊙ g_t² + r_t ⊙ (1 − (1 − g_t)²),  S_t = (F_t 1ᵀ) ⊙ S_{t-1} + v_t phi(k_t)ᵀ.
    Computed in log space as log F = log g + log(g + 2r(1 − g)) (the same F, factored), then / τ,
    clamped at `log_clamp` from below."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        key_dim: int,
        value_dim: int,
        *,
        rank: int | None = None,
        tau: float = 1.0,
        bias_init: BiasInit = "uniform_gate",
        refine_bias_init: BiasInit = 0.0,
        axis: str = "key",
        input: str = "x",
        log_clamp: float | None = -8.0,
    ):
        super().__init__(
            d_model, num_heads, key_dim, value_dim, axis=axis, rank=rank, input=input, log_clamp=log_clamp, tau=tau
        )
        self.gate_proj = GateProjection(d_model, num_heads, self.width, rank, bias_init)
        self.refine_proj = GateProjection(d_model, num_heads, self.width, rank, refine_bias_init)

    def fused_kernel(self) -> RefiningGateKernel | None:
        """The fused op computes this gate from its two logits when it acts on the keys."""
        if self.axis != "key":
            return None
        return RefiningGateKernel(self.logits, tau=self.tau, log_clamp=self.log_clamp)

    def logits(self, x: Tensor, x_prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The gate and refine logits [B, T, H, width]: what a fused kernel takes instead of log F."""
        h = self.select_input(x, x_prev)
        return self.gate_proj(h), self.refine_proj(h)

    def forward(self, x: Tensor, x_prev: Tensor | None = None) -> GateOutput:
        g_logits, r_logits = self.logits(x, x_prev)
        # At least fp32: in bf16 the rounding of F near 1 reaches log F ~ +5e-3, a growing state.
        dtype = torch.promote_types(g_logits.dtype, torch.float32)
        a, b = g_logits.to(dtype), r_logits.to(dtype)
        g, r = torch.sigmoid(a), torch.sigmoid(b)
        tiny = torch.finfo(dtype).tiny
        log_f = F.logsigmoid(a) + torch.log((g + 2 * r * (1 - g)).clamp_min(tiny))
        # F <= 1 exactly, but round-off near g = 1 can leave log F a hair above 0.
        log_f = self.clamp(log_f.clamp_max(0.0) / self.tau).to(g_logits.dtype)
        return self.on_axis(
            log_f,
            activations={"g": g.to(g_logits.dtype), "r": r.to(g_logits.dtype), "F": log_f.exp()},
            preactivations={"g": g_logits, "r": r_logits},
        )


def refined_gate_value(g: Tensor, r: Tensor) -> Tensor:
    """F = (1 − r) g² + r (1 − (1 − g)²), written literally (tests compare the log form with it)."""
    return (1 - r) * g * g + r * (1 - (1 - g) ** 2)


__all__ = ["GATES", "gate", "refined_gate_value", "initialise_bias"]
