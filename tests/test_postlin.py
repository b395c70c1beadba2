"""Post-linearization (harness.postlin): tiny randomly initialised GPT-NeoX, GPT-2 and Llama models
(saved to a temporary directory, no hub) and the harness's own checkpoints, converted to linear
attention; the grid's `model.init`, its run ids and the order in which runs go."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import kernels
from harness import cli as cli_module
from harness.checkpoint_io import save_checkpoint
from harness.cli import EXIT_INVALID, EXIT_OK
from harness.cli import main as cli_main
from harness.cluster import check_no_source_in_array
from harness.config import AttentionConfig, ConfigError, InitConfig, ModelConfig
from harness.data import DataError, prepare_data
from harness.data.tokenization import ByteTokenizer, get_tokenizer
from harness.executor import next_ready
from harness.grid import expand_grid, load_grid, sources_first
from harness.layers import LinearAttention, SoftmaxAttention
from harness.lm_eval_model import ReGLALM
from harness.model import build_model
from harness.postlin.families import UnsupportedModel, family_named
from harness.postlin.own import convert_language_model
from harness.postlin.pretrained import LinearAdapter, SoftmaxAdapter, convert_pretrained
from harness.postlin.start import (
    architecture_model,
    initial_model,
    is_transformers_source,
    load_trained,
    new_parameters,
    save_trained,
    source_identity,
)
from harness.report import recovery_table, write_report
from harness.results import load as load_results
from harness.runner import run_grid
from harness.spec import spec_from_dict
from harness.stages import StageContext
from harness.train import train
from tests.pipeline_helpers import tiny_grid

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 257  # the byte tokenizer's: a saved tiny model gets it as its tokenizer
D, H, T = 32, 4, 12

#: family -> (model class, config, where its attention modules live)
FAMILIES = {
    "gpt_neox": (
        GPTNeoXForCausalLM,
        # Pythia's layout: fused per-head qkv with biases, a quarter of each head rotated, parallel residual.
        lambda n: GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=D,
            num_hidden_layers=n,
            num_attention_heads=H,
            intermediate_size=64,
            max_position_embeddings=64,
            rotary_pct=0.25,
            eos_token_id=256,
            bos_token_id=256,
        ),
        "gpt_neox.layers.{}.attention.",
    ),
    "gpt2": (
        GPT2LMHeadModel,
        lambda n: GPT2Config(
            vocab_size=VOCAB, n_embd=D, n_layer=n, n_head=H, n_positions=64, eos_token_id=256, bos_token_id=256
        ),
        "transformer.h.{}.attn.",
    ),
    "llama": (
        LlamaForCausalLM,
        # Grouped-query attention: 2 key-value heads for 4 query heads.
        lambda n: LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=D,
            num_hidden_layers=n,
            num_attention_heads=H,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            eos_token_id=256,
            bos_token_id=256,
        ),
        "model.layers.{}.self_attn.",
    ),
}
REGLA = AttentionConfig(feature_map="safe_exp", norm="rmsnorm", gate="refined")


def pretrained(family: str, n_layers: int = 2, seed: int = 0):
    model_class, config, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return model_class(config(n_layers)).eval()


def tokens(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved_neox(tmp_path_factory):
    """A tiny GPT-NeoX and the byte tokenizer saved as a transformers directory."""
    directory = tmp_path_factory.mktemp("neox")
    pretrained("gpt_neox").save_pretrained(directory)
    fast = PreTrainedTokenizerFast(tokenizer_object=ByteTokenizer().to_tokenizers(), eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return directory


# -- conversion of transformers models ------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_softmax_layers_compute_what_the_pretrained_model_computes(family):
    original = pretrained(family)
    converted = convert_pretrained(copy.deepcopy(original), REGLA, softmax_layers="all").eval()
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(converted(idx)[0], original(idx).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_untouched_layers_are_bit_identical(family):
    original = pretrained(family)
    converted = convert_pretrained(copy.deepcopy(original), REGLA, softmax_layers=[0])
    attention = FAMILIES[family][2]
    mine = dict(converted.hf.named_parameters())
    compared = 0
    for name, parameter in original.named_parameters():
        if name.startswith(attention.format(1)):
            continue  # the converted layer's attention
        # The kept layer's pretrained module sits inside its adapter, as `inner`.
        key = name.replace(attention.format(0), attention.format(0) + "inner.")
        assert torch.equal(mine[key], parameter), name
        compared += 1
    assert compared == len([n for n in dict(original.named_parameters()) if not n.startswith(attention.format(1))])


def causal_linear_attention(q, k, v, scale):
    """o_t = scale * sum_{s <= t} (q_t . k_s) v_s on [B, T, H, K], written out."""
    scores = torch.einsum("bthk,bshk->bhts", q, k) * scale
    mask = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
    return torch.einsum("bhts,bshk->bthk", scores.masked_fill(~mask, 0.0), v)


def by_hand_qkv(family, module, x):
    """q, k, v [B, T, H, K] from the pretrained projections, each family's layout written out."""
    B, K = x.shape[0], D // H
    if family == "gpt_neox":
        q, k, v = module.query_key_value(x).view(B, T, H, 3 * K).chunk(3, dim=-1)
    elif family == "gpt2":
        q, k, v = (t.view(B, T, H, K) for t in module.c_attn(x).split(D, dim=-1))
    else:  # llama: 2 key-value heads, each serving 2 consecutive query heads
        q = module.q_proj(x).view(B, T, H, K)
        k, v = (p(x).view(B, T, 2, K).repeat_interleave(2, dim=2) for p in (module.k_proj, module.v_proj))
    return q, k, v


