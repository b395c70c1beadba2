"""One entry point for gated linear attention: validates inputs, adds the denominator, picks
an implementation (Triton on CUDA when available, the torch references otherwise)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from registry import Registry

from . import reference
from .varlen import sequence_bounds

Tensor = torch.Tensor
GLAFn = Callable[..., tuple[Tensor, Tensor | None]]

#: Attention implementations by name; `impl=` of `gated_linear_attention` and of a model's
#: attention config picks one. The Triton kernel registers lazily (kernels/__init__.py) where
#: triton is installed, so importing the package never compiles or imports it before use.
IMPLEMENTATIONS: Registry[GLAFn] = Registry(
    "attention implementation",
    hint="Or impl='auto': picked by device and length. Add one with kernels.register_implementation(name, fn).",
)
IMPLEMENTATIONS.register("recurrent", reference.recurrent_gla)
IMPLEMENTATIONS.register("chunked", reference.chunked_gla)
IMPLEMENTATIONS.register("parallel", reference.parallel_gla)


def register_implementation(name: str, fn: GLAFn | str) -> None:
    """Add an implementation: a function with the signature of `kernels.reference.recurrent_gla`,
    or "package.module:function" to import it on first use."""
    if isinstance(fn, str):
        IMPLEMENTATIONS.register_lazy(name, fn)
    else:
        IMPLEMENTATIONS.register(name, fn)


def _check_shapes(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None,
    gv: Tensor | None,
    initial_state: Tensor | None,
    n_states: int | None = None,
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, time, heads, dim]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, K]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] with the same B, T, H as q {tuple(q.shape[:3])}; got {tuple(v.shape)}"
        )
    if q.shape[1] == 0:
        raise ValueError("sequence length must be at least 1")
    for name, g, dim in (("gk", gk, q.shape[-1]), ("gv", gv, v.shape[-1])):
        if g is not None and (g.shape[:3] != q.shape[:3] or g.shape[-1] not in (1, dim)):
            raise ValueError(
                f"{name} must be [B, T, H, {dim}] or [B, T, H, 1] (a per-head scalar gate); got {tuple(g.shape)}"
            )
    B, _, H, K = q.shape
    expected = (B if n_states is None else n_states, H, K, v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        what = "[B, H, K, V]" if n_states is None else "[N, H, K, V], one per packed sequence,"
        raise ValueError(f"initial_state must be {what} = {expected}; got {tuple(initial_state.shape)}")


def default_implementation(q: Tensor) -> str:
    """One decoding step is a single state update: the recurrence does it in a few small ops,
    cheaper than any chunked launch. Longer inputs take Triton on CUDA, the torch chunked form
    elsewhere."""
    if q.shape[1] == 1:
        return "recurrent"
    if q.is_cuda and "triton" in IMPLEMENTATIONS:
        return "triton"
    return "chunked"


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    denominator: bool = False,
    denominator_eps: float = 1e-6,
    impl: str = "auto",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """o_t = scale · S_tᵀ q_t with S_t = diag(e^{gk_t}) S_{t-1} diag(e^{gv_t}) + k_t v_tᵀ.

    With `denominator=True` the output is divided by scale · q_tᵀ z_t, z_t = e^{gk_t} ⊙ z_{t-1} + k_t
    (the normaliser of classic linear attention, decayed by the key-side gate only). It is
    computed as one extra value column of ones (value gate 0 on that column), so the state,
    and any initial/final state, is then [B, H, K, V + 1] with z in the last column.

    With `cu_seqlens` ([N + 1] int offsets, batch 1; `kernels.varlen`) q, k, v hold N sequences
    packed along time: the state restarts at each boundary, and initial and final states are
    [N, H, K, V], one per sequence. Every registered implementation must then take `cu_seqlens`.
    """
    _check_shapes(q, k, v, gk, gv, None)
    n_states = None
    if cu_seqlens is not None:
        n_states = len(sequence_bounds(cu_seqlens, q.shape[0], q.shape[1])) - 1
    if denominator:
        v, gv = with_denominator_column(v, gv)
    _check_shapes(q, k, v, gk, gv, initial_state, n_states)
    name = default_implementation(q) if impl == "auto" else impl
    if name not in IMPLEMENTATIONS:
        raise IMPLEMENTATIONS.unknown(name)
    # Passed only when given, so implementations registered without packed-sequence support keep working.
    packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    o, final_state = IMPLEMENTATIONS[name](
        q, k, v, gk, gv, scale=scale, initial_state=initial_state, output_final_state=output_final_state, **packed
    )
    if denominator:
        o = divide_by_denominator(o, denominator_eps * scale)
    return o, final_state


def with_denominator_column(v: Tensor, gv: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """v with a last column of ones, so the state's last column accumulates z_t = Σ decays · φ(k);
    a value gate gets 0 (no decay) on that column."""
    v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    if gv is not None:
        gv = torch.cat([gv.expand(*v.shape[:-1], v.shape[-1] - 1), gv.new_zeros(*gv.shape[:-1], 1)], dim=-1)
    return v, gv


def divide_by_denominator(o: Tensor, eps: float) -> Tensor:
    """The output of a `with_denominator_column` call divided by its last column (+ eps)."""
    return o[..., :-1] / (o[..., -1:] + eps)
