"""Parser for WordNet's synset files (``data.noun``/``verb``/``adj``/``adv``, Debian wordnet-base).

A data line is ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] ... | gloss``
with ``w_cnt`` in hexadecimal; lines starting with two spaces are the license header.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")

# Adjective lemmas carry a syntactic marker such as "(a)", "(p)" or "(ip)".
_ADJECTIVE_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Synset:
    offset: str
    pos: str
    lemmas: tuple[str, ...]
    gloss: str

    @property
    def text(self) -> str:
        return f"{', '.join(self.lemmas)}: {self.gloss}"


def parse_data_line(line: str, pos: str) -> Synset | None:
    if line.startswith("  ") or " | " not in line:
        return None
    fields_part, gloss = line.split(" | ", 1)
    fields = fields_part.split()
    word_count = int(fields[3], 16)
    words = fields[4 : 4 + 2 * word_count : 2]
    lemmas = tuple(_ADJECTIVE_MARKER.sub("", w).replace("_", " ") for w in words)
    return Synset(offset=fields[0], pos=pos, lemmas=lemmas, gloss=gloss.strip())


def parse_data_file(text: str, pos: str) -> Iterator[Synset]:
    for line in text.splitlines():
        synset = parse_data_line(line, pos)
        if synset is not None:
            yield synset


def read_wordnet(wordnet_dir: Path) -> Iterator[Synset]:
    for pos in PARTS_OF_SPEECH:
        text = (wordnet_dir / f"data.{pos}").read_bytes().decode("utf-8", errors="replace")
        yield from parse_data_file(text, pos)
