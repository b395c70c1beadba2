"""Built-in feature maps phi applied per head to queries and keys (REGLA.md §1–2)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fusion import IdentityKernel, SafeExpKernel
from kernels.safe_exp import KEY_MAX_SCOPES, key_shifts, query_shift

from .base import FeatureMap, FeatureOutput
from .registry import Registry

Tensor = torch.Tensor

FEATURE_MAPS: Registry[FeatureMap] = Registry("feature map", "regla.feature_maps")
feature_map = FEATURE_MAPS.register


def variance_reduction_factor(head_dim: int) -> float:
    """ReGLA's 1 / (e · sqrt(d (e² − 1))): for x, y ~ N(0, I_d), Var[Σ e^{x_i} e^{y_i}] = d e² (e² − 1),
    so this factor gives the exponential inner product unit variance, as 1/sqrt(d) does for x·y."""
    e = math.e
    return 1.0 / (e * math.sqrt(head_dim * (e * e - 1.0)))


@feature_map("identity")
class Identity(FeatureMap):
    """phi(x) = x: plain (gated) linear attention as in GLA / Fast Decay (Mao 2022, Yang 2024).
    The op scale is K^-1/2, as in fla's GLA layer."""

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__(head_dim, num_heads)

    @property
    def kernel_scale(self) -> float:
        return self.head_dim**-0.5

    def fused_kernel(self) -> IdentityKernel:
        return IdentityKernel()

    def forward(self, x: Tensor, role: str, state: Any = None) -> FeatureOutput:
        return FeatureOutput(x)


@feature_map("relu")
class ReLU(FeatureMap):
    """phi(x) = max(x, 0) (the ReLU baseline; T2R's ReLU(Wx + b) with W folded into the projection,
    Kasai 2021). Non-negative but unbounded."""

    positive_kernel = True

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__(head_dim, num_heads)

    def forward(self, x: Tensor, role: str, state: Any = None) -> FeatureOutput:
        return FeatureOutput(F.relu(x))


@feature_map("elu_plus_one")
class EluPlusOne(FeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020): positive, unbounded above."""

    positive_kernel = True

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__(head_dim, num_heads)

    def forward(self, x: Tensor, role: str, state: Any = None) -> FeatureOutput:
        return FeatureOutput(F.elu(x) + 1.0)


@feature_map("exp")
class Exp(FeatureMap):
    """phi(x) = exp(x) · c, c the variance factor of safe_exp (REGLA.md §2), without any shift: the
    exponential feature map safe_exp makes safe. Overflows (inf, then NaN) once q or k reaches
    ~88 in fp32: the instability the paper's ablation attributes to it, kept to measure it."""

    positive_kernel = True
    needs_fp32_op = True

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__(head_dim, num_heads)

    @property
    def kernel_scale(self) -> float:
        return variance_reduction_factor(self.head_dim)

    def forward(self, x: Tensor, role: str, state: Any = None) -> FeatureOutput:
        return FeatureOutput(torch.exp(x))


@feature_map("hedgehog")
class Hedgehog(FeatureMap):
    """Hedgehog's learnable map mimicking softmax (Zhang et al. 2024). F = 2K. Two forms:

    - `form: paper` (default): phi(x) = [softmax(W x), softmax(−W x)], each over the feature dim,
      one learnable W per head (initialised to the identity) shared by queries and keys. The
      paper's Table 5 baseline names this map (REGLA.md §1); whether q and k share W is not
      stated there.
    - `form: fla`: fla's HedgehogFeatureMap: separate maps for queries and keys, each a linear
      layer with bias (identity and zero at init) shared by the heads, and one softmax over the
      joint vector [2(W x + b), −2(W x + b)].
    """

    positive_kernel = True

    def __init__(self, head_dim: int, num_heads: int, *, form: str = "paper"):
        super().__init__(head_dim, num_heads)
        if form not in HEDGEHOG_FORMS:
            raise ValueError(f"hedgehog: form must be one of {', '.join(HEDGEHOG_FORMS)}; got {form!r}")
        self.form = form
        self.feature_dim = 2 * head_dim
        if form == "paper":
            self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))  # [H, K, K]
        else:
            self.query_map, self.key_map = nn.Linear(head_dim, head_dim), nn.Linear(head_dim, head_dim)
            for layer in (self.query_map, self.key_map):
                nn.init.eye_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, role: str, state: Any = None) -> FeatureOutput:
        if self.form == "paper":
            projected = torch.einsum("bthk,hkj->bthj", x, self.weight.to(x.dtype))
            return FeatureOutput(torch.cat([projected.softmax(-1), (-projected).softmax(-1)], dim=-1))
        projected = (self.query_map if role == "q" else self.key_map)(x)
        return FeatureOutput(torch.cat([2 * projected, -2 * projected], dim=-1).softmax(-1))


