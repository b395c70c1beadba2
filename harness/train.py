"""The training loop: one readable function in the spirit of nanoGPT.

Works on CPU (fp32), one GPU (bf16 autocast) and under torchrun (DDP, detected from the
environment). Resumable: the full state (model, optimizer, step, metrics so
far) is checkpointed atomically every `checkpoint_every` steps. A NaN/inf loss stops the run with
`Diverged`, which the runner records as a failed cell; under DDP an exception in one rank's
forward or validation stops every rank at the same point (`agree_on_failure`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_bytes, atomic_write_text, file_digest, set_aside
from .captured_step import CapturedTrainingStep, check_capturable
from .config import TrainConfig
from .distributed import agree_on_failure, attempt, distributed_context, pick_device
from .layers import attention_path_counts, value_gate_path_counts
from .model import LanguageModel
from .postlin.start import initial_model, new_parameters
from .progress import PlainProgress, say
from .progress import bar as progress_bar
from .spec import RunSpec
from .tracking import NullTracker, Tracker


class Diverged(RuntimeError):
    """Training produced a non-finite loss (or gradient). `settings`: the settings that govern the
    divergence, for the failure's advice (a stage that trains with its own, e.g. mqar.lr)."""

    def __init__(self, message: str, settings: str = "train.lr or raise train.warmup_steps"):
        super().__init__(message)
        self.settings = settings


def non_finite(model: torch.nn.Module, gradients: bool = False) -> list[str]:
    """The names of the parameters holding a non-finite value, in the model's order (input to
    output) or, with `gradients`, of those with a non-finite gradient, deepest first: a NaN
    made in the backward spreads to every parameter before the layer that made it, so the
    deepest names are nearest to where it arose (a NaN made in the forward: the first names)."""
    named = list(model.named_parameters())
    names = []
    for name, parameter in reversed(named) if gradients else named:
        tensor = parameter.grad if gradients else parameter
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            names.append(name)
    return names


def listed(names: list[str], total: int, limit: int = 3) -> str:
    """The first `limit` names, and how many of `total` parameter tensors there are in all."""
    more = f", ... ({len(names)} of {total} parameter tensors)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def clip_gradients(model: torch.nn.Module, max_norm: float) -> tuple[float, list[str]]:
    """`clip_grad_norm_` over the model's parameters: the total gradient norm before clipping, and,
    when it is not finite, the parameters whose gradients are not (`non_finite`), read before
    clipping by a NaN norm makes every gradient NaN (empty when only the norm overflowed)."""
    utils = torch.nn.utils
    if not hasattr(utils, "get_total_norm"):  # torch < 2.6: one call, the gradients read after it
        norm = float(utils.clip_grad_norm_(model.parameters(), max_norm))
        return norm, ([] if math.isfinite(norm) else non_finite(model, gradients=True))
    parameters = [p for p in model.parameters() if p.grad is not None]
    total = utils.get_total_norm([p.grad for p in parameters])
    norm = float(total)
    broken = [] if math.isfinite(norm) else non_finite(model, gradients=True)
    utils.clip_grads_with_norm_(parameters, max_norm, total)
    return norm, broken


def divergence_context(model: torch.nn.Module, last_grad_norm: tuple[int, float] | None) -> str:
    """What a Diverged message adds to locate a divergence: the gradient norm of the last step
    (before clipping) and the first parameters that are no longer finite, if any."""
    parts = []
    if last_grad_norm is not None:
        parts.append(f"grad norm before clipping {last_grad_norm[1]:.4g} at step {last_grad_norm[0]}")
    broken = non_finite(model)
    total = len(list(model.parameters()))
    parts.append(f"non-finite parameters: {listed(broken, total)}" if broken else "all parameters finite")
    return "; ".join(parts)


def gradients_diverged(
    model: torch.nn.Module,
    step: int,
    grad_norm: float,
    step_loss: float,
    broken: list[str],
    last_grad_norm: tuple[int, float] | None,
) -> Diverged:
    """The error of a step whose gradients are not finite: where it started (the deepest
    parameters with a non-finite gradient) and the last finite norm before it."""
    previous = f"{last_grad_norm[1]:.4g} at step {last_grad_norm[0]}" if last_grad_norm else "none"
    return Diverged(
        f"non-finite gradients at step {step} (grad norm {grad_norm}, finite training loss "
        f"{step_loss:.4g}); non-finite gradients, deepest first: "
        f"{listed(broken, len(list(model.parameters())))}; previous grad norm before clipping {previous}"
    )


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: TrainConfig, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases, or embeddings' 1-d params).
    `capturable`: for a step captured in a CUDA graph (step counts and learning rates on the device)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), capturable=capturable)
    if capturable:
        device_learning_rates(optimizer)
    return optimizer