def by_hand_output(family, module, o):
    if family == "gpt_neox":
        return module.dense(o)
    if family == "gpt2":
        return module.c_proj(o)
    return module.o_proj(o)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_features_without_gate_or_norm_is_causal_linear_attention_of_the_pretrained_projections(family):
    original = pretrained(family)
    plain = AttentionConfig(feature_map="identity", norm="none", gate="none")
    converted = convert_pretrained(copy.deepcopy(original), plain, softmax_layers="none")
    attr = family_named(family).attention_attr
    module = getattr(family_named(family).layers(original)[0], attr)
    adapter = getattr(family_named(family).layers(converted.hf)[0], attr)
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(T)[None]
    kwargs = {}
    with torch.no_grad():
        q, k, v = by_hand_qkv(family, module, x)
        if family != "gpt2":  # the family's own rotary, on the first rotary dims of each head
            rotary = original.gpt_neox.rotary_emb if family == "gpt_neox" else original.model.rotary_emb
            cos, sin = rotary(x, positions)
            kwargs["position_embeddings"] = (cos, sin)
            q, k = family_named(family).apply_rotary(q, k, cos, sin, unsqueeze_dim=2)
        scale = adapter.attn.feature_map.kernel_scale
        expected = by_hand_output(family, module, causal_linear_attention(q, k, v, scale).reshape(2, T, D))
        got, _ = adapter(x, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern, kept", [("even", [0, 2]), ("last_half", [2]), ([-1], [2]), ("none", [])])
def test_hybrid_converts_exactly_the_chosen_layers(pattern, kept):
    converted = convert_pretrained(pretrained("llama", n_layers=3), REGLA, softmax_layers=pattern)
    kinds = [type(layer.self_attn) for layer in converted.hf.model.layers]
    assert kinds == [SoftmaxAdapter if i in kept else LinearAdapter for i in range(3)]
    assert converted.config.softmax_layers == tuple(kept)
    assert len(converted.linear_attention_layers()) == 3 - len(kept)


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2", "llama"])
def test_converted_model_decodes_incrementally_trains_and_generates(family):
    model = convert_pretrained(pretrained(family), REGLA, softmax_layers=[1]).eval()
    idx = tokens()
    with torch.no_grad():
        full, _ = model(idx)
        first, state = model(idx[:, :7], use_cache=True)
        rest, _ = model(idx[:, 7:], state, use_cache=True)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)
    generated = model.generate(idx[:1, :4], max_new_tokens=5)
    assert generated.shape == (1, 9) and torch.equal(generated[:, :4], idx[:1, :4])

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tokens(4, T + 1, seed=5)
    losses = []
    for _ in range(6):
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_converted_model_scores_through_the_lm_eval_model_class():
    model = convert_pretrained(pretrained("gpt_neox"), REGLA, softmax_layers="odd").eval()
    tokenizer = ByteTokenizer()
    lm = ReGLALM(model=model, tokenizer=tokenizer, batch_size=2, max_gen_toks=4)
    pairs = [("The cat", " sat"), ("Hello", " world"), ("a", "b")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, _) in zip(pairs, got):
        ids = tokenizer.encode(context) + tokenizer.encode(continuation)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[:-1]]))
        target = torch.tensor(ids[1:])[-len(continuation) :]
        expected = F.log_softmax(logits[0, -len(continuation) :], -1).gather(-1, target[:, None]).sum()
        assert logprob == pytest.approx(float(expected), abs=1e-4)
    [text] = lm.generate_until([Instance("generate_until", {}, ("The", {"until": ["\n"]}), 0)], disable_tqdm=True)
    assert isinstance(text, str)


