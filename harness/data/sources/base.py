"""The interface every corpus implements, and the registry that names them."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

from registry import Registry

from ..documents import Document, check_split


class Source(ABC):
    """A corpus that yields documents per split.

    Subclasses declare their options (with defaults) in ``defaults``; unknown options are an
    error so a typo never silently selects a different corpus.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"source {self.name!r} got unknown option(s) {unknown}; allowed: {allowed}")
        self.options = {**self.defaults, **options}

    def documents(self, split: str) -> Iterator[Document]:
        return self._documents(check_split(split))

    @abstractmethod
    def _documents(self, split: str) -> Iterator[Document]: ...

    @abstractmethod
    def version(self) -> str:
        """A string that changes when the underlying text changes (files, parser, revision).

        Raises CorpusNotFoundError / UnreadablePathError when the corpus cannot be read.
        """

    def hub_dataset(self) -> str | None:
        """The Hugging Face hub dataset that reading this source downloads; None when it reads
        local files only (a dry run checks the data of such sources, and downloads nothing)."""
        return None

    def cache_key(self) -> str:
        """Readable and unique per (source, options): the directory name of derived caches."""
        canonical = json.dumps(self.options, sort_keys=True, default=str)
        digest = hashlib.blake2b(canonical.encode(), digest_size=6).hexdigest()
        return f"{self.name}-{digest}"


#: Corpora by name; `data.source` in a grid file picks one.
SOURCES: Registry[type[Source]] = Registry(
    "data source", hint="Add one by subclassing harness.data.Source and decorating it with @register_source."
)


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: registers a Source subclass under its `name`."""
    return SOURCES.register(cls.name, cls)


def available_sources() -> list[str]:
    return SOURCES.names()


def get_source(name: str, **options: Any) -> Source:
    """An instance of source `name`; unknown names and options raise, saying what is allowed."""
    return SOURCES.get(name)(**options)
