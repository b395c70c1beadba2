"""Parser for GCIDE, the Collaborative International Dictionary of English, as Debian's
dict-gcide installs it: a dictd database (``gcide.index`` + dictzip'd ``gcide.dict.dz``).

The index lines are ``headword<TAB>offset<TAB>length`` with offset/length in dictd's base64;
they point into the *uncompressed* data. Several headwords (variant spellings) point to the same
block, so blocks are deduplicated by position. Dictzip is gzip-compatible, so the stdlib gzip
module reads it; no dictd tooling is needed.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

DICTD_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DIGIT = {c: i for i, c in enumerate(DICTD_BASE64)}

# Entries of the database header (license, URL, ...), not dictionary text.
DATABASE_ENTRY_PREFIX = "00-database-"

# Source attributions such as "[1913 Webster]" or "[WordNet 1.5 +PJC]". Whatever follows one on
# the same line is an artefact of the conversion (the next headword), so it goes too.
_SOURCE = r"(?:1913 Webster|Webster 1913 Suppl\.|WordNet(?: [\d.]+| sense \d+)?|PJC\.?|AS|RDH|Century Dict\. 1906)"
_ATTRIBUTION = re.compile(rf"[ \t]*\[{_SOURCE}(?:\s*\+?\s*{_SOURCE})*\][^\n]*")
# The syllabified headword "\A*ban"don\" and the respelling "([.a]*b[a^]n"d[u^]n)" after it.
_PRONUNCIATION = re.compile(r"[ \t]*\\[^\\\n]{1,200}\\(?:[ \t]*\([^()\n]*\))?")
# Accented letters written as "[=a]", "['e]", "[a^]", "[.a]": keep the base letter(s).
_ACCENT_BEFORE = re.compile(r"\[[=\-.~'`\",^]{1,2}([A-Za-z]{1,2})\]")
_ACCENT_AFTER = re.compile(r"\[([A-Za-z]{1,2})\^\]")
# Named characters; unknown names are left as written.
_NAMED = {
    "ae": "ae",
    "oe": "oe",
    "AE": "AE",
    "OE": "OE",
    "eth": "th",
    "thorn": "th",
    "th": "th",
    "imac": "i",
    "aum": "a",
    "asl": "a",
    "add": "a",
    "udd": "u",
    "ng": "ng",
    "yogh": "y",
    "root": "√",
    "deg": "°",
    "sect": "§",
    "pounds": "£",
    "times": "×",
    "bar": "|",
    "alpha": "α",
    "beta": "β",
    "gamma": "γ",
    "theta": "θ",
    "iota": "ι",
    "kappa": "κ",
    "pi": "π",
    "rho": "ρ",
    "tau": "τ",
    "phi": "φ",
}
_NAMED_RE = re.compile(r"\[(" + "|".join(sorted(_NAMED, key=len, reverse=True)) + r")\]")
# Cross references "{Appended}" are plain words once the braces go.
_BRACES = re.compile(r"[{}]")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_SPACE_RUNS = re.compile(r"[ \t]{2,}")


def decode_dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _DIGIT[char]
    return value


def parse_index(index_text: str) -> list[tuple[str, int, int]]:
    """``(headword, offset, length)`` for every line of a dictd index."""
    entries = []
    for line in index_text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        headword, offset, length = parts
        entries.append((headword, decode_dictd_number(offset), decode_dictd_number(length)))
    return entries


def _gap_after(match: re.Match) -> str:
    """Removed markup sometimes glued two words ("\\Ex*pe"di*ent*ly\\adv."): keep them apart."""
    following = match.string[match.end() : match.end() + 1]
    return " " if following.isalnum() else ""


def clean_entry(raw: str) -> str:
    """Dictionary markup -> readable text: one paragraph per line, wrapped lines joined."""
    text = _ATTRIBUTION.sub("", raw)
    text = _PRONUNCIATION.sub(_gap_after, text)
    text = _ACCENT_BEFORE.sub(r"\1", text)
    text = _ACCENT_AFTER.sub(r"\1", text)
    text = _NAMED_RE.sub(lambda m: _NAMED[m.group(1)], text)
    text = _BRACES.sub("", text)
    paragraphs = (
        _SPACE_RUNS.sub(" ", " ".join(line.strip() for line in block.splitlines() if line.strip()))
        for block in _BLANK_LINES.split(text)
    )
    return "\n".join(p for p in paragraphs if p)


def _headword(raw: str, index_names: list[str]) -> str:
    """The word the entry defines: the text before its pronunciation on the first line."""
    first_line = raw.lstrip("\n").split("\n", 1)[0]
    if "\\" in first_line:
        candidate = first_line.split("\\", 1)[0].strip()
        if candidate:
            return candidate
    return index_names[0]


def _drop_preamble(raw: str, index_names: list[str]) -> str:
    """The first block also carries the tail of the database header; the entry starts at the
    line that opens with its headword and pronunciation."""
    lines = raw.split("\n")
    first = next((line for line in lines if line.strip()), "")
    if "\\" in first:
        return raw
    for number, line in enumerate(lines):
        if any(line.startswith(f"{name} \\") for name in index_names):
            return "\n".join(lines[number:])
    return raw


def iter_entries(data: bytes, index: list[tuple[str, int, int]]) -> Iterator[tuple[str, str]]:
    """``(headword, cleaned text)`` per dictionary block, in file order."""
    names_by_block: dict[tuple[int, int], list[str]] = {}
    for headword, offset, length in index:
        names_by_block.setdefault((offset, length), []).append(headword)
    end_of_previous = 0
    for (offset, length), names in sorted(names_by_block.items()):
        if any(name.startswith(DATABASE_ENTRY_PREFIX) for name in names):
            continue
        # A block inside the previous one is a duplicate view of the same text.
        if offset < end_of_previous:
            continue
        end_of_previous = offset + length
        # The data is Latin-1/cp1252 debris in a few places, not valid UTF-8.
        raw = _drop_preamble(data[offset : offset + length].decode("utf-8", errors="replace"), names)
        text = clean_entry(raw)
        if text:
            yield _headword(raw, names), text


def read_gcide(dict_path: Path, index_path: Path) -> Iterator[tuple[str, str]]:
    opener = gzip.open if dict_path.suffix == ".dz" or dict_path.suffix == ".gz" else open
    with opener(dict_path, "rb") as f:
        data = f.read()
    index = parse_index(index_path.read_bytes().decode("utf-8", errors="replace"))
    return iter_entries(data, index)
