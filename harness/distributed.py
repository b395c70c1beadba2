"""Processes and devices: the torchrun context, the device a process uses, and the agreement by
which all ranks of a DDP job stop together when one of them fails.

Every stage and the runner take these from here; nothing here knows about models or grids.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class PeerFailed(RuntimeError):
    """Another rank's training step raised; this rank stops at the same point."""


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def distributed_context() -> DistributedContext:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; start the process group once if it did."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistributedContext(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def agree_on_failure(
    failure: Exception | None, ctx: DistributedContext, device: torch.device, loss: float | None = None
) -> bool:
    """Whether every rank may go on, decided by all ranks together at the same point.

    Under DDP a rank that stops alone leaves the others waiting forever in the next collective.
    So every rank calls this at the same point: if any rank failed (an exception in its forward
    or validation), all raise — the failed one its own exception, the others `PeerFailed` naming
    it — and the process group stays usable for the rest of the grid. Otherwise the result says
    whether `loss` (when given) is finite on every rank; the caller stops on False. A failure
    inside the backward's gradient all-reduce cannot be caught this way; the process group's
    timeout is the backstop there."""
    finite = loss is None or math.isfinite(loss)
    if ctx.world_size == 1:
        if failure is not None:
            raise failure
        return finite
    # 0: go on; 1: a non-finite loss somewhere; 2: an exception somewhere (it wins).
    flag = torch.tensor([2.0 if failure is not None else 0.0 if finite else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() < 2:
        return flag.item() == 0
    messages: list[str | None] = [None] * ctx.world_size
    own = (
        None if failure is None else f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
    )
    dist.all_gather_object(messages, own)
    if failure is not None:
        raise failure
    raise PeerFailed("; ".join(f"rank {rank} failed: {m}" for rank, m in enumerate(messages) if m is not None))


def attempt(fn, *args):
    """(fn(*args), None) or (None, the exception), for `agree_on_failure`."""
    try:
        return fn(*args), None
    except Exception as exc:  # handed to agree_on_failure, which re-raises it on this rank
        return None, exc


def pick_device(ctx: DistributedContext, requested: str = "auto") -> torch.device:
    """The device this process computes on: `auto` is this rank's GPU where there is one, else the
    CPU; `cuda` without an index is this rank's GPU too (DDP needs an indexed device)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ValueError(f"--device {requested!r} is not a device: {exc}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested!r}: no CUDA device is available here; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", ctx.local_rank)
    return device


def finish_distributed() -> bool:
    """Close a torchrun process group once the grid is done; True on the rank that reports."""
    if not dist.is_initialized():
        return True
    is_main = dist.get_rank() == 0
    dist.barrier()
    dist.destroy_process_group()
    return is_main
