"""The max shifts of ReGLA's safe-exp feature maps (REGLA.md §2), in torch.

φ(q_t) = exp(q_t − max_i q_t,i) per token; φ(k_s) = exp(k_s − m_s) with m_s a running max of the
keys' token maxima, over a scope:
  - `sequence`: one max over all positions (the paper's form; reads the future);
  - `chunk`: the running max at chunk granularity (reads at most the rest of its chunk);
  - `running`: the running max over positions <= s (causal, streamable).
A non-constant m_s is made exact by a per-step log decay m_{s-1} − m_s <= 0 on the state, so
φ(q)ᵀ S_t is the `sequence` result times a per-token factor (which a per-head norm cancels).

Both the torch feature map (`variants.feature_maps.SafeExp`) and the fused Triton op
(`kernels.triton_regla`) take their shifts from here, so they cannot drift apart; gradients
flow through the maxima as torch's amax/cummax define them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
KEY_MAX_SCOPES = ("sequence", "chunk", "running")


def query_shift(q: Tensor) -> Tensor:
    """Per-token max over features: [B, T, H, K] -> [B, T, H]."""
    return q.amax(-1)


def key_shifts(
    token_max: Tensor, scope: str, chunk_size: int = 64, previous: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Key shifts m [B, T, H] from the keys' token maxima [B, T, H], and the log decay
    m_{s-1} − m_s [B, T, H] that keeps the state exact (None where m is constant over time).

    `previous` [B, H] is the last shift of earlier tokens (decoding): the future is then not
    there to read, so every scope continues as `running`.
    """
    if scope not in KEY_MAX_SCOPES:
        raise ValueError(f"safe_exp: key_max must be one of {', '.join(KEY_MAX_SCOPES)}; got {scope!r}")
    if previous is None and scope == "sequence":
        return token_max.amax(1, keepdim=True).expand_as(token_max), None
    if previous is None and scope == "chunk":
        shift = _chunk_running_max(token_max, chunk_size)
    else:
        extended = token_max if previous is None else torch.cat([previous.unsqueeze(1), token_max], dim=1)
        shift = running_max(extended)
        if previous is not None:
            shift = shift[:, 1:]
    before = torch.cat([shift[:, :1] if previous is None else previous.unsqueeze(1), shift[:, :-1]], dim=1)
    return shift, before - shift


def _cummax_over_time(x: Tensor):
    """cummax over time of [B, T, H], as (values, indices) laid out [B, H, T]. The scan runs over
    the innermost dimension of a transposed copy: CUDA's cummax over an outer dimension walks each
    column sequentially with one thread (milliseconds at T = 8192), over the innermost one it is a
    parallel scan."""
    return torch.cummax(x.transpose(1, 2).contiguous(), dim=-1)


def running_max(x: Tensor) -> Tensor:
    """cummax over time of [B, T, H] (values, ties and gradients are cummax's own)."""
    return _cummax_over_time(x).values.transpose(1, 2)


def running_key_shifts_backward(
    token_max: Tensor, previous: Tensor | None, d_shift: Tensor, d_log_decay: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The gradients of `key_shifts`'s token maxima [B, T, H] (contiguous) and of `previous` [B, H]
    (None without one) for the `running` scope, from those of its shift and log decay.

    What torch's autograd gives through `key_shifts` (cummax's backward routes each gradient to the
    index cummax picked, ties included), written out: the fused op's backward calls this once per
    layer, where re-running `key_shifts` under autograd cost it several times the host time of
    the rest of its shift handling.
    """
    dtype = torch.promote_types(d_shift.dtype, torch.float32)
    d_total = d_shift.to(dtype)
    d_previous = None
    if d_log_decay is not None:
        # log_decay_t = before_t − shift_t, before_t = shift_{t−1} (the first: shift_0, or previous).
        d_log_decay = d_log_decay.to(dtype)
        d_total = d_total - d_log_decay
        d_total[:, :-1] += d_log_decay[:, 1:]
        if previous is None:
            d_total[:, 0] += d_log_decay[:, 0]
        else:
            d_previous = d_log_decay[:, 0]
    extended = token_max if previous is None else torch.cat([previous.unsqueeze(1).to(token_max.dtype), token_max], 1)
    if previous is not None:
        d_total = F.pad(d_total, (0, 0, 1, 0))  # the previous key max's own shift is not an output
    _, index = _cummax_over_time(extended)  # the indices `running_max`'s cummax picks
    d_extended = torch.zeros_like(index, dtype=dtype).scatter_add_(-1, index, d_total.transpose(1, 2))
    d_extended = d_extended.transpose(1, 2)
    if previous is None:
        return d_extended.contiguous(), None
    d_previous = d_extended[:, 0] if d_previous is None else d_previous + d_extended[:, 0]
    return d_extended[:, 1:].contiguous(), d_previous


def _chunk_running_max(token_max: Tensor, chunk_size: int) -> Tensor:
    B, T, H = token_max.shape
    n = -(-T // chunk_size)
    padded = F.pad(token_max, (0, 0, 0, n * chunk_size - T), value=float("-inf"))
    chunk_max = padded.reshape(B, n, chunk_size, H).amax(2)  # [B, n, H]
    running = running_max(chunk_max)
    return running.repeat_interleave(chunk_size, dim=1)[:, :T]


def packed_key_shifts(
    token_max: Tensor, scope: str, chunk_size: int, previous: Tensor | None, bounds: list[int]
) -> tuple[Tensor, Tensor | None]:
    """`key_shifts` of each of N sequences packed along time: every scope (and its max) stays inside
    its sequence.

    The sequences are laid out as a batch [N, L_max, H], padded at the end with -inf (which no max
    picks up: every sequence has a real first token), so that one `key_shifts` call serves them all;
    values and gradients are those of per-sequence calls.

    Args:
        token_max: [1, T, H], the keys' token maxima.
        scope, chunk_size: as for `key_shifts`.
        previous: [N, H], each sequence's key max of earlier tokens, or None.
        bounds: the sequences' offsets [0, ..., T] (`kernels.varlen.sequence_bounds`).

    Returns:
        shift, log_decay: [1, T, H] each (log_decay None where `key_shifts` gives None).
    """
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    n, longest = len(lengths), max(lengths)
    device = token_max.device
    sequence = torch.repeat_interleave(torch.arange(n), torch.tensor(lengths)).to(device)
    position = torch.arange(bounds[-1], device=device) - torch.tensor(bounds[:-1], device=device)[sequence]
    batched = token_max.new_full((n, longest, token_max.shape[-1]), float("-inf"))
    batched = batched.index_put((sequence, position), token_max[0])
    shift, log_decay = key_shifts(batched, scope, chunk_size, previous)
    unpack = lambda x: None if x is None else x[sequence, position].unsqueeze(0)  # noqa: E731
    return unpack(shift), unpack(log_decay)
