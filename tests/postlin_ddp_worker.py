"""Two training steps of a converted tiny GPT-NeoX through `harness.train.train`, on as many
processes as torchrun starts (or one, called in-process). Every step draws one global batch of
`batch_size * world_size` windows and each rank trains on its own rows of it, so two processes
of batch B see exactly what one process of batch 2B sees. Rank 0 saves the records and the final
weights to `<out>/result.pt`.

    torchrun --nproc_per_node 2 tests/postlin_ddp_worker.py NEOX_DIR CORPUS CACHE OUT BATCH EVAL_BATCHES

(or, from a test, two processes forked with the environment torchrun gives them: `train_as_rank`)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import harness.train as training  # noqa: E402
from harness.data import prepare_data  # noqa: E402
from harness.distributed import distributed_context  # noqa: E402
from harness.spec import spec_from_dict  # noqa: E402


def train_converted(neox: Path, corpus: Path, cache: Path, out: Path, batch_size: int, eval_batches: int) -> None:
    ctx = distributed_context()
    data = prepare_data("text-files", f"hf:{neox}", {"pattern": str(corpus / "*.txt")}, cache, progress=False)
    draw = data.train.sample_batch

    def rows_of_this_rank(batch: int, seq_len: int, generator: torch.Generator):
        x, y = draw(batch * ctx.world_size, seq_len, generator)
        rows = slice(ctx.rank * batch, (ctx.rank + 1) * batch)
        return x[rows], y[rows]

    data.train.sample_batch = rows_of_this_rank
    sections = {
        "data": {"source": "text-files", "tokenizer": f"hf:{neox}", "options": {"pattern": str(corpus / "*.txt")}},
        "model": {
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 4,
            "max_seq_len": 64,
            "softmax_layers": [0],  # a hybrid: the kept softmax layer trains its pretrained module
            "attention": {"feature_map": "safe_exp", "norm": "rmsnorm", "gate": "refined"},
            # The first step trains only the parameters the conversion added (the others get no
            # gradient after the all-reduce), the second all of them.
            "init": {"from_pretrained": str(neox), "train_only_new_for_steps": 1},
        },
        "train": dict(
            steps=2, batch_size=batch_size, seq_len=16, lr=1e-2, warmup_steps=0, eval_every=2,
            eval_batches=eval_batches, log_every=1, checkpoint_every=100, seed=0,
        ),
    }  # fmt: skip
    spec = spec_from_dict(sections, name="neox", processes=ctx.world_size)
    # The same generator on every rank: one global batch per step, cut by rank above.
    per_rank = training.batch_generator
    training.batch_generator = lambda seed, rank, step: per_rank(seed, 0, step)
    try:
        model, records = training.train(spec, data, out / "run", device="cpu", progress=False)
    finally:
        training.batch_generator = per_rank
    if ctx.is_main:
        torch.save({"records": records, "state": model.state_dict()}, out / "result.pt")


def train_as_rank(rank: int, port: int, args: tuple) -> None:
    """One of two processes forked by a test, with the environment torchrun gives a worker."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    try:
        train_converted(*args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    neox, corpus, cache, out = (Path(a) for a in sys.argv[1:5])
    train_converted(neox, corpus, cache, out, int(sys.argv[5]), int(sys.argv[6]))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
