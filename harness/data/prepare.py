"""The entry points the rest of the harness uses: prepared token splits and raw documents."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .batching import TokenDataset
from .documents import SPLITS, Document
from .paths import cache_dir as default_cache_dir
from .sources import Source, get_source
from .token_cache import tokenized_split
from .tokenization import Tokenizer, get_tokenizer, hub_tokenizer


@dataclass(frozen=True)
class PreparedData:
    source: Source
    tokenizer: Tokenizer
    train: TokenDataset
    validation: TokenDataset
    test: TokenDataset
    # Per split: the cache sidecar (n_tokens, n_bytes, n_documents, source_version, ...).
    stats: dict[str, dict]

    def split(self, name: str) -> TokenDataset:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    @property
    def bytes_per_token(self) -> dict[str, float]:
        """UTF-8 bytes of text per token (eot separators counted as tokens).

        bits per byte = mean loss per token in nats * (1 / bytes_per_token) / ln 2; the loss on
        the eot tokens is part of the total, and the same document boundaries exist for every
        tokenizer, so the number stays comparable across tokenizers.
        """
        return {s: (m["n_bytes"] / m["n_tokens"] if m["n_tokens"] else float("nan")) for s, m in self.stats.items()}


def _resolve_source(source: str | Source, source_options: dict | None) -> Source:
    if isinstance(source, Source):
        if source_options:
            raise ValueError("pass source_options only with a source name")
        return source
    return get_source(source, **(source_options or {}))


def prepare_data(
    source: str | Source,
    tokenizer: str,
    source_options: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> PreparedData:
    """Tokenize (or reuse the cached tokens of) every split of ``source`` with ``tokenizer``."""
    cache = Path(cache_dir or default_cache_dir())
    resolved = _resolve_source(source, source_options)
    tok = get_tokenizer(tokenizer, source=resolved, cache_dir=cache)
    splits = {split: tokenized_split(resolved, tok, split, cache, progress=progress) for split in SPLITS}
    return PreparedData(
        source=resolved,
        tokenizer=tok,
        train=TokenDataset(splits["train"].tokens, splits["train"].meta.get("eot_id")),
        validation=TokenDataset(splits["validation"].tokens, splits["validation"].meta.get("eot_id")),
        test=TokenDataset(splits["test"].tokens, splits["test"].meta.get("eot_id")),
        stats={split: t.meta for split, t in splits.items()},
    )


def hub_downloads(source: str, tokenizer: str, source_options: dict[str, Any] | None = None) -> list[str]:
    """What preparing this data downloads from the Hugging Face hub (empty: it is all local), as
    phrases for a message; nothing is read or downloaded to find out."""
    found = [f"tokenizer {tokenizer!r}"] if hub_tokenizer(tokenizer) else []
    dataset = _resolve_source(source, source_options).hub_dataset()
    if dataset is not None:
        found.append(f"dataset {dataset!r}")
    return found


def iter_documents(source: str | Source, split: str, **options: Any) -> Iterator[Document]:
    """Raw documents of one split (for evaluation suites that build tasks from held-out text)."""
    resolved = source if isinstance(source, Source) else get_source(source, **options)
    return resolved.documents(split)
