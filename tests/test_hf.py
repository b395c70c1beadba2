"""The ecosystem: self-contained checkpoints (safetensors + tokenizer.json + config.json), the
transformers export (Auto classes, generate), and lm-eval's own command line on a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harness.hf  # noqa: F401  (registers model_type "regla" with transformers)
from harness.checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint
from harness.config import AttentionConfig, ModelConfig
from harness.data.tokenization import ByteTokenizer
from harness.hf import ReGLAForCausalLM
from harness.model import LanguageModel
from harness.tasks import build_offline_suite

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

VARIANTS = {
    "softmax": dict(softmax_layers="all"),
    "gla": dict(attention=AttentionConfig(feature_map="identity", gate="gla", output_gate="swish")),
    "regla": dict(attention=AttentionConfig(feature_map="safe_exp", gate="refined")),
    "hybrid": dict(softmax_layers="odd", attention=AttentionConfig(feature_map="safe_exp", gate="refined")),
}


def harness_model(variant: str, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=256, **VARIANTS[variant])
    model = LanguageModel(config)
    # Not the initial weights only: biases and norms away from their init values too.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.tensor([ByteTokenizer().encode("The gate refines what the state keeps")])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_loads_in_transformers_with_identical_logits_and_generation(variant, tmp_path, prompt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = harness_model(variant), ByteTokenizer()
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(exported, ReGLAForCausalLM)
    with torch.no_grad():
        assert torch.equal(exported(prompt).logits, model(prompt)[0])
    # Greedy generate() over the model's own state = the harness's incremental decoding.
    greedy = exported.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(greedy, model.generate(prompt, 12))
    # Sampling: reproducible under a seed, tokens inside the vocabulary.
    samples = []
    for _ in range(2):
        torch.manual_seed(7)
        samples.append(exported.generate(prompt, max_new_tokens=12, do_sample=True, top_k=50, temperature=0.9))
    assert torch.equal(samples[0], samples[1]) and int(samples[0].max()) < 257
    # The tokenizer loads as transformers' fast tokenizer with the same ids.
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    text = "ünïcödé and ascii"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id


def test_beam_search_reorders_every_layer_state(tmp_path, prompt):
    model = harness_model("hybrid")
    exported = ReGLAForCausalLM.from_harness(model, ByteTokenizer()).eval()
    beams = exported.generate(prompt.repeat(2, 1), max_new_tokens=6, num_beams=3, do_sample=False)
    assert beams.shape == (2, prompt.shape[1] + 6) and torch.equal(beams[0], beams[1])


def test_conversion_is_lossless_both_ways(tmp_path, prompt):
    model, tokenizer = harness_model("hybrid"), ByteTokenizer()
    exported = ReGLAForCausalLM.from_harness(model, tokenizer)
    exported.save_pretrained(tmp_path / "hf")  # transformers' own writer
    shutil.copy(tmp_path / "hf" / "model.safetensors", tmp_path / "hf-weights.safetensors")
    save_checkpoint(model, tokenizer, tmp_path / "harness")
    # transformers' files, with the tokenizer beside them, load back into the harness module...
    shutil.copy(tmp_path / "harness" / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    back, _ = load_checkpoint(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(back(prompt)[0], model(prompt)[0])
    assert exported.to_harness() is model
    assert back.lm_head.weight is back.embed.weight  # the tie survives


def test_a_fresh_process_loads_a_checkpoint_without_corpus_or_grid(tmp_path, prompt):
    model = harness_model("regla")
    save_checkpoint(model, ByteTokenizer(), tmp_path / "ckpt")
    with torch.no_grad():
        expected = model(prompt)[0][0, -1].tolist()
    script = (
        "import json, sys, torch\n"
        "import harness.hf\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / 'ckpt')!r})\n"
        "ids = tokenizer('The gate refines what the state keeps', return_tensors='pt')['input_ids']\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(model(ids).logits[0, -1].tolist()))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('harness.data.sources.'))))\n"
    )
    missing = tmp_path / "nowhere"
    env = {**os.environ, "REGLA_DATA_DIR": str(missing), "REGLA_CACHE_DIR": str(missing), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    logits, sources = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert logits == expected
    assert not missing.exists()  # nothing read or written in the data or cache folders


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:200]),
            "model.safetensors cannot be read (truncated or not safetensors)",
        ),
        (lambda d: (d / "tokenizer.json").write_text("{not json"), "tokenizer.json cannot be read"),
        (lambda d: edit_config(d, lambda c: c["model"].update(d_modle=64)), "config.json: its model settings"),
        (lambda d: edit_config(d, lambda c: c.update(regla_format=1)), "config.json is checkpoint format 1"),
        (
            lambda d: edit_config(d, lambda c: c["model"].update(d_model=64, n_heads=4)),
            "model.safetensors does not fit the model in config.json (wrong shape: blocks.0.attn",
        ),
    ],
    ids=[
        "no_weights",
        "no_tokenizer",
        "no_config",
        "truncated_weights",
        "bad_tokenizer",
        "bad_key",
        "old_format",
        "other_shape",
    ],
)
def test_a_damaged_checkpoint_fails_naming_the_file(tmp_path, damage, message):
    save_checkpoint(harness_model("regla"), ByteTokenizer(), tmp_path / "ckpt")
    damage(tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "ckpt")
    assert message in str(info.value).replace(str(tmp_path / "ckpt") + "/", "")


def edit_config(directory: Path, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def start_lm_eval_cli(model_type: str, checkpoint: Path, suite: Path, out: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "harness.lm_eval", "--model", model_type, "--model_args", f"pretrained={checkpoint}",
        "--tasks", "regla_define,regla_lastword", "--include_path", str(ROOT / "harness" / "tasks"),
        "--metadata", json.dumps({"data_dir": str(suite)}), "--limit", "8", "--device", "cpu",
        "--batch_size", "4", "--output_path", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "hf"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def lm_eval_results(process: subprocess.Popen, out: Path) -> dict:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout[-2000:] + stderr[-3000:]
    [results_file] = [p for p in out.rglob("results_*.json")]
    return json.loads(results_file.read_text())["results"]


def test_lm_eval_command_line_scores_a_checkpoint_with_both_adapters(tmp_path):
    from harness.data import Document

    documents = [Document(**json.loads(line)) for line in open(FIXTURES / "lm_eval" / "offline_english_test.jsonl")]
    suite = build_offline_suite(tmp_path / "suite", documents)
    save_checkpoint(harness_model("hybrid"), ByteTokenizer(), tmp_path / "ckpt")
    # The two command lines run side by side (each mostly imports lm-eval and transformers).
    started = {name: start_lm_eval_cli(name, tmp_path / "ckpt", suite, tmp_path / name) for name in ("regla", "hf")}
    ours, theirs = (lm_eval_results(started[name], tmp_path / name) for name in ("regla", "hf"))
    for task in ("regla_define", "regla_lastword"):
        assert ours[task]["acc,none"] == pytest.approx(theirs[task]["acc,none"])
        assert 0 <= ours[task]["acc,none"] <= 1
