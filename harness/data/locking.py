"""A cross-process lock so concurrent ranks (torchrun) build each cache once, not once each."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock named after ``target`` while it is being built.

    Writers still rename complete files into place, so readers that take no lock never see a
    partial file; the lock only saves the duplicated work.
    """
    lock_path = target.with_name(f".{target.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
