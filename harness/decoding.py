"""Autoregressive generation: the plain loop over the model's growing decoding state, and a loop
over static buffers whose whole decode step (every layer, the LM head) can be captured as CUDA
graphs.

Decoding one token of a small model is a few hundred kernel launches of a few microseconds each:
on a GPU the step is bound by launch latency, not by the state or the cache. With every tensor of
the step in a fixed place (the recurrent states of linear layers updated in place, softmax layers'
KV caches preallocated for the whole generation, the position a device tensor), the step is
recorded once as a CUDA graph and replayed per token, one launch.

Softmax layers attend over a window of their cache masked beyond the current position; windows
are powers of two (from `MIN_WINDOW` up to the cache's capacity), one graph each, so a step costs
what its length needs (within a factor of 2) rather than the full capacity. Models whose layers
are all linear need one graph. Token selection (greedy or sampling) runs outside the graphs: a
few small launches, and sampling's random numbers stay with the caller's generator.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .layers import KVCache, LinearState, StaticKVCache

Tensor = torch.Tensor
#: The smallest attention window of a softmax layer's static cache (one graph per window).
MIN_WINDOW = 64


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the last logits: greedy (argmax) unless `do_sample`,
    then from softmax(logits / temperature) over the `top_k` most likely tokens (None: all)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer or None (all tokens); got {self.top_k}")

    def next_tokens(self, logits: Tensor) -> Tensor:
        """logits [B, vocab] -> token ids [B, 1]."""
        if not self.do_sample:
            return logits.argmax(-1, keepdim=True)
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        return torch.multinomial(scores.softmax(-1), 1, generator=self.generator)


def generate_eagerly(
    model: nn.Module, idx: Tensor, max_new_tokens: int, eos_id: int | None, sampling: Sampling
) -> Tensor:
    """The plain loop: the model's own decoding state, grown by one token per step."""
    logits, cache = model(idx, use_cache=True)
    tokens = [idx]
    for step in range(max_new_tokens):
        next_token = sampling.next_tokens(logits[:, -1])
        tokens.append(next_token)
        if (eos_id is not None and bool((next_token == eos_id).all())) or step == max_new_tokens - 1:
            break
        logits, cache = model(next_token, cache, use_cache=True)
    return torch.cat(tokens, dim=1)


def windows_for(capacity: int) -> list[int]:
    """The attention windows of a static cache of `capacity` positions: powers of two from
    MIN_WINDOW, the last one the capacity itself."""
    windows, window = [], MIN_WINDOW
    while window < capacity:
        windows.append(window)
        window *= 2
    return windows + [capacity]


