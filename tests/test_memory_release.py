"""Running out of memory, or failing, costs one measurement or one run, never the ones after it:
a failed stage's tensors are freed before the next stage starts, and the profile stage records the
length that did not fit and keeps the shorter ones."""

from __future__ import annotations

import gc
import json
import weakref

import torch

import harness.stages.profiling as profiling
from harness.config import ModelConfig
from harness.grid import expand_grid
from harness.measure import saved_for_backward_mib
from harness.model import LanguageModel
from harness.runner import run_grid
from harness.stages.recall import MQARStage

from .pipeline_helpers import tiny_grid


def test_a_failed_stages_tensors_are_freed_before_the_next_run(corpus, tmp_path, monkeypatch):
    """The traceback of a failure holds the stage's frames; a tensor they keep in a reference cycle
    would live until the cyclic collector next runs. The runner frees it when the stage ends."""
    alive: list[weakref.ref] = []

    def failing_run(self, spec, ctx):
        held = {"activations": torch.zeros(1024)}
        held["cycle"] = held  # what a module, closure or frame often makes
        alive.append(weakref.ref(held["activations"]))
        raise RuntimeError("the stage failed with its activations in a cycle")

    monkeypatch.setattr(MQARStage, "run", failing_run)
    data = tiny_grid(corpus)
    data["stages"] = ["mqar"]
    data["base"]["mqar"] = {"settings": [[16, 2]], "vocab_size": 32, "steps": 1}
    grid = expand_grid(data)
    gc.disable()  # the automatic collector must not do the runner's job here
    try:
        results = run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False, device="cpu")
    finally:
        gc.enable()
    assert [r.status for r in results] == ["failed"] * len(grid.runs)
    assert alive and all(ref() is None for ref in alive)


def test_profile_records_the_length_that_ran_out_of_memory_and_keeps_the_shorter_ones(monkeypatch):
    timed: list[int] = []
    real = profiling._training_step_records

    def records_or_out_of_memory(step, forward, batch_size, seq_len, *rest):
        if seq_len >= 24:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        timed.append(seq_len)
        return real(step, forward, batch_size, seq_len, *rest)

    monkeypatch.setattr(profiling, "_training_step_records", records_or_out_of_memory)
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=64))
    records = profiling.profile_training_step(model, [8, 16, 24, 32], 2, torch.device("cpu"), warmup=0, repeats=1)
    assert timed == [8, 16]  # 32 is not tried once 24 did not fit
    timed_rows = [r for r in records if r["metric"] == "profile/train_step_ms" and r.get("status") != "failed"]
    assert [json.loads(r["extra"])["seq_len"] for r in timed_rows] == [8, 16]
    [failed] = [r for r in records if r.get("status") == "failed"]
    assert failed["metric"] == "profile/train_step_ms"
    assert failed["error"].startswith(
        "out of memory at T = 24, batch 2: CUDA out of memory. Tried to allocate 2.00 GiB."
    )


def test_measuring_saved_tensors_does_not_keep_the_model_alive():
    """The saved-tensor hooks see the outputs an op saves; packing the tensor itself would store it
    with its grad_fn inside that grad_fn's node, a cycle through C++ that no collector frees: the
    forward's activations and, through the graph's leaves, the whole model, for good (a profile
    grid lost ~14 GiB per run on a GPU that way)."""
    weight = measured_model_weight()
    gc.collect()
    assert weight() is None


def measured_model_weight() -> weakref.ref:
    """A weak reference to a parameter of a model whose forward was measured, once the model is
    out of scope."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=64))
    tokens = torch.randint(0, 32, (2, 17))
    assert saved_for_backward_mib(lambda: model.loss(tokens[:, :-1], tokens[:, 1:])) > 0
    return weakref.ref(model.embed.weight)
