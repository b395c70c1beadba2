"""Tokenize a (source, tokenizer) split once into a flat memory-mapped array.

Layout: ``<cache>/tokens/<source key>/<tokenizer>/<split>.bin`` holds the token ids of every
document, each followed by the tokenizer's end-of-text id, as raw little-endian uint16 (vocabulary
below 65,536) or uint32; ``<split>.json`` beside it records counts and provenance. The sidecar is
written last, so its presence marks a complete array; both are written to temp files and renamed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import temp_path_beside
from ..progress import bar as progress_bar
from ..progress import say
from .errors import DataError
from .locking import build_lock
from .sources import Source
from .tokenization import Tokenizer

CACHE_FORMAT = 1
# Documents are encoded in batches of about this many characters: large enough for the Rust
# thread pool to stay busy, small enough to keep memory flat on big corpora.
BATCH_CHARS = 2_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32).newbyteorder("<")


@dataclass(frozen=True)
class TokenizedSplit:
    tokens: np.ndarray  # [N] memory-mapped, read-only
    meta: dict
    path: Path
    built: bool  # False when an existing cache was reused


def split_paths(cache_dir: Path, source: Source, tokenizer: Tokenizer, split: str) -> tuple[Path, Path]:
    # A pretrained tokenizer's name holds a hub path ("hf:org/model"): one folder, not two.
    directory = Path(cache_dir) / "tokens" / source.cache_key() / tokenizer.name.replace("/", "--")
    return directory / f"{split}.bin", directory / f"{split}.json"


def open_tokens(path: Path, meta: dict) -> np.ndarray:
    dtype = np.dtype(meta["dtype"])
    if meta["n_tokens"] == 0:
        # numpy cannot memory-map an empty file.
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))


def _valid_meta(bin_path: Path, json_path: Path, tokenizer: Tokenizer, source_version: str | None) -> dict | None:
    if not (bin_path.is_file() and json_path.is_file()):
        return None
    meta = json.loads(json_path.read_text())
    if meta.get("format") != CACHE_FORMAT or meta.get("tokenizer_fingerprint") != tokenizer.fingerprint():
        return None
    if bin_path.stat().st_size != meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
        return None
    # Without the corpus here (e.g. a GPU machine that received only the cache) trust the cache.
    if source_version is not None and meta.get("source_version") != source_version:
        return None
    return meta


def _write_tokens(
    source: Source, tokenizer: Tokenizer, split: str, out_path: Path, dtype: np.dtype, progress: bool
) -> dict:
    counts = {"n_tokens": 0, "n_bytes": 0, "n_documents": 0}
    label = f"tokenize {source.name}/{split} ({tokenizer.name})"
    bar = progress_bar(desc=label, unit="B", unit_scale=True, enabled=progress)

    def flush(texts: list[str], f) -> None:
        flat: list[int] = []
        for ids in tokenizer.encode_batch(texts):
            flat.extend(ids)
            flat.append(tokenizer.eot_id)
        np.asarray(flat, dtype=dtype).tofile(f)
        counts["n_tokens"] += len(flat)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        counts["n_bytes"] += n_bytes
        counts["n_documents"] += len(texts)
        bar.update(n_bytes)

    with open(out_path, "wb") as f:
        batch: list[str] = []
        batch_chars = 0
        for document in source.documents(split):
            batch.append(document.text)
            batch_chars += len(document.text)
            if batch_chars >= BATCH_CHARS:
                flush(batch, f)
                batch, batch_chars = [], 0
        if batch:
            flush(batch, f)
    bar.close()
    if progress:
        say(f"{label}: {counts['n_tokens']:,} tokens from {counts['n_documents']:,} documents")
    return counts


def tokenized_split(
    source: Source, tokenizer: Tokenizer, split: str, cache_dir: Path, progress: bool = True
) -> TokenizedSplit:
    """The split's tokens, from the cache when it is complete and current, else built now."""
    bin_path, json_path = split_paths(cache_dir, source, tokenizer, split)
    try:
        source_version = source.version()
    except DataError:
        source_version = None
    meta = _valid_meta(bin_path, json_path, tokenizer, source_version)
    if meta is not None:
        return TokenizedSplit(open_tokens(bin_path, meta), meta, bin_path, built=False)
    if source_version is None:
        source.version()  # no usable cache and no corpus: raise the source's actionable error

    with build_lock(bin_path):
        # Another process may have finished the same cache while this one waited for the lock.
        meta = _valid_meta(bin_path, json_path, tokenizer, source_version)
        if meta is not None:
            return TokenizedSplit(open_tokens(bin_path, meta), meta, bin_path, built=False)
        meta = _build(source, tokenizer, split, bin_path, json_path, source_version, progress)
    return TokenizedSplit(open_tokens(bin_path, meta), meta, bin_path, built=True)


def _build(
    source: Source,
    tokenizer: Tokenizer,
    split: str,
    bin_path: Path,
    json_path: Path,
    source_version: str,
    progress: bool,
) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    tmp_bin, tmp_json = temp_path_beside(bin_path), temp_path_beside(json_path)
    started = time.perf_counter()
    try:
        counts = _write_tokens(source, tokenizer, split, tmp_bin, dtype, progress)
        meta = {
            "format": CACHE_FORMAT,
            "split": split,
            **counts,
            "dtype": dtype.str,
            "source": source.name,
            "source_options": source.options,
            "source_version": source_version,
            "tokenizer": tokenizer.name,
            "tokenizer_fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "layout": "each document followed by eot_id",
            "seconds": round(time.perf_counter() - started, 3),
        }
        tmp_json.write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_json, json_path)
    finally:
        for leftover in (tmp_bin, tmp_json):
            if leftover.exists():
                leftover.unlink()
    return meta