class StaticDecoder:
    """The decoding state of every layer in fixed buffers, filled from a prefill's cache: linear
    layers' states (fp32, updated in place by the fused decoding step, or copied back when a layer
    returns new tensors) and softmax layers' KV caches with room for `capacity` positions.

    `step()` decodes the token in `self.token` and returns the last logits [B, vocab]; its shapes do
    not depend on the position, so it can be captured (`capture()`) and replayed.
    """

    def __init__(self, model: nn.Module, prefill_cache: list, prompt_length: int, capacity: int):
        self.model, self.capacity = model, capacity
        reference = next(s for s in prefill_cache if s is not None)
        device = (reference.memory if isinstance(reference, LinearState) else reference.keys).device
        self.position = torch.tensor(prompt_length, dtype=torch.long, device=device)
        layers = [getattr(block, "attn", None) for block in getattr(model, "blocks", [])] or [None] * len(prefill_cache)
        self.states = [self._allocate(state, layer) for state, layer in zip(prefill_cache, layers)]
        self.token = torch.zeros(prefill_cache_batch(prefill_cache), 1, dtype=torch.long, device=device)
        self.load(prefill_cache, prompt_length)
        self.has_softmax = any(isinstance(s, StaticKVCache) for s in self.states)
        # Every step writes at or after the prompt's end: smaller windows are never used.
        self.windows = [w for w in windows_for(capacity) if w > prompt_length] if self.has_softmax else [capacity]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}

    def _allocate(self, state: LinearState | KVCache, layer: nn.Module | None) -> LinearState | StaticKVCache:
        if isinstance(state, KVCache):
            B, H, _, K = state.keys.shape
            keys = state.keys.new_zeros(B, H, self.capacity, K)
            conv_inputs = None if state.conv_inputs is None else torch.empty_like(state.conv_inputs)
            return StaticKVCache(keys, torch.zeros_like(keys), self.position, self.capacity, conv_inputs)
        # Contiguous buffers, filled by `load`: fp32 where the fused decoding step updates them in
        # place (its state is fp32); the prefill's own dtypes where the composed step runs, whose
        # ops take the state in the model's dtype.
        fused = layer is not None and layer.fuses_decode_steps(state.memory.device)
        key_feature = state.key_feature
        if torch.is_tensor(key_feature):
            dtype = torch.float32 if fused else key_feature.dtype
            key_feature = torch.empty(key_feature.shape, dtype=dtype, device=key_feature.device)
        memory_dtype = torch.float32 if fused else state.memory.dtype
        memory = torch.empty(state.memory.shape, dtype=memory_dtype, device=state.memory.device)
        # The shared position tensor: layers with rotary positions read their offset from it.
        conv_inputs = None if state.conv_inputs is None else torch.empty_like(state.conv_inputs)
        return LinearState(
            memory,
            key_feature,
            torch.empty_like(state.last_input),
            in_place=True,
            position=self.position,
            conv_inputs=conv_inputs,
        )

    def load(self, prefill_cache: list, prompt_length: int) -> None:
        """Copy a prefill's decoding state into the buffers and set the position after the prompt."""
        if prompt_length >= self.capacity:
            raise ValueError(f"the prompt ({prompt_length} tokens) leaves no room in a cache of {self.capacity}")
        self.position.fill_(prompt_length)
        for static, state in zip(self.states, prefill_cache):
            if isinstance(static, StaticKVCache):
                static.keys[:, :, :prompt_length].copy_(state.keys)
                static.values[:, :, :prompt_length].copy_(state.values)
                if static.conv_inputs is not None:
                    static.conv_inputs.copy_(state.conv_inputs)
            else:
                copy_state(static, state)

    def set_window(self, window: int) -> None:
        for static in self.states:
            if isinstance(static, StaticKVCache):
                static.window = window

    def window_at(self, position: int) -> int:
        """The smallest window that holds positions 0..position."""
        return next(w for w in self.windows if w > position)

    def step(self) -> Tensor:
        logits, new_states = self.model(self.token, self.states, use_cache=True)
        for static, new in zip(self.states, new_states):
            if isinstance(static, LinearState):
                copy_state(static, new)
        self.position += 1
        return logits[:, -1]

    def capture(self, prefill_cache: list, prompt_length: int) -> None:
        """Record `step()` as one CUDA graph per window. Each window's step first runs eagerly on a
        side stream (lazy initialisation, Triton compilation and library workspaces stay out of the
        capture) from the position after the prompt, which moves the state on: the prefill's state
        is loaded again afterwards."""
        warmup_steps = min(2, self.capacity - prompt_length)  # positions written stay inside the cache
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for window in self.windows:
                self.set_window(window)
                self.position.fill_(prompt_length)
                for _ in range(warmup_steps):
                    self.step()
        torch.cuda.current_stream().wait_stream(side)
        for window in self.windows:
            self.set_window(window)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.step()
            self.graphs[window] = (graph, logits)
        self.load(prefill_cache, prompt_length)

    def decode(self, position: int) -> Tensor:
        """The step at `position` (the token in `self.token` is written there): a graph replay when
        captured, else the eager step; the last logits [B, vocab]."""
        window = self.window_at(position)
        if window in self.graphs:
            graph, logits = self.graphs[window]
            graph.replay()
            return logits
        self.set_window(window)
        return self.step()


def prefill_cache_batch(cache: list) -> int:
    state = next(s for s in cache if s is not None)
    return (state.memory if isinstance(state, LinearState) else state.keys).shape[0]


def copy_state(static: LinearState, new: LinearState) -> None:
    """Bring a static linear state to `new`, copying only what is not already the same tensor."""
    for name in ("memory", "key_feature", "last_input", "conv_inputs"):
        target, source = getattr(static, name), getattr(new, name)
        if torch.is_tensor(target) and source is not target:
            target.copy_(source)


def generate_static(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    eos_id: int | None,
    sampling: Sampling,
    cuda_graph: bool,
    on_capture_failure: Callable[[Exception], None] | None = None,
) -> Tensor:
    """Decoding over static buffers, the step captured as CUDA graphs when `cuda_graph` (CUDA only).
    Same tokens as `generate_eagerly` (the same kernels run; softmax layers attend over a masked
    window instead of the exact cache length)."""
    logits, cache = model(idx, use_cache=True)
    B, P = idx.shape
    out = torch.empty(B, P + max_new_tokens, dtype=idx.dtype, device=idx.device)
    out[:, :P] = idx
    decoder = StaticDecoder(model, cache, P, P + max_new_tokens)
    if cuda_graph and max_new_tokens > 1:  # one new token needs no decode step
        try:
            decoder.capture(cache, P)
        except RuntimeError as error:  # an op that cannot be captured: decode without graphs
            decoder.graphs.clear()
            decoder.load(cache, P)
            (on_capture_failure or _warn_capture_failure)(error)
    last = logits[:, -1]
    for step in range(max_new_tokens):
        next_token = sampling.next_tokens(last)
        out[:, P + step] = next_token[:, 0]
        if (eos_id is not None and bool((next_token == eos_id).all())) or step == max_new_tokens - 1:
            return out[:, : P + step + 1]
        decoder.token.copy_(next_token)
        last = decoder.decode(P + step)
    return out


def _warn_capture_failure(error: Exception) -> None:
    warnings.warn(f"decoding without CUDA graphs: the decode step could not be captured ({error})", stacklevel=3)