def device_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Each group's learning rate as a 0-d fp32 tensor on its parameters' device (a captured step
    reads it there; a float would be fixed in the graph). Also after loading a state dict."""
    for group in optimizer.param_groups:
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def autocast_context(device: torch.device, precision: str, cache_enabled: bool = True):
    """bf16 autocast where `precision` asks for it. `cache_enabled=False` for a step captured in a
    CUDA graph: autocast's cache of cast weights would outlive the capture."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)


def micro_step_loss(
    model: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    precision: str,
    cu_seqlens: torch.Tensor | None = None,
    cache_enabled: bool = True,
) -> torch.Tensor:
    """The training loss of one micro-batch (the forward half of a step); `cu_seqlens`: the
    documents packed into x's rows (data.packing = "documents"), or None; `cache_enabled`: as
    `autocast_context`."""
    with autocast_context(device, precision, cache_enabled):
        logits, _ = model(x) if cu_seqlens is None else model(x, cu_seqlens=cu_seqlens)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate_loss(model: LanguageModel, dataset: Any, config: TrainConfig, device: torch.device) -> float:
    """Mean token loss over a fixed, deterministic set of held-out windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in dataset.eval_batches(config.batch_size, config.seq_len, config.eval_batches):
        with autocast_context(device, config.precision):
            loss = model.loss(x.to(device), y.to(device))
        total += float(loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1)


def batch_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The data order of one step on one rank, derived from (seed, rank, step) alone, so a resumed
    run (on any number of ranks) draws exactly the batches an uninterrupted one would have."""
    digest = hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


def digest_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + ".digest")


def save_training_state(path: Path, state: dict) -> None:
    """The resume point, written atomically, then its size and checksum beside it. (A crash between
    the two writes leaves a digest that does not match: the run then restarts rather than trust
    a file it cannot check.)"""
    atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))
    atomic_write_text(digest_path(path), file_digest(path))