def test_unsupported_family_and_bad_layer_pattern_say_what_is_supported():
    with pytest.raises(UnsupportedModel, match="supported: gpt2, gpt_neox, llama"):
        family_named("opt")
    with pytest.raises(ConfigError, match=r"out of range for 2 layers \(allowed 0..1"):
        convert_pretrained(pretrained("gpt2"), REGLA, softmax_layers=[5])
    with pytest.raises(ConfigError, match="must be one of none, all, even"):
        convert_pretrained(pretrained("gpt2"), REGLA, softmax_layers="every_third")


def test_local_transformers_directory_converts_saves_and_loads(saved_neox, tmp_path):
    tokenizer = get_tokenizer(f"hf:{saved_neox}")
    assert tokenizer.decode(tokenizer.encode("post-linearized")) == "post-linearized"
    config = ModelConfig(n_layers=2, softmax_layers=[0], attention=REGLA, init={"from_pretrained": str(saved_neox)})
    model = initial_model(config, tokenizer, seed=0, runs_dir=tmp_path)
    assert len(model.linear_attention_layers()) == 1
    idx = tokens()
    save_trained(model, tokenizer, tmp_path / "model", config)
    again, _ = load_trained(tmp_path / "model")
    with torch.no_grad():
        assert torch.equal(again(idx)[0], model.eval()(idx)[0])
    with pytest.raises(ConfigError, match="set data.tokenizer to"):
        initial_model(config, ByteTokenizer(), seed=0, runs_dir=tmp_path)
    with pytest.raises(ConfigError, match="must equal the layers"):
        initial_model(replace(config, n_layers=3, softmax_layers="none"), tokenizer, seed=0, runs_dir=tmp_path)


