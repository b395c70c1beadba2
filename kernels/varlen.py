"""Packed variable-length sequences: N sequences concatenated along time in one batch row, with
`cu_seqlens` = [0, L_0, L_0 + L_1, ..., T] (int32 or int64, [N + 1]) marking where each begins,
the convention of fla's ops. The recurrent state starts afresh at every boundary, and initial
and final states are per sequence ([N, H, K, V]).

Here: the check of `cu_seqlens` shared by every op, and the per-sequence form of any op with the
references' signature (`per_sequence`), which is how the torch references take packed input:
the packed call is *defined* as the per-sequence calls concatenated, so the references stay the
judge of the Triton ops' native packed path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def sequence_bounds(cu_seqlens: Tensor, batch: int, total: int) -> list[int]:
    """The offsets of `cu_seqlens` as Python ints, after checking that they describe packed sequences.

    Args:
        cu_seqlens: [N + 1] integer offsets.
        batch: the inputs' batch size (must be 1: the sequences are packed along time).
        total: the inputs' time length T.

    Raises:
        ValueError: naming what is wrong and what is allowed.
    """
    if (
        not isinstance(cu_seqlens, Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            "cu_seqlens must be a 1-d int32 or int64 tensor of cumulative sequence offsets [0, L_0, ..., T]; got "
            + (
                f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
                if isinstance(cu_seqlens, Tensor)
                else repr(cu_seqlens)
            )
        )
    if batch != 1:
        raise ValueError(f"with cu_seqlens the sequences are packed into one row: batch size must be 1; got {batch}")
    bounds = [int(x) for x in cu_seqlens.tolist()]  # one device-to-host copy: the chunk layout needs the lengths
    if len(bounds) < 2 or bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and hold at least one sequence ([0, ..., T]); got {bounds[:8]}")
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"cu_seqlens must be strictly increasing (every sequence at least one token); got {bounds[:16]}"
        )
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens must end at the packed length T = {total}; got {bounds[-1]}")
    return bounds


def check_sequence_states(initial_state: Tensor | None, n_sequences: int, name: str = "initial_state") -> None:
    """With packed sequences the initial state is one per sequence: [N, ...]."""
    if initial_state is not None and initial_state.shape[0] != n_sequences:
        raise ValueError(
            f"with cu_seqlens, {name} is one per sequence: its first dim must be N = {n_sequences}; "
            f"got shape {tuple(initial_state.shape)}"
        )


def per_sequence(
    fn: Callable[..., tuple[Tensor, Tensor | None]],
    cu_seqlens: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None,
    gv: Tensor | None,
    *,
    initial_state: Tensor | None,
    output_final_state: bool,
    **options,
) -> tuple[Tensor, Tensor | None]:
    """`fn` (with the signature of `kernels.reference.recurrent_gla`) on each packed sequence in turn.

    Returns:
        o: [1, T, H, V], the sequences' outputs concatenated.
        final: [N, H, K, V] the sequences' final states stacked, or None unless `output_final_state`.
    """
    bounds = sequence_bounds(cu_seqlens, q.shape[0], q.shape[1])
    check_sequence_states(initial_state, len(bounds) - 1)
    outputs, finals = [], []
    for n, (start, end) in enumerate(zip(bounds, bounds[1:])):
        q_n, k_n, v_n, gk_n, gv_n = (None if x is None else x[:, start:end] for x in (q, k, v, gk, gv))
        o, final = fn(
            q_n,
            k_n,
            v_n,
            gk_n,
            gv_n,
            initial_state=initial_state[n : n + 1] if initial_state is not None else None,
            output_final_state=output_final_state,
            **options,
        )
        outputs.append(o)
        finals.append(final)
    return torch.cat(outputs, dim=1), (torch.cat(finals, dim=0) if output_final_state else None)
