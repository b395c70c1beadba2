"""The offline suite: four lm-eval tasks built from the held-out (test) split of `offline-english`.

- `regla_define`: a dictionary definition -> its headword, 4-way multiple choice (acc, acc_norm).
- `regla_lastword`: a held-out Brown passage -> its last word, 4-way multiple choice.
- `regla_ppl`: rolling perplexity and bits-per-byte on held-out Brown passages.
- `regla_mqar`: multi-query associative recall (Zoology, Arora et al. 2023): word key-value pairs,
  then queries; each query is scored as multiple choice over the values present.

Everything is derived deterministically (sorted inputs, stable hashes, seeded RNGs), so the same
corpus always yields byte-identical jsonl files. The task definitions are the YAML files next to
this module; at run time a generated YAML includes one and points it at the built data.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import data as data_layer
from ..atomic import atomic_write_text
from ..data import DataError, get_source, iter_documents
from .task_yaml import local_data_overrides, write_task_yaml

#: Bump whenever the items change for the same corpus: the cache directory is keyed by it.
SUITE_VERSION = "1"
OFFLINE_TASKS = ("regla_define", "regla_lastword", "regla_ppl", "regla_mqar")
TASK_YAML_DIR = Path(__file__).resolve().parent
MANIFEST = "manifest.json"

CHOICES = 4
# Sized so that the whole suite scores a smoke-grid model (4 x 128, linear attention, 4k BPE
# vocabulary, max_seq_len 128) in under two minutes on a 2-core CPU without any `limit`.
MAX_DEFINE_ITEMS = 300
MAX_LASTWORD_ITEMS = 150
PPL_PASSAGE_CHARS = 1500
MAX_PPL_PASSAGES = 50
LASTWORD_MIN_CHARS, LASTWORD_MAX_CHARS = 200, 600
MQAR_SEQUENCES, MQAR_PAIRS, MQAR_QUERIES = 40, 6, 3
DEFINITION_MAX_CHARS = 240

_WORD = re.compile(r"^[a-z]{3,14}$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,14})(?P<punct>[.!?]['\"]?)$", re.S)
# GCIDE entries open with "Headword, n. [etymology] 1. (Domain) definition": markers to peel off.
_POS_MARKERS = re.compile(
    r"^(?:(?:n|a|adj|adv|v|t|i|prep|conj|interj|pron|pl|p|pr|imp|vb|sing|fem|masc)\.\s*|&\s*|,\s*)+"
)
_LEADING_NOISE = re.compile(r"^(?:\[[^\]]*\]\s*|\d+\.\s*|\([^)]*\)\s*|[a-z]\)\s*)+")
_BRACKETS = re.compile(r"\s*\[[^\]]*\]")


class OfflineSuiteUnavailable(FileNotFoundError):
    """The suite's data is not built and the corpus to build it from is not installed."""


def stable_key(*parts: str) -> str:
    # Not hash(): Python salts it per process, and the suite must be identical everywhere.
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8).hexdigest()


def _meta(doc: Any) -> dict:
    return getattr(doc, "meta", None) or {}


def _is_dictionary(doc: Any) -> bool:
    return "headword" in _meta(doc)


# -- regla_define ----------------------------------------------------------------------------------


def definition_of(doc: Any) -> str | None:
    """The first sense of a dictionary entry as one clause, without the headword, or None."""
    meta = _meta(doc)
    headword = meta["headword"]
    if meta.get("gloss"):
        # WordNet: the gloss is "definition; \"example\"; ...".
        text = meta["gloss"].split(";")[0]
    else:
        text = doc.text.split("\n", 1)[0]
        if text.lower().startswith(headword.lower()):
            text = text[len(headword) :]
        text = _POS_MARKERS.sub("", text.lstrip(" ,"))
        text = _LEADING_NOISE.sub("", text)
    text = _BRACKETS.sub("", text).strip()
    # Keep the definition proper: quoted usage examples and "--Author" citations follow it.
    text = re.split(r';|\n|"|--', text)[0].strip().rstrip(".,:")
    # The headword, or a word sharing its stem ("educational" for "educationally"), gives it away.
    stem = headword[: max(4, len(headword) - 4)]
    text = re.sub(rf"\b{re.escape(stem)}\w*", "___", text, flags=re.I)
    if len(text) < 12 or len(text) > DEFINITION_MAX_CHARS or not re.search(r"[a-z]{3}", text):
        return None
    return text


def _choose_distractors(answer: str, pool: list[str], salt: str) -> list[str]:
    """CHOICES - 1 distinct words of `pool` other than `answer`, in a stable pseudo-random order.

    `pool` may repeat words: a word is then drawn in proportion to how often it occurs, so that
    distractors follow the same distribution as the answers. Otherwise a frequent (short) answer
    would stand out against rare (long) distractors, and even an untrained model -- which gives
    fewer tokens a higher likelihood -- would beat chance.
    """
    ranked = sorted(enumerate(pool), key=lambda item: stable_key(salt, answer, str(item[0]), item[1]))
    chosen: list[str] = []
    for _, word in ranked:
        if word != answer and word not in chosen:
            chosen.append(word)
            if len(chosen) == CHOICES - 1:
                break
    return chosen