def test_a_local_source_enters_the_run_id_by_its_content(saved_neox, tmp_path):
    before = source_identity(InitConfig(from_pretrained=str(saved_neox)))
    assert before.startswith("sha256:")
    assert source_identity(InitConfig(from_pretrained="EleutherAI/pythia-160m")) == "hub:EleutherAI/pythia-160m@main"
    with pytest.raises(ConfigError, match="does not exist"):
        source_identity(InitConfig(from_pretrained=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="does not exist"):
        source_identity(InitConfig(from_pretrained="runs/grid/abc/model"))
    changed = tmp_path / "changed"
    pretrained("gpt_neox", seed=1).save_pretrained(changed)
    assert source_identity(InitConfig(from_pretrained=str(changed))) != before


# -- conversion of the harness's own models -------------------------------------------------------


def harness_softmax(vocab: int = 64):
    config = ModelConfig(vocab_size=vocab, d_model=D, n_layers=2, n_heads=H, max_seq_len=32, softmax_layers="all")
    return build_model(config, vocab, seed=0).eval()


def test_harness_model_conversion_reuses_the_trained_projections():
    source = harness_softmax()
    target = replace(source.config, softmax_layers=[1], attention=replace(REGLA, rotary=True))
    model = convert_language_model(source, target, seed=0)
    kept, converted = model.blocks[1].attn, model.blocks[0].attn
    assert isinstance(kept, SoftmaxAttention) and isinstance(converted, LinearAttention)
    q, k, v = source.blocks[0].attn.qkv_proj.weight.chunk(3)
    for mine, theirs in ((converted.q_proj, q), (converted.k_proj, k), (converted.v_proj, v)):
        assert torch.equal(mine.weight, theirs)
    untouched = [n for n in source.state_dict() if not n.startswith("blocks.0.attn.")]
    for name in untouched:
        assert torch.equal(model.state_dict()[name], source.state_dict()[name]), name
    # With every layer kept softmax the model is the source, to the bit.
    same = convert_language_model(source, source.config, seed=0).eval()
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(same(idx)[0], source(idx)[0])


def test_linear_layers_with_rotary_positions_decode_as_they_run_in_full():
    config = ModelConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=H, max_seq_len=32, softmax_layers=[1])
    model = build_model(replace(config, attention=replace(REGLA, rotary=True)), 64, seed=0).eval()
    unrotated = build_model(config, 64, seed=0).eval()
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(idx)
        first, state = model(idx[:, :4], use_cache=True)
        steps = [first]
        for t in range(4, 10):
            logits, state = model(idx[:, t : t + 1], state, use_cache=True)
            steps.append(logits)
        assert not torch.allclose(full, unrotated(idx)[0])  # the positions change what it computes
    assert state[0].position == 10
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_harness_conversion_refuses_what_does_not_fit():
    source = harness_softmax()
    with pytest.raises(ConfigError, match=r"d_model \(64; the source has 32\)"):
        convert_language_model(source, replace(source.config, d_model=64), seed=0)
    with pytest.raises(ConfigError, match="attention.rotary"):
        convert_language_model(source, replace(source.config, softmax_layers="none", attention=REGLA), seed=0)
    hybrid = convert_language_model(
        source, replace(source.config, softmax_layers=[1], attention=replace(REGLA, rotary=True)), seed=0
    )
    with pytest.raises(ConfigError, match="not back"):
        convert_language_model(hybrid, replace(hybrid.config, softmax_layers="all"), seed=0)


def test_train_only_new_parameters_for_the_first_steps(corpus, tmp_path):
    grid = tiny_grid(corpus, steps=2, warmup_steps=0, eval_every=2, checkpoint_every=2)
    grid["base"]["model"]["rotary"] = False  # the source below has no rotary: nothing to keep
    source = build_model(ModelConfig(vocab_size=VOCAB, **grid["base"]["model"], softmax_layers="all"), VOCAB, 0)
    save_checkpoint(source, ByteTokenizer(), tmp_path / "source")
    sections = copy.deepcopy(grid["base"])
    sections["model"]["attention"] = dict(feature_map="safe_exp", norm="rmsnorm", gate="refined")
    sections["model"]["init"] = {"from_pretrained": str(tmp_path / "source"), "train_only_new_for_steps": 2}
    spec = spec_from_dict(sections, name="converted")
    assert spec.model.init.source_id.startswith("sha256:")

    data = prepare_data(spec.data.source, spec.data.tokenizer, dict(spec.data.options))
    start = initial_model(spec.model, ByteTokenizer(), 0, tmp_path)
    model, records = train(spec, data, tmp_path / "run", device="cpu", progress=False)
    new = {id(p) for p in new_parameters(model)}
    assert new and math.isfinite(next(r["value"] for r in records if r["metric"] == "final/val_loss"))
    for (name, before), after in zip(start.named_parameters(), model.parameters()):
        assert torch.equal(before, after) == (id(after) not in new), name


