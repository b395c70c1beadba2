"""The training step replayed from a CUDA graph (`train.cuda_graph`).

A small model at a short length is bound by the host: it launches ~900 kernels a step, and the
GPU idles between them (results/paper-efficiency-small, profile-step runs 4-5: the 6-layer step at
T 512, batch 32 takes 25-48 ms eager and 19-21 ms replayed from a graph). Capturing the whole step
once — forward and backward of every micro-batch, the gradient clipping and AdamW — and replaying
it removes that host time: one launch a step.

What a graph allows shapes what this does:
- The step reads its batch from static buffers (`x`, `y`), copied into before each replay.
- AdamW runs `capturable` with its learning rate a tensor on the device, filled before each
  replay: a float would be baked into the graph.
- Nothing in the step may wait for the host, so the loss and the gradient norm are tensors the
  loop reads after the replay (one synchronisation a step, as the eager loop's `loss.item()`).
  A non-finite loss or norm is found there, after the optimizer step, where the eager loop finds
  it before: the run stops with `Diverged` either way and writes no checkpoint after it.
- Capture allows no compilation and no lazy allocation of optimizer state, so the step first runs
  eagerly on a side stream (compiling every kernel, creating AdamW's state), then the model's
  parameters and the optimizer's state are put back as they were, and only then is it captured.
  The replayed steps are the run's steps; the warm-up leaves no trace.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: The per-parameter state of AdamW, all zeros when fresh (step 0, both moments 0).
ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}


class CapturedStepError(RuntimeError):
    """The step could not be captured: what in it talks to the host, and what to do instead."""


def check_capturable(*, device: torch.device, world_size: int, packing: str, train_only_new_for_steps: int) -> None:
    """Raise ValueError, naming the setting, where `train.cuda_graph` cannot work."""
    if device.type != "cuda":
        raise ValueError(f"train.cuda_graph captures the step in a CUDA graph and needs a CUDA device; got {device}")
    if world_size > 1:
        raise ValueError(
            f"train.cuda_graph runs in one process only (its step holds no gradient all-reduce); "
            f"this run has {world_size} processes: train it without train.cuda_graph"
        )
    if packing != "windows":
        raise ValueError(
            f"train.cuda_graph needs data.packing: windows (a graph replays fixed shapes, and packed "
            f"documents give each batch its own sequence offsets); got data.packing: {packing}"
        )
    if train_only_new_for_steps:
        raise ValueError(
            "train.cuda_graph cannot train only the converted model's new parameters for the first "
            f"steps (model.init.train_only_new_for_steps: {train_only_new_for_steps}): that phase "
            "changes which parameters learn, and a graph replays one step; set it to 0 or train eagerly"
        )


def snapshot_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """What `restore()` puts back: the model's parameters and buffers and AdamW's state as they
    are now, in place (a graph captured afterwards holds these very tensors). A parameter without
    optimizer state now gets a fresh one back (step 0, both moments 0) where steps since created it."""
    tensors = [*model.parameters(), *model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    state = optimizer.state
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    saved_state = {p: {key: value.clone() for key, value in state[p].items()} for p in parameters if state.get(p)}

    @torch.no_grad()
    def restore() -> None:
        for tensor, value in zip(tensors, saved):
            tensor.copy_(value)
        for p in parameters:
            if p in saved_state:
                for key, value in saved_state[p].items():
                    state[p][key].copy_(value)
            elif state.get(p):
                if set(state[p]) != ADAMW_STATE:
                    raise RuntimeError(f"snapshot_training_state: unexpected AdamW state keys {sorted(state[p])}")
                for value in state[p].values():
                    value.zero_()  # a fresh AdamW state: step 0, both moments 0

    return restore


def clip_without_host_reads(
    named_parameters: list[tuple[str, torch.nn.Parameter]], max_norm: float
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """`train.clip_gradients`' math with no value read on the host (a capture allows none): the
    total gradient norm before clipping, the names of the parameters with a gradient, in the
    model's order, and each one's gradient norm before clipping, on the device. A non-finite
    norm marks a non-finite gradient (or, at worst, one past fp32's range), which the caller finds
    after the step: clipping by a NaN total makes every gradient NaN."""
    with_grads = [(name, p) for name, p in named_parameters if p.grad is not None]
    if not with_grads:  # nothing to clip: a zero norm, as torch's clip_grad_norm_ returns
        device = named_parameters[0][1].device if named_parameters else torch.device("cpu")
        return torch.zeros((), device=device), [], torch.zeros(0, device=device)
    # The total is the norm of the per-parameter norms, as torch's get_total_norm computes it;
    # the per-parameter norms are kept for naming where a NaN arose.
    parameter_norms = torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float32) for _, p in with_grads])
    total = torch.linalg.vector_norm(parameter_norms)
    # clip_grads_with_norm_'s scaling (torch >= 2.6 only), written out for older torch.
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for _, parameter in with_grads:
        parameter.grad.mul_(scale.to(parameter.grad.dtype))
    return total, [name for name, _ in with_grads], parameter_norms


class CapturedTrainingStep:
    """One training step of `model` captured in a CUDA graph; `__call__` replays it on a batch.

    `micro_loss(x, y)` is the loss of one micro-batch, computed under autocast with its cache of
    cast weights off (capture requires it). `optimizer` must be AdamW made with `capturable=True`
    and tensor learning rates on the device (`make_optimizer(..., capturable=True)`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        micro_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        grad_clip: float,
        warmup_steps: int = 2,
    ):
        self.model, self.optimizer, self.micro_loss, self.grad_clip = model, optimizer, micro_loss, grad_clip
        self.named_parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        for group in optimizer.param_groups:
            if not (group.get("capturable") and isinstance(group["lr"], torch.Tensor) and group["lr"].is_cuda):
                raise ValueError("CapturedTrainingStep needs AdamW with capturable=True and a CUDA tensor lr")
        device = self.named_parameters[0][1].device
        self.x = torch.stack([x for x, _ in batches]).to(device)  # [micro-batches, B, T]
        self.y = torch.stack([y for _, y in batches]).to(device)
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)
        self._warm_up(warmup_steps)
        self.graph = torch.cuda.CUDAGraph()
        # The backward then creates .grad in the graph's memory pool, written (not accumulated
        # onto) by the first micro-batch on every replay.
        optimizer.zero_grad(set_to_none=True)
        try:
            with torch.cuda.graph(self.graph):
                self._step()
        except RuntimeError as error:  # e.g. an op that reads a device value on the host
            raise CapturedStepError(
                "train.cuda_graph: the training step could not be captured in a CUDA graph, so some op in "
                "it waits for the host (Fast Decay's value gate picks its path from a device value, for "
                f"one); train this model without train.cuda_graph. The capture failed with: {error}"
            ) from error

    def _step(self) -> None:
        """Forward and backward of every micro-batch, clipping, AdamW: the body that is captured."""
        micro = self.x.shape[0]
        total = torch.zeros((), device=self.loss.device)
        for index in range(micro):
            loss = self.micro_loss(self.x[index], self.y[index])
            (loss / micro).backward()
            total = total + loss.detach() / micro
        self.loss.copy_(total)
        norm, self.clipped_names, parameter_norms = clip_without_host_reads(self.named_parameters, self.grad_clip)
        self.grad_norm.copy_(norm)
        self.parameter_grad_norms = parameter_norms  # in the graph's pool: rewritten on every replay
        self.optimizer.step()

    def non_finite_gradients(self) -> list[str]:
        """After a replay whose gradient norm was not finite: the parameters whose gradient was,
        before clipping, deepest first (as `train.non_finite` names them in the eager loop). The
        gradients themselves can't say: clipping by a NaN norm made every one of them NaN."""
        finite = torch.isfinite(self.parameter_grad_norms).tolist()
        return [name for name, ok in reversed(list(zip(self.clipped_names, finite))) if not ok]

    def _warm_up(self, steps: int) -> None:
        """Run the step eagerly on a side stream, then put everything it changed back."""
        restore = snapshot_training_state(self.model, self.optimizer)
        device = self.loss.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(steps):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        restore()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> tuple[float, float]:
        """One training step on `batches` (one (x, y) per micro-batch) at learning rate `lr`:
        the step's mean loss and its gradient norm before clipping (both read back: one
        synchronisation)."""
        for index, (x, y) in enumerate(batches):
            self.x[index].copy_(x, non_blocking=True)
            self.y[index].copy_(y, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)
        self.graph.replay()
        return float(self.loss), float(self.grad_norm)
