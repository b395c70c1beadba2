"""The interface every corpus implements, and the registry that names them."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

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

    def cache_key(self) -> str:
        """Readable and unique per (source, options): the directory name of derived caches."""
        canonical = json.dumps(self.options, sort_keys=True, default=str)
        digest = hashlib.blake2b(canonical.encode(), digest_size=6).hexdigest()
        return f"{self.name}-{digest}"


SOURCES: dict[str, type[Source]] = {}


def register_source(cls: type[Source]) -> type[Source]:
    if cls.name in SOURCES:
        raise ValueError(f"source {cls.name!r} is registered twice")
    SOURCES[cls.name] = cls
    return cls


def available_sources() -> list[str]:
    return sorted(SOURCES)


def get_source(name: str, **options: Any) -> Source:
    try:
        cls = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown data source {name!r}; available: {', '.join(available_sources())}") from None
    return cls(**options)