# -- grids: run ids, sources, order --------------------------------------------------------------


def converting_grid(corpus) -> dict:
    grid = tiny_grid(corpus, steps=6, warmup_steps=1, eval_every=3, checkpoint_every=3)
    grid["axes"] = {
        "variant": {
            "softmax": {"model.softmax_layers": "all"},
            "regla": {"model.attention": {"feature_map": "safe_exp", "gate": "refined", "rotary": True}},
            "hybrid": {"model.softmax_layers": [1], "model.attention": {"gate": "gla", "rotary": True}},
        },
        "init": {"scratch": {}, "converted": {"model.init": {"from_pretrained": "run:softmax/scratch"}}},
    }
    grid["exclude"] = [{"variant": "softmax", "init": "converted"}]
    return grid


def test_a_source_run_enters_the_run_id_and_runs_first(corpus):
    grid = expand_grid(converting_grid(corpus))
    runs = {spec.name: spec for spec in grid.runs}
    source = runs["softmax/scratch"]
    assert runs["regla/converted"].model.init.source_id == source.run_id
    # The source is last in the grid's order; sources_first moves it ahead of its dependents.
    reordered = [spec.name for spec in sources_first(list(reversed(grid.runs)))]
    assert reordered.index("softmax/scratch") < reordered.index("regla/converted")
    # The --gpus executor starts no converted run while its source is pending or running.
    pending = [runs["regla/converted"], runs["regla/scratch"]]
    assert next_ready(pending, {0: (None, source)}) is runs["regla/scratch"]
    assert next_ready(pending[:1], {}) is runs["regla/converted"]
    # A job array starts its tasks in any order: it refuses a run whose source is in the same array.
    with pytest.raises(ValueError, match="submit their source runs first"):
        check_no_source_in_array(list(grid.runs))
    check_no_source_in_array([spec for spec in grid.runs if spec.model.init is None])
    # Changing the source changes every run that starts from it.
    changed = converting_grid(corpus)
    changed["axes"]["variant"]["softmax"]["train.lr"] = 1e-3
    other = {spec.name: spec.run_id for spec in expand_grid(changed).runs}
    assert other["regla/converted"] != runs["regla/converted"].run_id
    assert other["regla/scratch"] == runs["regla/scratch"].run_id


def test_bad_source_references_are_refused_when_the_grid_loads(corpus):
    grid = converting_grid(corpus)
    grid["axes"]["init"]["converted"]["model.init"]["from_pretrained"] = "run:softmax/nope"
    with pytest.raises(ConfigError, match="has no run of that name; its runs: softmax/scratch"):
        expand_grid(grid)
    grid = converting_grid(corpus)
    grid["axes"]["variant"]["regla"]["model.d_model"] = 64
    with pytest.raises(ConfigError, match=r"run 'regla/converted'.*d_model \(64; the source has 32\)"):
        expand_grid(grid)


