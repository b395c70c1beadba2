"""Scoring with lm-eval: the adapter's numbers against the model's own, and every task offline."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import datasets
import lm_eval
import pytest
import torch
import torch.nn.functional as F
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from harness.checkpoint_io import load_checkpoint, save_checkpoint
from harness.config import ModelConfig, from_dict
from harness.data import DataError, Document, get_tokenizer, iter_documents
from harness.evaluate import EvalConfig, evaluate_model
from harness.lm_eval_model import ReGLALM
from harness.model import LanguageModel
from harness.tasks import OFFLINE_TASKS, PAPER_TASKS, build_offline_suite
from harness.tasks.offline_suite import CHOICES, MANIFEST
from harness.tasks.task_yaml import installed_task_yaml

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
PAPER_DATA = FIXTURES / "paper"
MAX_SEQ_LEN = 64


@pytest.fixture(autouse=True)
def offline_datasets_cache(tmp_path_factory, monkeypatch):
    """Local json datasets are cached by `datasets`; keep that out of the user's cache."""
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    # datasets reads the variable once, at import time.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("byte")


def tiny_model(vocab_size: int, softmax_layers: str = "none", seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    config = dict(
        vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=2, max_seq_len=MAX_SEQ_LEN, softmax_layers=softmax_layers
    )
    return LanguageModel(from_dict(ModelConfig, config)).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer.vocab_size)


@pytest.fixture(scope="module")
def fast_model(tokenizer):
    """All-softmax layers: the cheapest forward on CPU, for runs that test lm-eval plumbing."""
    return tiny_model(tokenizer.vocab_size, softmax_layers="all")