def load_training_state(path: Path, device: torch.device) -> dict | None:
    """The resume point, or None when there is none or it cannot be used: a file whose size and
    checksum differ from the recorded ones (checked before loading), or that does not load, is set
    aside (renamed, kept) and training starts again from step 0 instead of failing on every
    attempt. Loaded with weights_only=True: the state holds tensors and plain data only, so a
    shared runs folder cannot carry code that runs on resume."""
    if not path.is_file():
        return None
    try:
        recorded = digest_path(path).read_text().strip() if digest_path(path).is_file() else None
        if recorded is not None and recorded != file_digest(path):
            raise ValueError(
                f"size and checksum {file_digest(path)[:24]}... differ from the recorded {recorded[:24]}..."
            )
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or not {"run_id", "model", "optimizer", "step"} <= set(state):
            raise ValueError("not a training state (missing keys)")
        return state
    except Exception as exc:  # any unreadable state is set aside: the run restarts, the file is kept
        set_aside(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None


def validation_records(val_loss: float, step: int, bytes_per_token: float) -> list[dict[str, Any]]:
    """The validation rows of one evaluation: loss, perplexity and bits per byte."""
    return [
        {"metric": "val/loss", "value": val_loss, "step": step, "split": "validation"},
        {"metric": "val/perplexity", "value": math.exp(min(val_loss, 700)), "step": step, "split": "validation"},
        {
            "metric": "val/bits_per_byte",
            "value": val_loss * (1 / math.log(2)) / bytes_per_token,
            "step": step,
            "split": "validation",
        },
    ]


def train(
    spec: RunSpec,
    data: Any,
    run_dir: Path,
    *,
    device: str = "auto",
    progress: bool = True,
    tracker: Tracker | None = None,
) -> tuple[LanguageModel, list[dict[str, Any]]]:
    """Train `spec` on prepared `data`; returns the model and metric records.

    `data` provides `.tokenizer`, `.train` / `.validation` datasets (sample_batch / eval_batches)
    and `.bytes_per_token` (per split), which turns the loss into bits per byte. `tracker`
    (harness.tracking) gets a copy of every record as it is written; it never changes the run.
    """
    tracker = tracker or NullTracker()
    config = spec.train
    ctx = distributed_context()
    dev = pick_device(ctx, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # A fresh model, or with model.init a pretrained one converted (its source runs sit beside this run).
    only_new_until = spec.model.init.train_only_new_for_steps if spec.model.init is not None else 0
    if config.cuda_graph:
        check_capturable(
            device=dev, world_size=ctx.world_size, packing=spec.data.packing, train_only_new_for_steps=only_new_until
        )
    model = initial_model(spec.model, data.tokenizer, spec.train.seed, Path(run_dir).parent).to(dev)
    optimizer = make_optimizer(model, config, capturable=config.cuda_graph)
    new = {id(p) for p in new_parameters(model)} if only_new_until else set()
    pretrained = [p for p in model.parameters() if id(p) not in new]
    records: list[dict[str, Any]] = []
    start_step, trained_seconds = 0, 0.0
    resume_path = Path(run_dir) / "training_state.pt"
    state = load_training_state(resume_path, dev)
    if state is not None:
        if state.get("run_id") == spec.run_id:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if config.cuda_graph:
                device_learning_rates(optimizer)
            start_step, records, trained_seconds = state["step"], state["records"], state["seconds"]
    if ctx.is_main:
        tracker.start(start_step)

    def keep(rows: list[dict[str, Any]]) -> None:
        """Rows into the run's records, and a copy to the tracker (rank 0 alone writes)."""
        records.extend(rows)
        if ctx.is_main:
            tracker.log(rows)

    wrapped = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if ctx.world_size > 1
        else model
    )

    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * ctx.world_size
    val_bytes_per_token = data.bytes_per_token["validation"]
    show = progress and ctx.is_main
    bar = progress_bar(total=config.steps, initial=start_step, desc=spec.name, unit="step", leave=False, enabled=show)
    lines = PlainProgress(spec.name, config.steps, initial=start_step, enabled=show)
    if show and start_step:
        say(f"{spec.name}: resuming at step {start_step}/{config.steps}")
    if spec.model.init is not None and start_step == 0:
        # Where a converted model starts: the validation loss right after the conversion.
        val, failure = attempt(evaluate_loss, model, data.validation, config, dev)
        agree_on_failure(failure, ctx, dev)
        keep(validation_records(val, 0, val_bytes_per_token))
    model.train()
    last_grad_norm: tuple[int, float] | None = None  # (step, norm before clipping), for Diverged messages
    paths: dict[str, int] | None = None  # the attention layers' paths in this process's first step
    value_gate_calls = value_gate_path_counts()  # subtracted at the end: this run's calls alone
    captured: CapturedTrainingStep | None = None  # with train.cuda_graph, from the first step on
    # This process's first step compiles every kernel (and, with train.cuda_graph, warms up and
    # captures the step): the steady throughput leaves it out, so eager and replayed runs compare.
    first_step_seconds, steady_steps, steady_seconds = None, 0, 0.0
    for step in range(start_step, config.steps):
        started = time.perf_counter()
        generator = batch_generator(config.seed, ctx.rank, step)
        if config.cuda_graph:
            sample = functools.partial(data.train.sample_batch, config.batch_size, config.seq_len, generator)
            batches = [sample() for _ in range(config.grad_accum)]
            if captured is None:
                micro_loss = functools.partial(
                    micro_step_loss, model, device=dev, precision=config.precision, cache_enabled=False
                )
                captured = CapturedTrainingStep(model, optimizer, micro_loss, batches, config.grad_clip)
                paths = attention_path_counts(model)
            step_loss, grad_norm = captured(batches, learning_rate(step, config))
            # Found after the replay's optimizer step (the eager loop stops before it): the run
            # stops all the same, and no checkpoint is written after this step.
            if not math.isfinite(step_loss):
                context = divergence_context(model, last_grad_norm)
                raise Diverged(f"non-finite training loss ({step_loss}) at step {step} ({context})")
            if not math.isfinite(grad_norm):
                broken = captured.non_finite_gradients()
                raise gradients_diverged(model, step, grad_norm, step_loss, broken, last_grad_norm)
            last_grad_norm = (step, grad_norm)
        else:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            step_loss = 0.0
            for micro in range(config.grad_accum):
                cu_seqlens = None
                if spec.data.packing == "documents":
                    # cu_seqlens stays on the host: the ops read the offsets as host values (a device
                    # tensor would cost a device sync in every layer).
                    x, y, cu_seqlens = data.train.sample_document_batch(config.batch_size, config.seq_len, generator)
                else:
                    x, y = data.train.sample_batch(config.batch_size, config.seq_len, generator)
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                sync = wrapped.no_sync() if ctx.world_size > 1 and micro < config.grad_accum - 1 else nullcontext()
                with sync:
                    loss, failure = attempt(micro_step_loss, wrapped, x, y, dev, config.precision, cu_seqlens)
                    micro_loss = loss.item() if failure is None else None
                    if isinstance(failure, FloatingPointError):  # an op met NaN activations: divergence
                        failure = Diverged(
                            f"non-finite values in the forward at step {step}: {failure} "
                            f"({divergence_context(model, last_grad_norm)})"
                        )
                    # Before the backward: its gradient all-reduce is where a failed or diverged rank
                    # would leave the others waiting.
                    if not agree_on_failure(failure, ctx, dev, micro_loss):
                        raise Diverged(
                            f"non-finite training loss ({micro_loss} on rank {ctx.rank}; all ranks stop) "
                            f"at step {step} ({divergence_context(model, last_grad_norm)})"
                        )
                    (loss / config.grad_accum).backward()
                    if paths is None:
                        paths = attention_path_counts(model)
                step_loss += micro_loss / config.grad_accum
            if step < only_new_until:
                # Only the parameters the conversion added learn yet: AdamW skips a parameter
                # without a gradient (no update, no weight decay, no moment change).
                for parameter in pretrained:
                    parameter.grad = None
            grad_norm, broken = clip_gradients(model, config.grad_clip)
            if broken:
                # The optimizer step would make these parameters non-finite (and, clipped by a NaN
                # norm, every parameter), and the loss only at the next step: stop here, naming where
                # it started. The gradients are the same on every rank after the all-reduce: all stop.
                raise gradients_diverged(model, step, grad_norm, step_loss, broken, last_grad_norm)
            last_grad_norm = (step, grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - started
        trained_seconds += elapsed
        if first_step_seconds is None:
            first_step_seconds = elapsed
        else:
            steady_steps, steady_seconds = steady_steps + 1, steady_seconds + elapsed
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_step / elapsed:,.0f}")
        lines.update(step + 1, loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_step / elapsed:,.0f}")
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            logged = [
                {"metric": "train/loss", "value": step_loss, "step": done, "split": "train"},
                {"metric": "train/grad_norm", "value": grad_norm, "step": done, "split": "train"},
                {"metric": "train/lr", "value": learning_rate(step, config), "step": done, "split": "train"},
                {"metric": "train/step_tokens_per_second", "value": tokens_per_step / elapsed, "step": done},
            ]
            records += logged[:3]  # the per-step throughput goes to the tracker only: too noisy for rows
            if ctx.is_main:
                tracker.log(logged)
        if done % config.eval_every == 0 or done == config.steps:
            val, failure = attempt(evaluate_loss, model, data.validation, config, dev)
            agree_on_failure(failure, ctx, dev)
            if not math.isfinite(val):
                raise Diverged(f"non-finite validation loss ({val}) at step {done}")
            validation = validation_records(val, done, val_bytes_per_token)
            if show:
                bpb = next(r["value"] for r in validation if r["metric"] == "val/bits_per_byte")
                say(f"{spec.name}: step {done}/{config.steps} val loss {val:.4f} bpb {bpb:.4f}")
            keep(validation)
        if ctx.is_main and (done % config.checkpoint_every == 0) and done < config.steps:
            save_training_state(
                resume_path,
                {
                    "run_id": spec.run_id,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": done,
                    "records": records,
                    "seconds": trained_seconds,
                },
            )
    bar.close()
    final_val = next(r["value"] for r in reversed(records) if r["metric"] == "val/loss")
    # The last evaluation again, as final/val_loss, final/val_perplexity, final/val_bits_per_byte.
    final = [
        {**row, "metric": row["metric"].replace("val/", "final/val_", 1)}
        for row in validation_records(final_val, config.steps, val_bytes_per_token)
    ]
    final += [
        {"metric": "params", "value": float(model.num_parameters())},
        {"metric": "params_non_embedding", "value": float(model.num_parameters(exclude_embeddings=True))},
        {"metric": "train/tokens_per_second", "value": tokens_per_step * config.steps / max(trained_seconds, 1e-9)},
        {"metric": "train/seconds", "value": trained_seconds},
    ]
    # Both describe this process's steps only (a resumed run's earlier processes are not in them).
    if first_step_seconds is not None:
        final += [{"metric": "train/first_step_seconds", "value": first_step_seconds}]
    if steady_steps:
        steady = tokens_per_step * steady_steps / steady_seconds
        final += [{"metric": "train/steady_tokens_per_second", "value": steady}]
    # Which computation the linear layers trained through (fused op or composed passes): the
    # paths differ in precision, so a comparison across them is worth knowing about.
    final += [{"metric": f"attention/layers_{path}", "value": float(n)} for path, n in (paths or {}).items()]
    # A value-side gate (Fast Decay) runs on the kernels unless it decays too fast for them, then
    # on a slower torch form: how many of this run's calls (training and validation) took each.
    value_gate_calls = value_gate_path_counts() - value_gate_calls
    final += [{"metric": f"attention/value_gate_{path}", "value": float(n)} for path, n in value_gate_calls.items()]
    records += final
    if ctx.is_main:  # the tracker takes every row at a step: the run's totals at its last
        tracker.log([{**record, "step": record.get("step", config.steps)} for record in final])
    return model, records
