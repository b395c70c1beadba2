"""Errors of the data layer, each telling the user what to do next."""

from __future__ import annotations


class DataError(RuntimeError):
    """Base class: anything that stops a corpus from being read or tokenized."""


class CorpusNotFoundError(DataError, FileNotFoundError):
    """A corpus that must be installed first (the message names the install command)."""


class UnreadablePathError(DataError, OSError):
    """A path given by the user that does not exist or cannot be read (the message names it)."""


INSTALL_HINT = "run `bash scripts/prepare_corpora.sh` (or `make data`) to install it"
