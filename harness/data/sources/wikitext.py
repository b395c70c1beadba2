"""WikiText-103 / WikiText-2 (raw) through Hugging Face datasets.

The dataset is a column ``text`` of lines; an article starts at a top-level heading line
`` = Title = `` (sections are `` = = Section = = ``). Lines are grouped back into articles so a
document is an article, as the benchmark intends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from ..documents import Document
from .base import Source, register_source
from .hf import load_split, version_of

_ARTICLE_HEADING = re.compile(r"^ = ([^=].*?) = $")


def group_articles(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(title, text)`` per article; text keeps one paragraph or heading per line."""
    title, body = "", []
    for line in lines:
        stripped = line.rstrip("\n")
        heading = _ARTICLE_HEADING.match(stripped)
        if heading:
            if body:
                yield title, "\n".join(body)
            title, body = heading.group(1).strip(), [stripped.strip()]
        elif stripped.strip():
            body.append(stripped.strip())
    if body:
        yield title, "\n".join(body)


class _WikiText(Source):
    hf_name: str
    defaults = {"hf_path": "Salesforce/wikitext", "revision": None, "data_files": None, "data_dir": None}

    def _load(self, split: str):
        o = self.options
        return load_split(
            o["hf_path"],
            self.hf_name,
            split,
            data_files=o["data_files"],
            data_dir=o["data_dir"],
            revision=o["revision"],
        )

    def hub_dataset(self) -> str | None:
        o = self.options
        return None if o["data_files"] or o["data_dir"] else o["hf_path"]

    def version(self) -> str:
        o = self.options
        return version_of(
            o["hf_path"], self.hf_name, data_files=o["data_files"], data_dir=o["data_dir"], revision=o["revision"]
        )

    def _documents(self, split: str) -> Iterator[Document]:
        dataset = self._load(split)
        for number, (title, text) in enumerate(group_articles(row["text"] for row in dataset)):
            yield Document(f"{self.name}/{split}/{number}", text, {"title": title, "corpus": self.name})


@register_source
class WikiText103(_WikiText):
    name = "wikitext-103"
    hf_name = "wikitext-103-raw-v1"


@register_source
class WikiText2(_WikiText):
    name = "wikitext-2"
    hf_name = "wikitext-2-raw-v1"