def test_a_converting_grid_runs_end_to_end(corpus, tmp_path):
    grid = expand_grid(converting_grid(corpus))
    runs = [spec for spec in grid.runs if spec.name.startswith("hybrid/")] + [grid.runs[0]]
    results = run_grid(grid, runs, runs_dir=tmp_path, device="cpu", progress=False)
    order = ["hybrid/scratch", "softmax/scratch", "hybrid/converted"]  # runs from a source go after it
    assert [(r.run.name, r.status) for r in results] == [(name, "ok") for name in order]
    converted, _ = load_trained(tmp_path / grid.name / runs[1].run_id / "model")
    assert len(converted.linear_attention_layers()) == 1 and converted.config.attention.rotary
    # The report compares each variant converted and from scratch, from the converted model's start.
    report = write_report(grid.name, tmp_path, tmp_path / "results", runs=runs)
    assert (tmp_path / "results" / grid.name / "recovery.png").is_file()
    assert "## Recovery" in (tmp_path / "results" / grid.name / "RESULTS.md").read_text(), report
    # A committed report is rewritten from its results.parquet alone (no runs folder): the same
    # recovery table and plot.
    parquet = tmp_path / "results" / grid.name / "results.parquet"
    again = ["--runs-dir", str(tmp_path / "none"), "--results-dir", str(tmp_path / "again")]
    assert cli_main(["report", grid.name, "--from-parquet", str(parquet), *again]) == EXIT_OK
    recovery = lambda path: path.read_text().split("## Recovery")[1].split("\n## ")[0]  # noqa: E731
    assert (tmp_path / "again" / grid.name / "recovery.png").is_file()
    first = recovery(tmp_path / "results" / grid.name / "RESULTS.md")
    assert recovery(tmp_path / "again" / grid.name / "RESULTS.md") == first and "| hybrid |" in first
    frame = load_results(grid.name, tmp_path)
    starts = frame[(frame["metric"] == "val/loss") & (frame["step"] == 0)]
    assert list(starts["run_name"]) == ["hybrid/converted"]
    # A converted run whose source has not run says so.
    alone = run_grid(grid, [spec for spec in grid.runs if spec.name == "regla/converted"], runs_dir=tmp_path / "b")
    assert alone[0].status == "failed" and "has no trained model" in alone[0].error
    assert "train the source run" in alone[0].advice


def test_the_offline_demonstration_grid_pairs_every_variant_with_its_conversion():
    grid = load_grid(ROOT / "grids/paper/postlin_offline.yaml")
    runs = {spec.name: spec for spec in grid.runs}
    source = runs.pop("softmax/scratch")
    variants = {"relu", "fast_decay", "gla", "regla", "hybrid_regla"}
    assert set(runs) == {f"{v}/{init}" for v in variants for init in ("scratch", "converted")}
    for name, spec in runs.items():
        assert spec.train == source.train  # the same tokens
        init = spec.model.init
        assert (init is not None and init.source_id == source.run_id) == name.endswith("/converted")
    gpu = load_grid(ROOT / "grids/paper/postlin_offline.yaml", scale="gpu")
    with torch.device("meta"):
        sizes = [build_model(spec.model, 4096, 0).num_parameters() for spec in gpu.runs]
    assert min(sizes) >= 20e6
    # At the gpu scale: the same 11 runs, the source first (in the grid's order and in the order
    # runs go), every converted run pointing at it, and ids that a second load gives again.
    assert [spec.name for spec in gpu.runs] == [spec.name for spec in grid.runs]
    assert gpu.runs[0].name == "softmax/scratch"
    converted = [spec for spec in gpu.runs if spec.model.init is not None]
    reordered = [spec.name for spec in sources_first(list(reversed(gpu.runs)))]
    assert reordered.index("softmax/scratch") < min(reordered.index(spec.name) for spec in converted)
    assert len(converted) == 5 and {spec.model.init.source_id for spec in converted} == {gpu.runs[0].run_id}
    again = load_grid(ROOT / "grids/paper/postlin_offline.yaml", scale="gpu")
    assert [spec.run_id for spec in again.runs] == [spec.run_id for spec in gpu.runs]
    assert len({spec.run_id for spec in gpu.runs} | {spec.run_id for spec in grid.runs}) == 22
    assert {spec.train.steps * spec.train.batch_size * spec.train.seq_len for spec in gpu.runs} == {20_480_000}


