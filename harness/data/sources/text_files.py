"""``text-files``: any glob of UTF-8 text files, one file per document."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

from ..documents import Document, stable_unit_hash
from ..errors import UnreadablePathError
from .base import Source, register_source
from .hf import local_fingerprint


@register_source
class TextFiles(Source):
    name = "text-files"
    defaults = {"pattern": None, "validation_fraction": 0.05, "test_fraction": 0.05}

    def _files(self) -> list[str]:
        pattern = self.options["pattern"]
        if not pattern:
            raise ValueError("source 'text-files' needs the option pattern='path/**/*.txt'")
        files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
        if not files:
            raise UnreadablePathError(f"no file matches {pattern!r}")
        return files

    def _assignment(self) -> dict[str, str]:
        """Split of each file: files ranked by the stable hash of their path.

        Ranking (not thresholding) guarantees held-out files even for a handful of files,
        as long as there are at least three.
        """
        files = sorted(self._files(), key=stable_unit_hash)
        n = len(files)
        n_validation = max(1, round(n * self.options["validation_fraction"])) if n >= 3 else 0
        n_test = max(1, round(n * self.options["test_fraction"])) if n >= 3 else 0
        splits = ["validation"] * n_validation + ["test"] * n_test
        splits += ["train"] * (n - len(splits))
        return dict(zip(files, splits))

    def version(self) -> str:
        return f"files:{local_fingerprint(self._files())}"

    def _documents(self, split: str) -> Iterator[Document]:
        for path, assigned in sorted(self._assignment().items()):
            if assigned != split:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as error:
                raise UnreadablePathError(f"cannot read {path} as UTF-8 text: {error}") from error
            yield Document(path, text, {"path": path, "corpus": "text-files"})