HEDGEHOG_FORMS = ("paper", "fla")


@feature_map("performer", version=3)
class Performer(FeatureMap):
    """FAVOR+ positive random features (Choromanski et al. 2021):
    phi(x) = exp(w_iᵀ x' − |x'|²/2) / sqrt(m), x' = x · K^-1/4, with m orthogonal Gaussian w_i.

    Each head of each layer draws its own features (as FAVOR+ does): from torch's generator when
    the model is built, which the run's seed sets, so a run is reproducible and its layers differ;
    or from `seed`, when given, for every layer alike. `redraw_every: N > 0` draws them anew every
    N training steps (FAVOR+'s redrawing), deterministically from the first draw's seed and the
    number of redraws, so every process of a DDP run draws the same; evaluation and decoding
    never redraw. Queries are shifted by their per-token max (a per-query constant, cancelled by
    any per-token normalisation); keys are not shifted, because a shared key shift would have to
    read the whole sequence."""

    positive_kernel = True

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        *,
        num_features: int | None = None,
        seed: int | None = None,
        redraw_every: int = 0,
    ):
        super().__init__(head_dim, num_heads)
        if redraw_every < 0:
            raise ValueError(f"performer: redraw_every must be >= 0 (0: never); got {redraw_every}")
        self.feature_dim = num_features or head_dim
        self.redraw_every = redraw_every
        # The seed of the first draw: given, or taken from torch's generator (seeded by the run).
        first_seed = seed if seed is not None else int(torch.randint(0, 2**62, (), device="cpu"))
        self.register_buffer("draw_seed", torch.tensor(first_seed, dtype=torch.long), persistent=True)
        self.register_buffer("training_calls", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("projection", self.draw(first_seed), persistent=True)  # [H, K, m]

    def draw(self, seed: int) -> Tensor:
        """One orthogonal Gaussian block set per head: [H, K, m]."""
        generator = torch.Generator().manual_seed(seed)
        K, m = self.head_dim, self.feature_dim
        heads = []
        for _ in range(self.num_heads):
            blocks = []
            for _ in range(-(-m // K)):
                orthogonal, _ = torch.linalg.qr(torch.randn(K, K, generator=generator))
                norms = torch.randn(K, K, generator=generator).norm(dim=1)
                blocks.append(orthogonal.T * norms.unsqueeze(1))
            heads.append(torch.cat(blocks)[:m].T)
        return torch.stack(heads).contiguous()

    def maybe_redraw(self) -> None:
        """Called once per training forward (on the query call, which comes before the key call)."""
        if self.redraw_every and self.training and not self.projection.is_meta:
            if int(self.training_calls) and int(self.training_calls) % self.redraw_every == 0:
                redraws = int(self.training_calls) // self.redraw_every
                fresh = self.draw(int(self.draw_seed) + 1_000_003 * redraws)
                self.projection.copy_(fresh.to(self.projection))
            self.training_calls += 1

    def forward(self, x: Tensor, role: str, state: Any = None) -> FeatureOutput:
        if role == "q":
            self.maybe_redraw()
        x = x * self.head_dim**-0.25
        projection = self.projection.to(x.dtype)  # [H, K, m]
        logits = torch.einsum("bthk,hkm->bthm", x, projection) - 0.5 * x.pow(2).sum(-1, keepdim=True)
        if role == "q":
            # Not detached: without an output norm the shift changes the function, and the
            # gradient must be that of the function computed.
            logits = logits - logits.amax(-1, keepdim=True)
        return FeatureOutput(logits.exp() * self.feature_dim**-0.5)


@feature_map("dpfp")
class DPFP(FeatureMap):
    """Deterministic parameter-free projection (Schlag et al. 2021): r = [relu(x), relu(−x)] (2K),
    phi(x) = concat over i = 1..nu of r ⊙ roll(r, i). F = 2 K nu."""

    positive_kernel = True

    def __init__(self, head_dim: int, num_heads: int, *, nu: int = 1):
        super().__init__(head_dim, num_heads)
        if nu < 1:
            raise ValueError(f"dpfp: nu must be >= 1, got {nu}")
        self.nu = nu
        self.feature_dim = 2 * head_dim * nu

    def forward(self, x: Tensor, role: str, state: Any = None) -> FeatureOutput:
        r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
        return FeatureOutput(torch.cat([r * r.roll(i, dims=-1) for i in range(1, self.nu + 1)], dim=-1))


@feature_map("taylor")
class Taylor(FeatureMap):
    """Second-order Taylor expansion of exp (Based, Arora et al. 2024):
    phi(x) = [1, x / d^{1/4}, vec(x xᵀ) / (sqrt(2) sqrt(d))] so that
    phi(q)·phi(k) = 1 + q·k/sqrt(d) + (q·k)²/(2d) > 0. F = 1 + K + K²: keep K small."""

    positive_kernel = True

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__(head_dim, num_heads)
        self.feature_dim = 1 + head_dim + head_dim * head_dim

    def forward(self, x: Tensor, role: str, state: Any = None) -> FeatureOutput:
        d = self.head_dim
        first = x * d**-0.25
        second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0 * d)
        return FeatureOutput(torch.cat([torch.ones_like(x[..., :1]), first, second], dim=-1))


VARIANCE_PLACEMENTS = ("kernel", "query", "off")


@feature_map("safe_exp")
class SafeExp(FeatureMap):
    """ReGLA's normalized exponential ("safe exp") with its variance-reduction factor (REGLA.md §2).

    queries: phi_q(x)_i = exp(x_i − max_j x_j), the max over features of the token;
    keys:    phi_k(x)_{s,i} = exp(x_{s,i} − m_s) with m_s a max over features and positions:
      - `sequence`: one max over all positions (the paper's form; reads the future: a leak);
      - `chunk`: the running max at chunk granularity (reads at most the rest of its chunk);
      - `running`: the running max over positions <= s (causal, streamable).
    A non-constant m_s is made exact by rescaling the state: the extra key-side log decay
    m_{s-1} − m_s <= 0 is returned in `log_decay`, so phi(q)ᵀ S_t equals the `sequence` result up
    to a per-token factor — which a per-head output norm (or the denominator) cancels.
    The variance factor 1/(e sqrt(d (e² − 1))) goes into the op scale (`kernel`), onto phi(q)
    (`query`), or nowhere (`off`).
    """

    positive_kernel = True
    needs_fp32_op = True

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        *,
        key_max: str = "running",
        variance_factor: str = "kernel",
        chunk_size: int = 64,
    ):
        super().__init__(head_dim, num_heads)
        if key_max not in KEY_MAX_SCOPES:
            raise ValueError(f"safe_exp: key_max must be one of {', '.join(KEY_MAX_SCOPES)}; got {key_max!r}")
        if variance_factor not in VARIANCE_PLACEMENTS:
            raise ValueError(
                f"safe_exp: variance_factor must be one of {', '.join(VARIANCE_PLACEMENTS)}; got {variance_factor!r}"
            )
        if chunk_size < 1:
            raise ValueError(f"safe_exp: chunk_size must be >= 1, got {chunk_size}")
        self.key_max = key_max
        self.variance_factor = variance_factor
        self.chunk_size = chunk_size
        # `sequence` reads the whole sequence for its key max and `chunk` the rest of the current
        # chunk: only `running` is causal. The leak of the other two is measured in tests.
        self.causal = key_max == "running"

    @property
    def kernel_scale(self) -> float:
        return variance_reduction_factor(self.head_dim) if self.variance_factor == "kernel" else 1.0

    def fused_kernel(self) -> SafeExpKernel:
        query_factor = variance_reduction_factor(self.head_dim) if self.variance_factor == "query" else 1.0
        return SafeExpKernel(key_max=self.key_max, chunk_size=self.chunk_size, query_factor=query_factor)

    def forward(self, x: Tensor, role: str, state: Any = None) -> FeatureOutput:
        # The output's true gradient through the maxima is zero where the norm cancels them
        # (`detach_shifts`); formed anyway, it is a difference of large terms that bf16 rounding
        # leaves at several times the true weight gradients of q_proj and k_proj.
        source = x.detach() if self.detach_shifts else x
        if role == "q":
            shift = query_shift(source).unsqueeze(-1)
            features = torch.exp(x - shift)
            if self.variance_factor == "query":
                features = features * variance_reduction_factor(self.head_dim)
            return FeatureOutput(features, shift=shift)
        shift, log_decay = key_shifts(source.amax(-1), self.key_max, self.chunk_size, state)
        return FeatureOutput(
            torch.exp(x - shift.unsqueeze(-1)),
            log_decay.unsqueeze(-1) if log_decay is not None else None,
            shift[:, -1],
            shift=shift.unsqueeze(-1),
        )