def test_a_dry_run_lists_runs_in_the_order_they_go_and_leaves_hub_data_unchecked(tmp_path, capsys, monkeypatch):
    """A dry run downloads nothing: the Table 5 grid (a hub tokenizer and dataset) lists offline
    and says its data was not checked; a real run still prepares the data first and stops there.
    The offline grid's dry run lists its source run first."""
    runs = ["--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    prepared = []

    def prepare(self, spec):
        prepared.append(spec.name)
        raise DataError(f"tokenizer {spec.data.tokenizer!r} cannot be loaded (no hub here)")

    monkeypatch.setattr(StageContext, "data_for", prepare)
    table5 = str(ROOT / "grids/paper/table5_postlin.yaml")
    assert cli_main(["run", table5, "--dry-run", *runs]) == EXIT_OK
    out = capsys.readouterr().out
    assert "7 runs, stages: train, eval" in out and "| hybrid_regla | pending | pending" in out
    assert "note: data not checked for 7 run(s)" in out
    assert "tokenizer 'hf:EleutherAI/pythia-160m' and dataset 'cerebras/SlimPajama-627B'" in out
    assert not prepared
    assert cli_main(["run", table5, *runs]) == EXIT_INVALID
    assert "cannot be loaded (no hub here)" in capsys.readouterr().err and prepared == ["softmax"]
    assert not (tmp_path / "runs").exists()

    monkeypatch.setattr(cli_module, "preflight", lambda *args, **kwargs: [])  # its data needs `make data`
    offline = str(ROOT / "grids/paper/postlin_offline.yaml")
    assert cli_main(["run", offline, "--scale", "gpu", "--dry-run", *runs]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split(" | ")[1] == "softmax/scratch" and lines[-1] == "11 runs, stages: train, eval"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_layers_take_the_fused_triton_op_on_cuda(family, monkeypatch):
    """On CUDA a converted ReGLA layer goes through the harness's dispatch to the fused Triton op,
    and gives what the composed CPU path gives (the CPU tests above)."""
    cpu = convert_pretrained(pretrained(family), REGLA, softmax_layers=[1]).eval()
    gpu = copy.deepcopy(cpu).cuda()
    calls = []
    fused = kernels.triton_regla
    monkeypatch.setattr(kernels, "triton_regla", lambda *a, **k: calls.append(1) or fused(*a, **k))
    idx = tokens()
    with torch.no_grad():
        got = gpu(idx.cuda())[0].cpu()
        expected = cpu(idx)[0]
    assert calls, "the converted layer did not take the fused op"
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)


def test_a_grid_continues_training_a_transformers_model(corpus, saved_neox, tmp_path):
    """A transformers source through the whole pipeline: its own tokenizer prepares the data, the
    converted model trains, is saved, read back and probed."""
    grid = tiny_grid(corpus, steps=4, warmup_steps=1, eval_every=2, checkpoint_every=2)
    grid["stages"] = ["train", "probe"]
    grid["base"]["data"]["tokenizer"] = f"hf:{saved_neox}"
    grid["base"]["model"]["init"] = {"from_pretrained": str(saved_neox), "train_only_new_for_steps": 1}
    grid["base"]["model"]["softmax_layers"] = [0]
    grid["axes"] = {"variant": {"regla": {"model.attention": {"feature_map": "safe_exp", "gate": "refined"}}}}
    loaded = expand_grid(grid)
    results = run_grid(loaded, loaded.runs, runs_dir=tmp_path, device="cpu", progress=False)
    assert [(r.stage, r.status) for r in results] == [("train", "ok"), ("probe", "ok")]
    frame = load_results(loaded.name, tmp_path)
    assert set(frame[frame["metric"].str.startswith("gate/")]["step"]) == {0, 4}  # before and after


def test_a_run_source_that_is_a_converted_transformers_model_is_refused_when_the_grid_loads(corpus, saved_neox):
    """A `run:` source must be a harness model: one converted from a transformers model is saved as
    a recipe over that model, which a second conversion cannot start from. The grid says so, and
    what to do instead, before anything trains."""
    grid = tiny_grid(corpus)
    grid["base"]["data"]["tokenizer"] = f"hf:{saved_neox}"
    grid["base"]["model"].update(softmax_layers=[0], attention={"feature_map": "safe_exp", "gate": "refined"})
    grid["axes"] = {
        "init": {
            "first": {"model.init": {"from_pretrained": str(saved_neox)}},
            "second": {"model.init": {"from_pretrained": "run:first"}},
        }
    }
    with pytest.raises(ConfigError, match="its source is converted from the transformers model .*Start from that"):
        expand_grid(grid)


# -- stages that build the run's architecture: profile and mqar -----------------------------------


def test_a_converted_transformers_run_is_profiled_as_converted_and_refused_by_mqar(corpus, saved_neox, tmp_path):
    """profile times the converted GPT-NeoX (its kept softmax layer, its partial rotary), not a
    harness model of the grid's sizes; mqar, which would train the source family from scratch,
    records a failure that says what to run instead."""
    config = ModelConfig(n_layers=2, softmax_layers=[0], attention=REGLA, init={"from_pretrained": str(saved_neox)})
    converted = initial_model(config, get_tokenizer(f"hf:{saved_neox}"), seed=0, runs_dir=tmp_path)
    timed = architecture_model(config, None, seed=0, min_seq_len=100)
    assert [type(a) for a in timed.adapters] == [SoftmaxAdapter, LinearAdapter]
    assert timed.adapters[1].apply_rotary is not None and timed.config.max_seq_len == 100
    shapes = lambda model: {n: p.shape for n, p in model.named_parameters()}  # noqa: E731
    assert shapes(timed) == shapes(converted)  # the same modules, random weights
    assert not is_transformers_source(InitConfig(from_pretrained="run:softmax/scratch"))

    grid = tiny_grid(corpus)
    grid["stages"] = ["profile", "mqar"]
    grid["base"]["data"]["tokenizer"] = f"hf:{saved_neox}"
    grid["base"]["model"].update(softmax_layers=[0], init={"from_pretrained": str(saved_neox)})
    grid["base"]["profile"] = dict(
        seq_lens=[16], batch_size=2, generation_lengths=[8], prompt_length=4, warmup=1, repeats=1
    )
    grid["base"]["mqar"] = dict(settings=[[16, 2]], steps=2, batch_size=2, eval_every=1)
    grid["axes"] = {"variant": {"regla": {"model.attention": {"feature_map": "safe_exp", "gate": "refined"}}}}
    loaded = expand_grid(grid)
    results = run_grid(loaded, loaded.runs, runs_dir=tmp_path, device="cpu", progress=False)
    assert [(r.stage, r.status) for r in results] == [("profile", "ok"), ("mqar", "failed")]
    assert "converts the transformers model" in results[1].error
    assert "leave mqar out" in results[1].advice
    frame = load_results(loaded.name, tmp_path)
    generation = frame[frame.metric == "profile/generate_total_ms"]
    assert len(generation) == 1 and '"cuda_graphs": false' in generation.extra.iloc[0]
    assert frame[frame.metric == "profile/train_tokens_per_second"].value.iloc[0] > 0


def test_the_recovery_table_sets_task_accuracy_beside_bits_per_byte():
    def row(run, init, metric, value, stage="train", task=None, shots=None):
        return dict(run_name=run, **{"axis:init": init}, metric=metric, value=value, status="ok", stage=stage,
                    task=task, shots=shots)  # fmt: skip

    rows = []
    for init, bpb, accuracies in (("converted", 1.5, (0.6, 0.8)), ("scratch", 2.0, (0.5, 0.5))):
        rows.append(row(f"regla/{init}", init, "final/val_bits_per_byte", bpb))
        rows += [row(f"regla/{init}", init, "acc", a, "eval", f"task{i}", 0) for i, a in enumerate(accuracies)]
    table = recovery_table(pd.DataFrame(rows))
    assert table.loc["regla", "converted - scratch"] == pytest.approx(-0.5)
    assert table.loc["regla", "converted mean acc (2 task-shots)"] == pytest.approx(0.7)
    assert table.loc["regla", "scratch mean acc (2 task-shots)"] == pytest.approx(0.5)
