"""Atomic file writes: write a temp file in the target's folder, then rename it into place, so a
reader (or a resumed run) never sees half a file. Used by every writer in the harness."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import tempfile
import warnings
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


def set_aside(path: Path, reason: str) -> Path | None:
    """Rename an unreadable file beside itself (kept for inspection, out of the way of a re-run)
    and warn, naming it and why. Returns the new path (None if another process moved it first)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        path.replace(target)
    except FileNotFoundError:
        return None
    warnings.warn(f"{path} could not be read ({reason}); set aside as {target.name}", stacklevel=2)
    return target


def file_digest(path: Path) -> str:
    """ "<size>:<sha256>" of a file, recorded beside files whose truncation must be detected before
    they are loaded."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{path.stat().st_size}:{digest.hexdigest()}"
