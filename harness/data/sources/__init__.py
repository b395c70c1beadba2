"""Corpora behind one interface; importing this package registers every built-in source."""

from . import offline_english, slimpajama, text_files, wikitext  # noqa: F401  (registration)
from .base import SOURCES, Source, available_sources, get_source, register_source

__all__ = ["SOURCES", "Source", "available_sources", "get_source", "register_source"]
