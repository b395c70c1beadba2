"""Atomic file writes: write a temp file in the target's folder, then rename it into place, so a
reader (or a resumed run) never sees half a file. Used by every writer in the harness."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path_beside(path: Path) -> Path:
    """A fresh temp file next to `path` with the usual umask-based mode (mkstemp makes it 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_current_umask())
    return Path(tmp)


def atomic_write_bytes(path: str | Path, write: Callable[[str], object]) -> None:
    """`write(temp_path)` fills a temp file, which then replaces `path` in one rename."""
    path = Path(path)
    tmp = temp_path_beside(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
