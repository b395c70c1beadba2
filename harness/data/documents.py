"""The unit every source yields, the split names, and the stable hash used to assign splits."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Document:
    """One document of a corpus: an article, a dictionary entry, a file."""

    doc_id: str
    text: str
    meta: dict = field(default_factory=dict)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def stable_unit_hash(key: str) -> float:
    """Map a string to [0, 1) identically on every machine and Python run.

    Python's built-in hash() is salted per process, so it cannot decide splits.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_by_hash(key: str, validation_fraction: float, test_fraction: float) -> str:
    """Assign a held-out unit (headword, file path) to a split from its stable hash."""
    u = stable_unit_hash(key)
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"
