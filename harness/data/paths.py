"""Default locations of installed corpora and of derived caches (tokenizers, token arrays)."""

from __future__ import annotations

import os
from pathlib import Path

# harness/data/paths.py -> the repository root, so defaults do not depend on the working directory.
REPO_ROOT = Path(__file__).resolve().parents[2]


def corpora_dir() -> Path:
    """Where scripts/prepare_corpora.sh unpacks downloaded corpora (git-ignored /data/)."""
    return Path(os.environ.get("REGLA_DATA_DIR") or REPO_ROOT / "data" / "corpora")


def cache_dir() -> Path:
    """Where trained tokenizers and tokenized arrays go (git-ignored /.cache/)."""
    return Path(os.environ.get("REGLA_CACHE_DIR") or REPO_ROOT / ".cache" / "data")
