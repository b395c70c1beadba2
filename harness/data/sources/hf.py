"""Loading a split through Hugging Face ``datasets``: from the hub (the real corpora), or from
local files in the same schema (``data_files`` / ``data_dir``) when the hub is out of reach."""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Any

from ..errors import CorpusNotFoundError, UnreadablePathError

# Compression suffixes that datasets decompresses on the fly.
_COMPRESSION = (".gz", ".zst", ".bz2", ".xz")
_BUILDER_BY_SUFFIX = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv"}


def builder_for(path: str) -> str:
    """The packaged datasets builder that reads a file, from its extension."""
    name = path
    for suffix in _COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    suffix = os.path.splitext(name)[1]
    try:
        return _BUILDER_BY_SUFFIX[suffix]
    except KeyError:
        raise ValueError(f"cannot tell the format of {path!r}; use one of {sorted(_BUILDER_BY_SUFFIX)}") from None


def files_for_split(data_files: Any, split: str) -> list[str]:
    """Resolve ``data_files`` for one split: a dict ``{split: glob(s)}`` or a glob with ``{split}``."""
    if isinstance(data_files, dict):
        patterns = data_files.get(split)
        if patterns is None:
            raise UnreadablePathError(f"data_files has no entry for split {split!r}: {data_files}")
    elif isinstance(data_files, str) and "{split}" in data_files:
        patterns = data_files.format(split=split)
    else:
        raise ValueError("data_files must be a dict {split: path-or-glob} or a glob containing '{split}'")
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = sorted(f for pattern in patterns for f in glob.glob(os.path.expanduser(pattern), recursive=True))
    if not files:
        raise UnreadablePathError(f"no file matches {patterns} (split {split!r})")
    for f in files:
        if not os.access(f, os.R_OK):
            raise UnreadablePathError(f"cannot read {f}")
    return files


def local_fingerprint(paths: list[str]) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted(paths):
        stat = os.stat(path)
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def _data_dir_files(data_dir: str) -> list[str]:
    if not os.path.isdir(data_dir):
        raise UnreadablePathError(f"data_dir {data_dir} is not a readable directory")
    return [str(p) for p in Path(data_dir).rglob("*") if p.is_file() and not p.name.startswith(".")]


def load_split(
    hf_path: str,
    hf_name: str | None,
    split: str,
    *,
    data_files: Any = None,
    data_dir: str | None = None,
    revision: str | None = None,
    streaming: bool = False,
):
    """One split as a datasets ``Dataset`` (or ``IterableDataset`` when streaming)."""
    # `datasets` takes seconds to import and only the hub-backed sources need it.
    import datasets

    if data_files is not None:
        files = files_for_split(data_files, split)
        return datasets.load_dataset(builder_for(files[0]), data_files={split: files}, split=split, streaming=streaming)
    if data_dir is not None:
        # A copy of the hub repository holds one folder per config; a folder of split files works too.
        config_dir = Path(data_dir) / hf_name if hf_name else None
        directory = str(config_dir) if config_dir is not None and config_dir.is_dir() else data_dir
        _data_dir_files(directory)
        return datasets.load_dataset(directory, split=split, streaming=streaming)
    try:
        return datasets.load_dataset(hf_path, hf_name, split=split, revision=revision, streaming=streaming)
    except Exception as error:
        raise CorpusNotFoundError(
            f"could not load {hf_path} ({hf_name or 'default'}, split {split!r}) from the Hugging Face hub "
            f"or its local cache: {type(error).__name__}: {error}. Without network access, pass the source "
            f"option data_files={{split: path}} or data_dir=... pointing at local files in the same schema."
        ) from error


def version_of(
    hf_path: str,
    hf_name: str | None,
    *,
    data_files: Any = None,
    data_dir: str | None = None,
    revision: str | None = None,
) -> str:
    if data_files is not None:
        keys = list(data_files) if isinstance(data_files, dict) else ["train", "validation", "test"]
        files = [f for split in keys for f in files_for_split(data_files, split)]
        return f"local:{local_fingerprint(files)}"
    if data_dir is not None:
        return f"local:{local_fingerprint(_data_dir_files(data_dir))}"
    return f"hub:{hf_path}/{hf_name or 'default'}@{revision or 'main'}"
