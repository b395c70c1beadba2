"""The mqar stage: multi-query associative recall trained from scratch (Zoology, Arora et al.
2024), the synthetic task that separates sequence mixers in minutes: a fresh model of the run's
architecture learns to output, at each query key, the value paired with it earlier.

A sequence is `k1 v1 k2 v2 ... kN vN` followed by noise (token 0) in which every key reappears
once as a query at a power-law distributed gap; the loss and the accuracy count only the token
after each query (its value). Keys come from [1, V/2), values from [V/2, V). One model is trained
on a mix of all settings; accuracy is reported per setting on held-out sequences, and training
stops early once every setting reaches the target.

A run with `model.init` (a converted model): no trained weight enters this stage, only the
architecture. Converted from a harness model, that architecture is the harness model of the
run's config, so the stage trains it as for the same variant from scratch (and gets its result).
Converted from a transformers model, the architecture would be the source family's modules at
the source's size (Pythia-160m for the paper's Table 5), trained from scratch on recall: rarely
what a post-linearization grid means, and at that size slow. The stage refuses such runs
(`StageNotApplicable`, recorded as its failure with what to run instead) rather than guess.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import MQARConfig
from ..distributed import distributed_context, pick_device
from ..model import build_model
from ..postlin.start import is_transformers_source
from ..spec import RunSpec
from ..train import Diverged, autocast_context, learning_rate, make_optimizer
from .base import Stage, StageContext, StageNotApplicable


def mqar_batch(
    batch_size: int, length: int, pairs: int, vocab_size: int, power_a: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, length], labels [B, length]); labels are -100 except at query positions.

    Vectorised over the batch (a per-row loop of `rng.choice` took ~12 ms a batch at Zoology's
    sizes, as long as a small model's training step on a GPU): distinct keys are the `pairs`
    smallest of uniform draws over the key half, in the random order of those draws; the query gaps
    are drawn without replacement with weight ∝ g^(power_a − 1) by Efraimidis–Spirakis keys
    (log u / w, the `pairs` largest), the same distribution as sequential weighted draws."""
    rows = np.arange(batch_size)[:, None]
    draws = rng.random((batch_size, vocab_size // 2 - 1))
    chosen = np.argpartition(draws, pairs - 1, axis=1)[:, :pairs]
    chosen = np.take_along_axis(chosen, np.argsort(draws[rows, chosen], axis=1), axis=1)
    keys = chosen + 1
    values = rng.integers(vocab_size // 2, vocab_size, size=(batch_size, pairs))
    sequence = np.zeros((batch_size, length + 1), dtype=np.int64)
    sequence[:, 0 : 2 * pairs : 2], sequence[:, 1 : 2 * pairs : 2] = keys, values
    # Query slots are pairs of positions after the context; gap g is drawn with weight ∝ g^(power_a − 1).
    slots = (length + 1 - 2 * pairs) // 2
    weights = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
    race = np.log(rng.random((batch_size, slots))) / weights
    gaps = np.argpartition(-race, pairs - 1, axis=1)[:, :pairs]
    order = np.argsort(rng.random((batch_size, pairs)), axis=1)  # which key each query asks for
    positions = 2 * pairs + 2 * gaps
    sequence[rows, positions] = np.take_along_axis(keys, order, axis=1)
    sequence[rows, positions + 1] = np.take_along_axis(values, order, axis=1)
    labels = np.full((batch_size, length + 1), -100, dtype=np.int64)
    labels[rows, positions + 1] = sequence[rows, positions + 1]
    return torch.from_numpy(sequence[:, :-1]), torch.from_numpy(labels[:, 1:])


def masked_loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    mask = labels != -100
    loss = F.cross_entropy(logits.float()[mask], labels[mask])
    accuracy = float((logits[mask].argmax(-1) == labels[mask]).float().mean())
    return loss, accuracy


def query_logits(model, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) at the query positions only: the LM head applied to those few hidden states
    (a 64-token sequence with 4 pairs scores 4 of its 64), the same logits as the full forward's
    there, for a fraction of the head's cost over a large vocabulary."""
    hidden, _ = model.hidden_states(x)
    mask = labels != -100
    return model.lm_head(hidden[mask]), labels[mask]


class MQARStage(Stage):
    name = "mqar"
    config_class = MQARConfig

    def run(self, spec: RunSpec, ctx: StageContext) -> list[dict[str, Any]]:
        config: MQARConfig = self.settings(spec)
        init = spec.model.init
        if init is not None and is_transformers_source(init):
            raise StageNotApplicable(
                f"mqar trains a fresh model of the run's architecture, and this run converts the "
                f"transformers model {init.from_pretrained!r}: its weights would not enter, and its "
                "architecture from scratch is not the run's subject",
                "leave mqar out of this run's stages (--stages, or the grid's stages:), and measure "
                "recall of the variant with a run without model.init (its model.attention from scratch)",
            )
        device = pick_device(distributed_context(), ctx.device)
        longest = max(length for length, _ in config.settings)
        model_config = replace(
            spec.model, vocab_size=config.vocab_size, max_seq_len=max(spec.model.max_seq_len, longest)
        )
        seed = spec.train.seed if config.seed is None else config.seed
        model = build_model(model_config, config.vocab_size, seed).to(device)
        # The harness's AdamW (weight decay on matrices only) and schedule, at this stage's lr, decay
        # and steps, with Adam's default betas and clipping at 1.
        schedule = replace(
            spec.train,
            steps=config.steps,
            lr=config.lr,
            weight_decay=config.weight_decay,
            warmup_steps=min(config.steps // 10, 100),
            beta1=0.9,
            beta2=0.999,
            grad_clip=1.0,
        )
        optimizer = make_optimizer(model, schedule)
        train_rng = np.random.default_rng(seed)
        # Held-out sequences: a generator of their own, so they never appear in training.
        held_out = {
            (length, pairs): mqar_batch(
                config.eval_batch_size, length, pairs, config.vocab_size, config.power_a,
                np.random.default_rng([seed, length, pairs, 1]),
            )
            for length, pairs in config.settings
        }  # fmt: skip
        records: list[dict[str, Any]] = []
        accuracies: dict[tuple[int, int], float] = {}
        steps_done = 0
        for step in range(config.steps):
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, schedule)
            length, pairs = config.settings[step % len(config.settings)]
            x, y = mqar_batch(config.batch_size, length, pairs, config.vocab_size, config.power_a, train_rng)
            with autocast_context(device, spec.train.precision):
                logits, targets = query_logits(model, x.to(device), y.to(device))
            loss, _ = masked_loss_and_accuracy(logits, targets)
            if not math.isfinite(loss.item()):
                raise Diverged(f"mqar: non-finite training loss at step {step}", settings="mqar.lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps_done = step + 1
            if steps_done % config.eval_every == 0 or steps_done == config.steps:
                accuracies = self.evaluate(model, held_out, device, spec.train.precision)
                records += [
                    {"metric": "mqar/accuracy", "value": acc, "step": steps_done, "split": "validation",
                     "extra": json.dumps({"seq_len": length_, "pairs": pairs_})}
                    for (length_, pairs_), acc in accuracies.items()
                ]  # fmt: skip
                if min(accuracies.values()) >= config.target:
                    break
        records += [
            {"metric": "mqar/final_accuracy", "value": acc, "step": steps_done, "split": "validation",
             "extra": json.dumps({"seq_len": length, "pairs": pairs})}
            for (length, pairs), acc in accuracies.items()
        ]  # fmt: skip
        records.append({"metric": "mqar/mean_accuracy", "value": float(np.mean(list(accuracies.values())))})
        records.append({"metric": "mqar/steps", "value": float(steps_done)})
        return records

    @torch.no_grad()
    def evaluate(self, model, held_out, device, precision) -> dict[tuple[int, int], float]:
        model.eval()
        accuracies = {}
        for setting, (x, y) in held_out.items():
            with autocast_context(device, precision):
                logits, targets = query_logits(model, x.to(device), y.to(device))
            accuracies[setting] = masked_loss_and_accuracy(logits, targets)[1]
        return accuracies