def _multiple_choice(answer: str, distractors: list[str], salt: str) -> tuple[list[str], int]:
    choices = sorted([answer, *distractors], key=lambda w: stable_key(salt, "order", answer, w))
    return choices, choices.index(answer)


def define_items(documents: list[Any]) -> list[dict]:
    entries: dict[str, str] = {}
    # WordNet glosses first: they are cleaner than GCIDE's first lines for the same headword.
    for doc in sorted(filter(_is_dictionary, documents), key=lambda d: (_meta(d).get("corpus") != "wordnet", d.doc_id)):
        headword = _meta(doc)["headword"].strip().lower()
        if headword in entries or not _WORD.match(headword):
            continue
        definition = definition_of(doc)
        if definition:
            entries[headword] = definition
    pool = sorted(entries)
    if len(pool) < CHOICES:
        return []
    items = []
    for headword in sorted(pool, key=lambda w: stable_key("define", w))[:MAX_DEFINE_ITEMS]:
        choices, label = _multiple_choice(headword, _choose_distractors(headword, pool, "define"), "define")
        items.append({"definition": entries[headword], "choices": choices, "label": label})
    return items


# -- passages (regla_lastword, regla_ppl) ----------------------------------------------------------


def _prose_documents(documents: list[Any]) -> list[Any]:
    prose = [d for d in documents if not _is_dictionary(d)]
    return sorted(prose, key=lambda d: d.doc_id)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def passages(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Consecutive whole sentences grouped into passages of min_chars..max_chars characters."""
    out, current = [], ""
    for sentence in _sentences(text):
        candidate = f"{current} {sentence}".strip()
        if len(candidate) > max_chars:
            if len(current) >= min_chars:
                out.append(current)
            current = sentence if len(sentence) <= max_chars else ""
        else:
            current = candidate
    if len(current) >= min_chars:
        out.append(current)
    return out


def lastword_items(documents: list[Any]) -> list[dict]:
    candidates = []
    for doc in _prose_documents(documents):
        for passage in passages(doc.text, LASTWORD_MIN_CHARS, LASTWORD_MAX_CHARS):
            match = _LAST_WORD.match(passage)
            if match and match["word"].islower():
                candidates.append((match["context"], match["word"]))
    # Every occurrence counts (see _choose_distractors): frequent last words are frequent distractors.
    pool = sorted(word for _, word in candidates)
    if len(set(pool)) < CHOICES:
        return []
    items = []
    for context, word in sorted(candidates, key=lambda c: stable_key("lastword", *c))[:MAX_LASTWORD_ITEMS]:
        choices, label = _multiple_choice(word, _choose_distractors(word, pool, "lastword:" + context), "lastword")
        items.append({"context": context, "choices": choices, "label": label})
    return items


def ppl_items(documents: list[Any]) -> list[dict]:
    prose = _prose_documents(documents) or sorted(documents, key=lambda d: d.doc_id)
    texts = [p for doc in prose for p in passages(doc.text, PPL_PASSAGE_CHARS // 3, PPL_PASSAGE_CHARS)]
    # Hash order: lm-eval's `limit` takes the first rows, which should span many documents.
    texts = sorted(texts, key=lambda t: stable_key("ppl", t))
    return [{"text": t} for t in texts[:MAX_PPL_PASSAGES]]


# -- regla_mqar ------------------------------------------------------------------------------------


def mqar_vocabulary(documents: list[Any]) -> list[str]:
    """Short lower-case words; those seen more than once when there are enough (fewer typos)."""
    counts: dict[str, int] = {}
    for doc in documents:
        for word in re.findall(r"\b[a-z]{3,7}\b", doc.text):
            counts[word] = counts.get(word, 0) + 1
    repeated = sorted(w for w, n in counts.items() if n > 1)
    return repeated if len(repeated) >= 4 * MQAR_PAIRS else sorted(counts)


def mqar_items(documents: list[Any], seed: int = 0) -> list[dict]:
    """Each sequence: MQAR_PAIRS "key value" pairs, then MQAR_QUERIES keys to recall.

    One item per query; earlier queries of the same sequence appear answered in its context, as
    in Zoology's multi-query setting. Keys and values are disjoint, so a value never doubles as a key.
    """
    vocabulary = mqar_vocabulary(documents)
    if len(vocabulary) < 2 * MQAR_PAIRS:
        return []
    items = []
    for sequence in range(MQAR_SEQUENCES):
        rng = random.Random(f"mqar:{seed}:{sequence}")
        words = rng.sample(vocabulary, 2 * MQAR_PAIRS)
        keys, values = words[:MQAR_PAIRS], words[MQAR_PAIRS:]
        pairs = ", ".join(f"{k} {v}" for k, v in zip(keys, values))
        queried = rng.sample(range(MQAR_PAIRS), MQAR_QUERIES)
        answered: list[str] = []
        for query in queried:
            recall = ", ".join([*answered, keys[query]])
            items.append(
                {
                    "context": f"Pairs: {pairs}.\nRecall: {recall}",
                    "choices": values,
                    "label": query,
                    "sequence": sequence,
                }
            )
            answered.append(f"{keys[query]} {values[query]}")
    return items


# -- building and locating the suite ---------------------------------------------------------------

BUILDERS = {
    "regla_define": define_items,
    "regla_lastword": lastword_items,
    "regla_ppl": ppl_items,
    "regla_mqar": mqar_items,
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def build_offline_suite(
    out_dir: str | Path, documents: Iterable[Any] | None = None, source_version: str | None = None
) -> Path:
    """Write `<out_dir>/<task>/test.jsonl` for every offline task, then `manifest.json`.

    `documents`: objects with doc_id, text and meta (harness.data.Document); by default the test
    split of `offline-english`, whose version then goes into the manifest (or `source_version`).
    A task the documents cannot feed (e.g. no dictionary entries) gets no file, and scoring it
    reports that.
    """
    out_dir = Path(out_dir)
    if documents is None:
        source_version = source_version or installed_corpus_version()
        documents = _installed_test_documents()
    documents = list(documents)
    counts = {}
    for task, build in BUILDERS.items():
        rows = build(documents)
        counts[task] = len(rows)
        if rows:
            _write_jsonl(out_dir / task / "test.jsonl", rows)
    manifest = {
        "suite_version": SUITE_VERSION,
        "source_version": source_version,
        "documents": len(documents),
        "items": counts,
    }
    # Written last and atomically: its presence is what marks the suite complete.
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2))
    return out_dir


def _installed_test_documents() -> list[Any]:
    try:
        return list(iter_documents("offline-english", "test"))
    except DataError as exc:
        raise OfflineSuiteUnavailable(f"cannot build the offline suite: {exc}") from exc


def installed_corpus_version() -> str | None:
    """The installed offline-english corpus's version, or None when it cannot be read here."""
    try:
        return get_source("offline-english").version()
    except DataError:
        return None


def _built_for(suite_dir: Path) -> str | None:
    try:
        return json.loads((suite_dir / MANIFEST).read_text()).get("source_version")
    except (OSError, ValueError):
        return None


def default_suite_dir() -> Path:
    # Looked up on the data layer at call time: its cache directory is configurable (and patched in tests).
    return data_layer.cache_dir() / "lm_eval" / f"offline-suite-v{SUITE_VERSION}"


def offline_suite_dir(data_dir: str | Path | None) -> Path:
    """A directory holding the built suite: `data_dir` if it has one, else the cache (built on demand)."""
    if data_dir is not None and (Path(data_dir) / MANIFEST).is_file():
        return Path(data_dir)
    cached = default_suite_dir()
    # The cache is rebuilt when the installed corpus changed since it was built (a corpus that
    # cannot be read here leaves a complete cache in use).
    current = installed_corpus_version()
    if not (cached / MANIFEST).is_file() or (current is not None and _built_for(cached) != current):
        _rebuild(cached, current)
    return cached


def _rebuild(suite_dir: Path, source_version: str | None) -> None:
    """Build beside `suite_dir`, then swap the new suite in: readers never see a mix of old and new
    task files, and tasks the new corpus cannot feed leave no stale file behind."""
    suite_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{suite_dir.name}-", dir=suite_dir.parent))
    try:
        build_offline_suite(staging, source_version=source_version)
        if suite_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{suite_dir.name}-old-", dir=suite_dir.parent))
            os.replace(suite_dir, retired / "suite")
            shutil.rmtree(retired, ignore_errors=True)
        os.replace(staging, suite_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_offline_task_yaml(name: str, yaml_dir: Path, suite_dir: Path) -> Path:
    data = suite_dir / name / "test.jsonl"
    if not data.is_file():
        raise OfflineSuiteUnavailable(
            f"task {name}: no items in {data} (the corpus the suite was built from had no text this task "
            f"needs); rebuild it with harness.tasks.build_offline_suite(<dir>) from offline-english "
            f"(install: bash scripts/prepare_corpora.sh) and set that directory as data_dir "
            f"(the grid file's `eval: {{data_dir: ...}}`)"
        )
    overrides = local_data_overrides({"test": data}, ("test",))
    return write_task_yaml(yaml_dir, name, TASK_YAML_DIR / f"{name}.yaml", overrides)
