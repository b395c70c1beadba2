"""Error measures and the layer fused-vs-composed helper shared by the kernel tests."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in fp64; an exactly zero reference (a gate that cannot matter, as at T = 1
    with no initial state) is compared absolutely. NaN anywhere gives NaN."""
    x, ref = x.double(), ref.double()
    norm = ref.norm()
    return ((x - ref).norm() / (norm if norm > 0 else 1.0)).item()


def worst(errors: Mapping[str, float] | Iterable[float]) -> float:
    """The largest error, with NaN ranked above everything: Python's max() would pass a NaN over
    unless it came first, and an unwritten (NaN-filled) buffer must fail the test."""
    values = list(errors.values()) if isinstance(errors, Mapping) else list(errors)
    return max((math.inf if math.isnan(v) else v) for v in values)


def gla_results_with_grads(fn, inputs, dtype, scale, output_final_state=True, seed=1) -> dict[str, torch.Tensor]:
    """A GLA op's output, final state and the gradients of <o, do> (+ <S_T, dS_T>) with respect to
    every input, for random do and dS_T. `fn` has the references' signature (kernels.reference);
    `inputs` holds q, k, v and any of gk, gv, h0 (the initial state), cast to `dtype` as leaves."""
    leaves = {name: t.to(dtype).requires_grad_(True) for name, t in inputs.items()}
    o, final = fn(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        leaves.get("gk"),
        leaves.get("gv"),
        scale=scale,
        initial_state=leaves.get("h0"),
        output_final_state=output_final_state,
    )
    gen = torch.Generator().manual_seed(seed)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
    results = {"o": o}
    if output_final_state:
        loss = loss + (final.double() * torch.randn(final.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
        results["final_state"] = final
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {**results, **{f"d{name}": g for name, g in zip(leaves, grads)}}


def layer_outputs(layer, x: torch.Tensor, fused: bool, monkeypatch) -> list[torch.Tensor]:
    """A linear-attention layer's output and every parameter's gradient (of a fixed, position-
    weighted sum of the output), through the fused path or the composed one."""
    monkeypatch.setattr(type(layer), "takes_fused_path", lambda self, q: fused)
    layer.zero_grad()
    y, _ = layer(x)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    return [y.detach()] + [p.grad.detach().clone() for p in layer.parameters()]
