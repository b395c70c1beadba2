"""Training and evaluation windows over a flat token array."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class TokenDataset:
    """Windows of ``seq_len + 1`` tokens: inputs are the first ``seq_len``, targets the last.

    ``eot_id`` is the token that ends every document in the token cache (`token_cache`: each
    document followed by it); `sample_document_batch` cuts windows into documents there.
    """

    def __init__(self, tokens: np.ndarray, eot_id: int | None = None):
        self.tokens = tokens  # [N], usually a read-only memmap
        self.eot_id = eot_id

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

    def sample_document_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The windows of `sample_batch` (the same generator draws), and `cu_seqlens` [N + 1] int32:
        where each document starts among the batch's B·T input tokens read row after row.

        A document starts at every row start and after every eot in the inputs, so the eot stays
        with the document it ends and nothing attends across it (`LanguageModel.forward`).
        """
        if self.eot_id is None:
            raise ValueError(
                "document packing needs the token that ends each document: build the TokenDataset with "
                "eot_id (prepare_data does, from the token cache's sidecar)"
            )
        x, y = self.sample_batch(batch_size, seq_len, generator)
        return x, y, document_offsets(x, self.eot_id)

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


def document_offsets(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """cu_seqlens [N + 1] int32 of the documents in rows x [B, T]: starts at each row start and after
    each eot (not after a row's last token, where the next row starts anyway), and B·T at the end."""
    B, T = x.shape
    after_eot = torch.zeros_like(x, dtype=torch.bool)
    after_eot[:, 1:] = x[:, :-1] == eot_id
    after_eot[:, 0] = True
    starts = torch.nonzero(after_eot.flatten()).flatten()
    return torch.cat([starts, torch.tensor([B * T])]).to(torch.int32)