def requests(request_type: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=request_type, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


@torch.no_grad()
def direct_logprobs(model: LanguageModel, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[t + 1] | tokens[:t + 1]) for every t, from one unpadded forward."""
    logits, _ = model(torch.tensor([tokens[:-1]]))
    return F.log_softmax(logits[0].double(), -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


# -- the adapter ------------------------------------------------------------------------------------


@pytest.mark.parametrize("softmax_layers", ["none", "all"])
def test_loglikelihood_equals_direct_computation(tokenizer, softmax_layers):
    model = tiny_model(tokenizer.vocab_size, softmax_layers)
    lm = ReGLALM(model=model, tokenizer=tokenizer, batch_size=3)
    long_context = ("The quick brown fox jumps over the lazy dog. " * 4).rstrip()  # > MAX_SEQ_LEN bytes
    pairs = [
        ("The cat sat on the", " mat"),
        ("Hello", " world, again"),
        ("", "Start of text"),
        (long_context, " and then it slept."),
        ("a", "b"),
        ("Question: why?\nAnswer:", " because"),
        ("x" * 10, " y" * 20),
        # One-token choices after one context, and a request whose context + continuation[:-1]
        # is the same text: lm-eval's Collator scores these from one shared row.
        ("Pick one", "!"),
        ("Pick one", "?"),
        ("Pick on", "e!"),
        ("Pick one", "."),
    ]
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    assert len(got) == len(pairs)
    for (context, continuation), (logprob, _) in zip(pairs, got):
        context_ids = tokenizer.encode(context) or [tokenizer.eot_id]
        continuation_ids = tokenizer.encode(continuation)
        # Left truncation: the last max_seq_len + 1 tokens, of which the model reads all but the last.
        tokens = (context_ids + continuation_ids)[-(MAX_SEQ_LEN + 1) :]
        expected = float(direct_logprobs(model, tokens)[-len(continuation_ids) :].sum())
        assert logprob == pytest.approx(expected, abs=1e-3, rel=1e-4)


def test_is_greedy_tells_the_argmax_continuation_apart(model, tokenizer):
    lm = ReGLALM(model=model, tokenizer=tokenizer, batch_size=4)
    context = tokenizer.encode("Once upon a time")
    greedy = model.generate(torch.tensor([context]), max_new_tokens=3)[0, len(context) :].tolist()
    changed = greedy[:2] + [(greedy[2] + 1) % 256]
    answers = lm._loglikelihood_tokens([(None, context, greedy), (None, context, changed)], disable_tqdm=True)
    assert [is_greedy for _, is_greedy in answers] == [True, False]
    assert answers[0][0] > answers[1][0]


def test_adapter_holds_the_live_model(model, tokenizer):
    lm = ReGLALM(model=model, tokenizer=tokenizer)
    assert lm.model is model
    before = lm.loglikelihood(requests("loglikelihood", [("abc", "def")]), disable_tqdm=True)[0][0]
    with torch.no_grad():
        model.final_norm.weight.mul_(2.0)
    try:
        after = lm.loglikelihood(requests("loglikelihood", [("abc", "def")]), disable_tqdm=True)[0][0]
    finally:
        with torch.no_grad():
            model.final_norm.weight.div_(2.0)
    assert after != pytest.approx(before)


def rolling_reference(model: LanguageModel, tokens: list[int], prefix: int, window: int) -> float:
    """lm-eval's disjoint rolling windows, written out: each token predicted once; the first window
    starts from the prefix token, later ones read the `window` tokens before their end."""
    total, start = 0.0, 0
    while start < len(tokens):
        end = min(start + window, len(tokens))
        if start == 0:
            inputs, targets = [prefix] + tokens[: end - 1], tokens[:end]
        else:
            inputs, targets = tokens[end - window - 1 : end - 1], tokens[end - window : end]
        idx, tgt = torch.tensor([inputs]), torch.tensor([targets])
        with torch.no_grad():
            if end - start == window:
                total -= float(model.loss(idx, tgt)) * window
            else:  # the last, partial window: full context, only its new tokens scored
                logits, _ = model(idx)
                losses = F.cross_entropy(logits[0].float(), tgt[0], reduction="none")
                total -= float(losses[-(end - start) :].sum())
        start = end
    return total


@pytest.mark.parametrize("length", [40, 64, 65, 3 * MAX_SEQ_LEN + 17])
def test_rolling_loglikelihood_equals_model_loss(model, tokenizer, length):
    text = ("Rolling windows cover every token exactly once. " * 10)[:length]
    lm = ReGLALM(model=model, tokenizer=tokenizer, batch_size=2)
    [got] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    expected = rolling_reference(model, tokenizer.encode(text), tokenizer.eot_id, MAX_SEQ_LEN)
    assert got == pytest.approx(expected, rel=1e-4)
    if length <= MAX_SEQ_LEN:
        # One window: the plain mean cross-entropy of the model over [eot] + text.
        tokens = tokenizer.encode(text)
        with torch.no_grad():
            loss = model.loss(torch.tensor([[tokenizer.eot_id] + tokens[:-1]]), torch.tensor([tokens]))
        assert got == pytest.approx(-float(loss) * len(tokens), rel=1e-4)


def test_rolling_scores_each_document_separately(model, tokenizer):
    lm = ReGLALM(model=model, tokenizer=tokenizer, batch_size=4)
    texts = ["first document " * 9, "second, shorter", "third " * 30]
    together = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    alone = [lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,)]), disable_tqdm=True)[0] for t in texts]
    assert together == pytest.approx(alone, rel=1e-5)


def test_generate_until_matches_model_generate(model, tokenizer):
    lm = ReGLALM(model=model, tokenizer=tokenizer)
    context = "Once upon a time, there was"
    prompt = tokenizer.encode(context)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, eos_id=tokenizer.eot_id)[0].tolist()
    generated = [t for t in out[len(prompt) :] if t != tokenizer.eot_id]
    expected = tokenizer.decode(generated)
    [text] = lm.generate_until(
        requests("generate_until", [(context, {"until": [], "max_gen_toks": 12})]), disable_tqdm=True
    )
    assert text == expected

    # A stop string cuts the text at its first occurrence (and ends decoding there).
    stop = [c for c in expected[1:] if c.isascii() and c.isprintable()][-1]
    [stopped] = lm.generate_until(
        requests("generate_until", [(context, {"until": [stop], "max_gen_toks": 12})]), disable_tqdm=True
    )
    assert stopped == expected.split(stop)[0] and len(stopped) < len(expected)
    # max_gen_toks bounds the number of generated tokens.
    [short] = lm.generate_until(
        requests("generate_until", [(context, {"until": [], "max_gen_toks": 3})]), disable_tqdm=True
    )
    assert short == tokenizer.decode(generated[:3])


def test_checkpoint_round_trip_and_registry(model, tokenizer, tmp_path):
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    loaded, saved_tokenizer = load_checkpoint(tmp_path / "ckpt")
    assert saved_tokenizer.name == "byte" and loaded.config == model.config
    assert saved_tokenizer.encode("round trip") == tokenizer.encode("round trip")
    x = torch.tensor([tokenizer.encode("round trip")])
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])

    assert get_model("regla") is ReGLALM
    lm = get_model("regla").create_from_arg_string(f"pretrained={tmp_path / 'ckpt'},batch_size=2")
    assert lm.batch_size == 2 and lm.tokenizer_name == "byte" and lm.max_length == MAX_SEQ_LEN
    live = ReGLALM(model=model, tokenizer=tokenizer)
    pair = requests("loglikelihood", [("checkpoint", " scores")])
    assert lm.loglikelihood(pair, disable_tqdm=True) == live.loglikelihood(pair, disable_tqdm=True)
    assert ReGLALM.from_checkpoint(tmp_path / "ckpt").max_length == MAX_SEQ_LEN


# -- the paper's tasks, through lm-eval's own definitions -----------------------------------------


def eval_rows(split: str, task) -> int:
    return sum(1 for _ in open(PAPER_DATA / task.folder / f"{split}.jsonl"))


def installed_version(task) -> float:
    """metadata.version of the installed YAML, following its include: chain (truthfulqa_mc2)."""
    path = installed_task_yaml(task.yaml)
    while True:
        text = yaml.load(path.read_text(), Loader=yaml.BaseLoader)
        if "metadata" in text:
            return float(text["metadata"]["version"])
        path = path.parent / text["include"]


EXPECTED_METRICS = {
    "boolq": {"acc"},
    "piqa": {"acc", "acc_norm"},
    "hellaswag": {"acc", "acc_norm"},
    "winogrande": {"acc"},
    "truthfulqa_mc1": {"acc"},
    "truthfulqa_mc2": {"acc"},
    "arc_easy": {"acc", "acc_norm"},
    "arc_challenge": {"acc", "acc_norm"},
    "lambada_openai": {"acc", "perplexity"},
    "wikitext": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
}


def test_every_paper_task_runs_zero_shot_on_its_fixture(fast_model, tokenizer):
    rows = evaluate_model(
        fast_model, tokenizer, EvalConfig(tasks=["paper"], num_fewshot=[0], data_dir=str(PAPER_DATA), bootstrap_iters=0)
    )
    failed = [r for r in rows if r["status"] != "ok"]
    assert not failed, failed
    assert {r["task"] for r in rows} == set(PAPER_TASKS)
    for name, task in PAPER_TASKS.items():
        task_rows = [r for r in rows if r["task"] == name]
        assert {r["metric"] for r in task_rows} == EXPECTED_METRICS[name]
        for row in task_rows:
            assert row["shots"] == 0 and row["max_length"] == MAX_SEQ_LEN
            assert row["samples"] == eval_rows(task.scored_split, task)
            assert row["task_version"] == installed_version(task)
            assert row["lm_eval_version"] == lm_eval.__version__
            assert math.isfinite(row["value"])
            if row["metric"] in ("acc", "acc_norm"):
                assert 0.0 <= row["value"] <= 1.0
    # mc2 scores the normalised probability of the true answers (lm-eval's process_results_mc2),
    # a fraction strictly between 0 and 1 rather than a 0/1 hit.
    [mc2] = [r for r in rows if r["task"] == "truthfulqa_mc2"]
    assert 0.0 < mc2["value"] < 1.0 and mc2["value"] not in (0.25, 0.5, 0.75)
    [bpb] = [r for r in rows if r["task"] == "wikitext" and r["metric"] == "bits_per_byte"]
    assert 6.0 < bpb["value"] < 10.0  # an untrained byte model: about log2(257) bits per byte


def test_five_shot_prompts_carry_five_examples(fast_model, tokenizer, monkeypatch):
    seen: dict[str, list[str]] = {}
    original = ReGLALM.loglikelihood

    def spy(self, instances, disable_tqdm=False):
        for instance in instances:
            seen.setdefault(instance.task_name, []).append(instance.args[0])
        return original(self, instances, disable_tqdm=disable_tqdm)

    monkeypatch.setattr(ReGLALM, "loglikelihood", spy)
    tasks = ["hellaswag", "winogrande", "arc_easy", "truthfulqa_mc1"]
    rows = evaluate_model(
        fast_model, tokenizer, EvalConfig(tasks=tasks, num_fewshot=[5], data_dir=str(PAPER_DATA), bootstrap_iters=0)
    )
    assert all(r["status"] == "ok" for r in rows), rows
    shots = {r["task"]: (r["shots"], r["requested_shots"]) for r in rows}
    assert shots["hellaswag"] == shots["winogrande"] == shots["arc_easy"] == (5, 5)
    # truthfulqa's YAML pins num_fewshot: 0 and lm-eval keeps it; the row says what actually ran.
    assert shots["truthfulqa_mc1"] == (0, 5)
    for task in ("hellaswag", "arc_easy"):
        # Five solved examples, then the question: six blocks joined by the "\n\n" delimiter.
        assert all(context.count("\n\n") == 5 for context in seen[task]), task
    assert all(context.count("Q: ") == 7 for context in seen["truthfulqa_mc1"])  # 6 in its fixed prompt + 1


def test_missing_task_data_gives_a_failed_row_and_the_rest_run(fast_model, tokenizer, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(PAPER_DATA, data_dir)
    shutil.rmtree(data_dir / "piqa")
    rows = evaluate_model(
        fast_model,
        tokenizer,
        EvalConfig(tasks=["piqa", "boolq"], num_fewshot=[0, 1], data_dir=str(data_dir), bootstrap_iters=0),
    )
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["task"], r["requested_shots"]) for r in failed] == [("piqa", 0), ("piqa", 1)]
    for row in failed:
        assert "piqa" in row["error"] and str(data_dir / "piqa" / "validation.jsonl") in row["error"]
        assert "goal, sol1, sol2, label" in row["error"] and row["value"] is None
    boolq = [r for r in rows if r["task"] == "boolq"]
    assert {(r["shots"], r["metric"]) for r in boolq} == {(0, "acc"), (1, "acc")}
    assert all(r["status"] == "ok" for r in boolq)


def test_without_data_dir_tasks_keep_their_hub_datasets(tmp_path):
    """The generated YAML only includes the installed definition: lm-eval loads the hub dataset."""
    from lm_eval.tasks import TaskManager

    from harness.tasks import write_paper_task_yaml

    for name in ("piqa", "truthfulqa_mc2"):
        body = yaml.safe_load(write_paper_task_yaml(name, tmp_path, None).read_text())
        assert body == {"include": str(installed_task_yaml(PAPER_TASKS[name].yaml)), "task": name}
    local = yaml.safe_load(write_paper_task_yaml("winogrande", tmp_path, PAPER_DATA).read_text())
    assert local["dataset_path"] == "json" and local["dataset_name"] is None
    assert set(local["dataset_kwargs"]["data_files"]) == {"train", "validation"}
    # Indexed under their real names (plus tags such as "truthfulqa" from the included files).
    assert {"piqa", "truthfulqa_mc2", "winogrande"} <= set(
        TaskManager(include_path=str(tmp_path), include_defaults=False).all_tasks
    )


def test_eval_config_rejects_unknown_tasks():
    with pytest.raises(ValueError, match="did you mean 'hellaswag'"):
        EvalConfig(tasks=["helaswag"])
    assert EvalConfig(tasks=["table5", "piqa", "offline"]).resolved_tasks() == (
        "boolq",
        "piqa",
        "hellaswag",
        "winogrande",
        "truthfulqa_mc1",
        "truthfulqa_mc2",
        *OFFLINE_TASKS,
    )


# -- the offline suite -------------------------------------------------------------------------------


def fixture_corpus() -> list[Document]:
    return [Document(**json.loads(line)) for line in open(FIXTURES / "offline_english_test.jsonl")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_suite_is_deterministic_and_well_formed(tmp_path):
    first = build_offline_suite(tmp_path / "a", fixture_corpus())
    second = build_offline_suite(tmp_path / "b", list(reversed(fixture_corpus())))
    for task in OFFLINE_TASKS:
        assert (first / task / "test.jsonl").read_bytes() == (second / task / "test.jsonl").read_bytes(), task
    define = read_jsonl(first / "regla_define" / "test.jsonl")
    headwords = {d.meta["headword"].lower() for d in fixture_corpus() if "headword" in d.meta}
    assert len(define) == len(headwords)
    for item in define:
        answer = item["choices"][item["label"]]
        assert len(set(item["choices"])) == CHOICES and set(item["choices"]) <= headwords
        assert answer[:4] not in item["definition"].lower()  # the headword is masked
    for item in read_jsonl(first / "regla_lastword" / "test.jsonl"):
        assert len(set(item["choices"])) == CHOICES and not item["context"].endswith(" ")
    for item in read_jsonl(first / "regla_mqar" / "test.jsonl"):
        pair_line, recall_line = item["context"].split("\n")
        pairs = dict(p.split(" ") for p in pair_line.removeprefix("Pairs: ").removesuffix(".").split(", "))
        query = recall_line.removeprefix("Recall: ").split(", ")[-1]
        assert pairs[query] == item["choices"][item["label"]]
        assert sorted(pairs.values()) == sorted(item["choices"])


def suite_documents() -> list[Document]:
    """The real held-out split when the corpora are installed, else the fixture corpus."""
    try:
        return list(iter_documents("offline-english", "test"))
    except DataError:
        return fixture_corpus()


def test_offline_suite_cache_follows_the_corpus_version(tmp_path, monkeypatch):
    # The cached suite is rebuilt when the installed corpus changes, and reused while it does not.
    import harness.data
    from harness.tasks import offline_suite

    monkeypatch.setattr(harness.data, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(offline_suite, "_installed_test_documents", fixture_corpus)
    builds = []
    real_build = offline_suite.build_offline_suite
    monkeypatch.setattr(
        offline_suite,
        "build_offline_suite",
        lambda out_dir, *a, **k: builds.append(out_dir) or real_build(out_dir, *a, **k),
    )
    version = {"now": "corpus-1"}
    monkeypatch.setattr(offline_suite, "installed_corpus_version", lambda: version["now"])
    suite = offline_suite.offline_suite_dir(None)
    assert json.loads((suite / MANIFEST).read_text())["source_version"] == "corpus-1" and len(builds) == 1
    offline_suite.offline_suite_dir(None)
    assert len(builds) == 1  # same corpus: the cache is reused
    stale = suite / "regla_define" / "test.jsonl"
    assert stale.is_file()
    version["now"] = "corpus-2"  # a corpus without dictionary entries: no regla_define items any more
    monkeypatch.setattr(
        offline_suite, "_installed_test_documents", lambda: [d for d in fixture_corpus() if "headword" not in d.meta]
    )
    offline_suite.offline_suite_dir(None)
    assert len(builds) == 2 and json.loads((suite / MANIFEST).read_text())["source_version"] == "corpus-2"
    assert not stale.exists()  # swapped in whole: no task file of the old corpus is left behind
    assert sorted(p.name for p in tmp_path.joinpath("lm_eval").iterdir()) == [suite.name]  # no staging left
    version["now"] = None  # corpus not readable here: a complete cache stays in use
    offline_suite.offline_suite_dir(None)
    assert len(builds) == 2


def test_offline_suite_builds_and_scores_a_tiny_model(fast_model, tokenizer, tmp_path):
    suite = build_offline_suite(tmp_path / "suite", suite_documents())
    manifest = json.loads((suite / MANIFEST).read_text())
    assert all(manifest["items"][task] > 0 for task in OFFLINE_TASKS)
    rows = evaluate_model(
        fast_model, tokenizer, EvalConfig(tasks=["offline"], num_fewshot=[0], limit=8, data_dir=str(suite))
    )
    assert all(r["status"] == "ok" for r in rows), rows
    metrics = {(r["task"], r["metric"]): r for r in rows}
    assert set(metrics) == {
        ("regla_define", "acc"),
        ("regla_define", "acc_norm"),
        ("regla_lastword", "acc"),
        ("regla_lastword", "acc_norm"),
        ("regla_mqar", "acc"),
        ("regla_ppl", "word_perplexity"),
        ("regla_ppl", "byte_perplexity"),
        ("regla_ppl", "bits_per_byte"),
    }
    for row in rows:
        assert row["samples"] == min(8, manifest["items"][row["task"]])
    assert metrics[("regla_define", "acc")]["stderr"] is not None  # bootstrap_iters > 0 gives stderr
    # An untrained byte-level model is close to uniform over 257 symbols: ~8 bits per byte.
    assert 7.0 < metrics[("regla_ppl", "bits_per_byte")]["value"] < 9.0
    assert metrics[("regla_ppl", "byte_perplexity")]["value"] == pytest.approx(
        2 ** metrics[("regla_ppl", "bits_per_byte")]["value"], rel=1e-6
    )


@pytest.mark.parametrize("key_max", ["sequence", "chunk", "running"])
def test_scores_do_not_depend_on_batch_mates_for_any_key_max_scope(tokenizer, key_max):
    # Without an output norm the non-causal scopes let later tokens (pads too) change earlier
    # logits: scoring must still give each request the score it gets alone.
    torch.manual_seed(3)
    attention = {"feature_map": "safe_exp", "feature_map_options": {"key_max": key_max, "chunk_size": 8}}
    attention |= {"norm": "none", "gate": "refined"}
    config = from_dict(
        ModelConfig,
        {"vocab_size": tokenizer.vocab_size, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": MAX_SEQ_LEN,
         "attention": attention},
    )  # fmt: skip
    model = LanguageModel(config).eval()
    pairs = [("a short one", " ends"), ("a much longer context that pads the others", " here"), ("mid length", " x")]
    batched = ReGLALM(model=model, tokenizer=tokenizer, batch_size=8)
    alone = ReGLALM(model=model, tokenizer=tokenizer, batch_size=1)
    assert batched.causal == (key_max == "running")
    together = batched.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    separate = [alone.loglikelihood(requests("loglikelihood", [pair]), disable_tqdm=True)[0] for pair in pairs]
    for (score, greedy), (expected, expected_greedy) in zip(together, separate):
        assert score == pytest.approx(expected, abs=1e-5) and greedy == expected_greedy
