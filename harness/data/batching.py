"""Training and evaluation windows over a flat token array."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class TokenDataset:
    """Windows of ``seq_len + 1`` tokens: inputs are the first ``seq_len``, targets the last."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens  # [N], usually a read-only memmap

    def __len__(self) -> int:
        return len(self.tokens)

    def _window(self, start: int, seq_len: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.tokens[start : start + seq_len + 1], dtype=np.int64))

    def _check(self, seq_len: int) -> None:
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"{len(self.tokens)} tokens cannot fill one window of seq_len + 1 = {seq_len + 1}")

    def sample_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows; the same generator state gives the same batch."""
        self._check(seq_len)
        starts = torch.randint(0, len(self.tokens) - seq_len, (batch_size,), generator=generator)
        windows = torch.stack([self._window(int(s), seq_len) for s in starts])  # [B, T + 1]
        return windows[:, :-1], windows[:, 1:]

    def num_eval_windows(self, seq_len: int) -> int:
        # Consecutive windows share one boundary token, so every token is a target exactly once.
        return max(0, (len(self.tokens) - 1) // seq_len)

    def eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Contiguous, non-overlapping windows in a fixed order; the last batch may be smaller.

        When ``max_batches`` cannot cover the split, the windows are spread evenly over it
        instead of taking its beginning, so a capped evaluation still sees every part (every
        corpus of a concatenated source).
        """
        self._check(seq_len)
        total = self.num_eval_windows(seq_len)
        wanted = total if max_batches is None else min(total, max_batches * batch_size)
        if wanted == total:
            indices = np.arange(total)
        else:
            indices = np.unique(np.linspace(0, total - 1, wanted).round().astype(np.int64))
        for first in range(0, len(indices), batch_size):
            chunk = indices[first : first + batch_size]
            windows = torch.stack([self._window(int(i) * seq_len, seq_len) for i in chunk])  # [b, T + 1]
            yield windows[:, :-1], windows[:, 1:]
