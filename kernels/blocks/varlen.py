"""Packed-sequence building block: the chunk-aligned layout in which the Triton GLA ops run packed
variable-length sequences (`cu_seqlens`, see `kernels.varlen`).

Each sequence is copied to start on a chunk boundary of its own ([1, Tp, H, D], Tp = the sum of
the sequences' lengths rounded up to whole chunks, at most N · (CHUNK − 1) rows more than T), so
no chunk holds two sequences. The within-chunk kernels (gates, scores, outputs, gradients) then
need nothing new; only the two passes over chunks (`chunk_state`) and the gate gradient (`gate`)
take the sequences' chunk ranges, `SequenceChunks`, to restart the state at each boundary.

The rows added at the end of a sequence must change nothing: they get zero q, k, v and a zero log
gate (no decay), so the state leaving the sequence's last chunk is its final state. Safe-exp
features are formed from a shift in the kernels: padded shifts are +inf, making φ = exp(x − inf) = 0.

Copying in and out costs one extra pass over the inputs and outputs; indexing the packed tensors
directly from a chunk table (fla's `chunk_indices`) would avoid it, at the cost of a row bound per
chunk in every kernel.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .common import CHUNK, empty

Tensor = torch.Tensor


class SequenceChunks(NamedTuple):
    """Where each packed sequence lies on the chunk axis, for the kernels that cross chunks."""

    offsets: Tensor  # int32 [N + 1]: sequence n covers chunks offsets[n] .. offsets[n + 1] - 1
    sequence_of_chunk: Tensor  # int32 [NT]: the sequence each chunk belongs to
    count: int  # N


class ChunkAlignedLayout(NamedTuple):
    rows: Tensor  # int64 [T]: the aligned row of each packed row
    length: int  # Tp, a whole number of chunks
    ends: Tensor  # int64 [N]: the packed row of each sequence's last token
    chunks: SequenceChunks


def chunk_aligned_layout(bounds: list[int], device: torch.device) -> ChunkAlignedLayout:
    """The layout of sequences with offsets `bounds` ([0, L_0, ..., T], from `kernels.varlen.sequence_bounds`)."""
    return _layout(tuple(bounds), torch.device(device))


@functools.lru_cache(maxsize=4)
def _layout(bounds: tuple[int, ...], device: torch.device) -> ChunkAlignedLayout:
    # Cached: every layer of a model sees the same offsets in one step, and the index tensors are
    # only read. Built on the host (the offsets are host values already) and copied once.
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    chunk_counts = [-(-n // CHUNK) for n in lengths]
    chunk_offsets = [0]
    for count in chunk_counts:
        chunk_offsets.append(chunk_offsets[-1] + count)
    packed_start = torch.tensor(bounds[:-1], dtype=torch.int64)
    aligned_start = torch.tensor(chunk_offsets[:-1], dtype=torch.int64) * CHUNK
    sequence_of_row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    rows = torch.arange(bounds[-1]) - packed_start[sequence_of_row] + aligned_start[sequence_of_row]
    sequence_of_chunk = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(chunk_counts))
    chunks = SequenceChunks(
        torch.tensor(chunk_offsets, dtype=torch.int32, device=device),
        sequence_of_chunk.to(device, torch.int32),
        len(lengths),
    )
    ends = torch.tensor(bounds[1:], dtype=torch.int64, device=device) - 1
    return ChunkAlignedLayout(rows.to(device), chunk_offsets[-1] * CHUNK, ends, chunks)


def align(x: Tensor, layout: ChunkAlignedLayout, fill: float = 0.0) -> Tensor:
    """[1, T, ...] packed -> [1, Tp, ...] chunk-aligned, added rows set to `fill`; contiguous."""
    out = empty((1, layout.length, *x.shape[2:]), x.dtype, x.device).fill_(fill)
    out[:, layout.rows] = x
    return out


def unalign(x: Tensor, layout: ChunkAlignedLayout) -> Tensor:
    """[1, Tp, ...] chunk-aligned -> [1, T, ...] packed (the added rows dropped)."""
    return x[:, layout.rows]
