"""SlimPajama-627B through Hugging Face datasets, streamed (it is ~900 GB).

Rows are ``{"text": ..., "meta": {"redpajama_set_name": ...}}``. Streaming never materialises
the corpus; ``max_documents`` bounds each split so a prepared cache has a definite size.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

from ..documents import Document
from .base import Source, register_source
from .hf import load_split, version_of


@register_source
class SlimPajama(Source):
    name = "slimpajama"
    defaults = {
        "hf_path": "cerebras/SlimPajama-627B",
        "revision": None,
        "data_files": None,
        "data_dir": None,
        # Documents read per split; None reads the whole split (only sensible for local files).
        "max_documents": 20_000,
        # Keep only these redpajama_set_name values (e.g. ["RedPajamaWikipedia"]); None keeps all.
        "subsets": None,
    }

    def hub_dataset(self) -> str | None:
        o = self.options
        return None if o["data_files"] or o["data_dir"] else o["hf_path"]

    def version(self) -> str:
        o = self.options
        return version_of(
            o["hf_path"], None, data_files=o["data_files"], data_dir=o["data_dir"], revision=o["revision"]
        )

    def _documents(self, split: str) -> Iterator[Document]:
        o = self.options
        rows = load_split(
            o["hf_path"],
            None,
            split,
            data_files=o["data_files"],
            data_dir=o["data_dir"],
            revision=o["revision"],
            streaming=True,
        )
        subsets = set(o["subsets"]) if o["subsets"] else None
        kept = (row for row in rows if subsets is None or (row.get("meta") or {}).get("redpajama_set_name") in subsets)
        for number, row in enumerate(islice(kept, o["max_documents"])):
            meta = {**(row.get("meta") or {}), "corpus": "slimpajama"}
            yield Document(f"slimpajama/{split}/{number}", row["text"], meta)
