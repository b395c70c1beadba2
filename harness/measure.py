"""Measurement primitives shared by the profilers and the kernel benchmarks: synchronised wall
time with percentiles, peak allocator memory, and the bytes autograd keeps for the backward.
Free of the stage machinery, so stand-alone scripts (benchmarks/) can import them."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median / p20 / p80 wall time in milliseconds of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    quantiles = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": quantiles[0], "p80_ms": quantiles[3]}


def time_and_peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """One synchronised call of `fn`: wall time in ms, and the allocator's high-water mark above
    the starting allocation in MiB (NaN off CUDA)."""
    cuda = device.type == "cuda"
    _synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device) if cuda else 0
    start = time.perf_counter()
    fn()
    _synchronize(device)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20 if cuda else float("nan")
    return elapsed_ms, peak


def saved_for_backward_mib(fn: Callable[[], Any]) -> float:
    """MiB of the tensors autograd keeps for the backward of one call of `fn` (inputs included,
    each storage counted once), read through saved-tensor hooks: custom Functions'
    `save_for_backward` goes through them too. Device-independent, so it is tested on CPU."""
    storages: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
        # Detached: an op's saved output packed as itself would hold its own grad_fn, a cycle
        # through autograd's C++ nodes that no collector frees (the forward's activations and,
        # through the graph's leaves, the model would live for the rest of the process).
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def release_device_memory() -> None:
    """Free what is unreachable now, at once, and hand the allocator's cached blocks back.

    After an exception the frames of its traceback hold the failed call's tensors, often in
    reference cycles that only the cyclic collector frees, whenever it next runs: until then the
    next run in the same process starts with the failed one's activations still allocated. (A
    profile grid ran out of memory in every run after the first failure so, the device holding
    ~139 GiB of dead tensors.)"""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory of one call, measured apart from the timed calls (NaN off CUDA)."""
    return time_and_peak_memory(fn, device)[1]
