"""A tiny grid over the tiny pseudo-English corpus (the `corpus` fixture in conftest.py), and an
op that makes a run's gradients NaN."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_grid(corpus: Path, **train_overrides) -> dict:
    """Two runs (softmax, ReGLA) of a 2-layer, 32-wide model on byte tokens: seconds on a CPU."""
    train = dict(
        steps=20,
        batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        eval_every=10,
        eval_batches=2,
        log_every=5,
        checkpoint_every=5,
        seed=0,
    )
    train.update(train_overrides)
    return {
        "name": "tiny",
        "stages": ["train"],
        "base": {
            "data": {"source": "text-files", "tokenizer": "byte", "options": {"pattern": str(corpus / "*.txt")}},
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
            "train": train,
        },
        "axes": {
            "variant": {
                "softmax": {"model.softmax_layers": "all"},
                "regla": {"model.attention": {"feature_map": "safe_exp", "norm": "rmsnorm", "gate": "refined"}},
            }
        },
    }


class NaNGradient(torch.autograd.Function):
    """The identity whose backward makes every gradient NaN: a run that diverges in its gradients
    while its loss stays finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")
