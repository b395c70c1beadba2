"""The profile stage, model-level profilers: training-step throughput and peak memory across sequence lengths, and
the paper's generation benchmark (§5.2, Fig. 5: prompt of 5 tokens, generate 2^6 … 2^13 tokens,
peak memory and total prefill + decode time; linear state vs softmax KV cache).

Timing: warm-up first (compilation and autotuning stay out of the numbers), then repeated timed
calls, reporting the median and the 20th/80th percentiles. On CUDA the device is synchronised
around every timed call and peak memory is the allocator's high-water mark above the baseline,
measured in a separate untimed call. On CPU, peak memory is not measured (NaN).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from ..captured_step import CapturedTrainingStep
from ..config import ProfileConfig, TrainConfig
from ..distributed import distributed_context, pick_device
from ..measure import (
    peak_memory_mib,
    release_device_memory,
    saved_for_backward_mib,
    time_and_peak_memory,
    time_call,
)
from ..model import LanguageModel
from ..postlin.start import architecture_model, is_transformers_source
from ..spec import RunSpec
from ..train import make_optimizer, micro_step_loss
from .base import Stage, StageContext


def profile_training_step(
    model: LanguageModel,
    seq_lens: list[int],
    batch_size: int,
    device: torch.device,
    warmup: int,
    repeats: int,
    cuda_graph: bool = False,
) -> list[dict[str, Any]]:
    """A full training step (forward, backward, AdamW update) on random tokens at each length;
    with `cuda_graph` on CUDA, also the training loop's step replayed from a CUDA graph
    (`captured_training_step_records`).

    A length that runs out of memory gets a failed row naming it (the stage is then partial) and
    ends the sweep, since longer ones need more: the lengths before it keep their numbers, which
    is where a crossover with another model is read off."""
    records = []
    vocab = model.config.vocab_size
    use_bf16 = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for seq_len in seq_lens:
        tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), device=device)

        def forward(tokens: torch.Tensor = tokens) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                return model.loss(tokens[:, :-1], tokens[:, 1:])

        def step() -> None:
            forward().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        tag = {"seq_len": seq_len, "batch_size": batch_size}
        out_of_memory = None
        try:
            records += _training_step_records(step, forward, batch_size, seq_len, tag, device, warmup, repeats)
        except torch.OutOfMemoryError as exc:
            out_of_memory = str(exc).splitlines()[0] if str(exc) else "out of memory"
        if out_of_memory is not None:
            # Outside the handler: the exception's frames, and the step's tensors with them, are gone.
            optimizer.zero_grad(set_to_none=True)
            del tokens, forward, step
            release_device_memory()
            records.append(
                {
                    "metric": "profile/train_step_ms",
                    "status": "failed",
                    "error": f"out of memory at T = {seq_len}, batch {batch_size}: {out_of_memory}",
                    "extra": _json(tag),
                }
            )
            break
        if cuda_graph and device.type == "cuda":
            records += captured_training_step_records(model, tokens, tag, device, warmup, repeats)
    return records


def captured_training_step_records(model, tokens, tag, device, warmup, repeats) -> list[dict[str, Any]]:
    """The training loop's step with `train.cuda_graph` (`harness.captured_step`): forward, backward,
    gradient clipping and capturable AdamW replayed from one CUDA graph, the batch copied into its
    static buffers and the loss and gradient norm read back, as the loop does every step. Without
    the host's time between kernels, it is what a model whose eager step the host limits trains at
    with the option (the eager rows time a bare step: no clipping, nothing read back).

    Running out of memory (the graph's pool comes on top of the model's) gives a failed row, and
    the eager rows of the length stay."""
    batch_size, seq_len = tokens.shape[0], tokens.shape[1] - 1
    batches = [(tokens[:, :-1], tokens[:, 1:])]
    out_of_memory = None
    try:
        optimizer = make_optimizer(model, TrainConfig(lr=1e-6), capturable=True)
        loss = functools.partial(micro_step_loss, model, device=device, precision="auto", cache_enabled=False)
        captured = CapturedTrainingStep(model, optimizer, loss, batches, grad_clip=1.0)
        timing = time_call(functools.partial(captured, batches, 1e-6), device, warmup, repeats)
    except torch.OutOfMemoryError as exc:
        out_of_memory = str(exc).splitlines()[0] if str(exc) else "out of memory"
    # The graph, its memory pool and the capturable optimizer's state go before the next length.
    captured = optimizer = None
    model.zero_grad(set_to_none=True)
    release_device_memory()
    if out_of_memory is not None:
        error = f"out of memory replaying the training step at T = {seq_len}, batch {batch_size}: {out_of_memory}"
        return [{"metric": "profile/train_graph_step_ms", "status": "failed", "error": error, "extra": _json(tag)}]
    return [
        {"metric": "profile/train_graph_step_ms", "value": timing["median_ms"], "extra": _json(tag | timing)},
        {
            "metric": "profile/train_graph_tokens_per_second",
            "value": batch_size * seq_len / timing["median_ms"] * 1e3,
            "extra": _json(tag),
        },
    ]


def _training_step_records(step, forward, batch_size, seq_len, tag, device, warmup, repeats) -> list[dict[str, Any]]:
    """Time, tokens/s, peak memory and saved-for-backward memory of one length's training step."""
    timing = time_call(step, device, warmup, repeats)
    return [
        {"metric": "profile/train_step_ms", "value": timing["median_ms"], "extra": _json(tag | timing)},
        {
            "metric": "profile/train_tokens_per_second",
            "value": batch_size * seq_len / timing["median_ms"] * 1e3,
            "extra": _json(tag),
        },
        {"metric": "profile/train_peak_mib", "value": peak_memory_mib(step, device), "extra": _json(tag)},
        # What autograd holds between forward and backward (weights included): the activation
        # memory a fused kernel saves shows here, on any device.
        {
            "metric": "profile/train_saved_for_backward_mib",
            "value": saved_for_backward_mib(forward),
            "extra": _json(tag),
        },
    ]


@torch.no_grad()
def profile_generation(
    model: LanguageModel,
    prompt_length: int,
    generation_lengths: list[int],
    device: torch.device,
    warmup: int,
    cuda_graphs: bool = True,
) -> list[dict[str, Any]]:
    """Greedy generation of n tokens after a short prompt through `model.generate` (on CUDA its
    defaults capture the decode step as CUDA graphs, the capture inside the time; `cuda_graphs`
    False: the plain decoding loop): total (prefill +
    decode) time and peak memory, both from one call per length (decoding thousands of tokens is long enough to time
    once; a separate memory pass would double the cost). Warm-up runs a short generation."""
    records = []
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_length), device=device)
    graphs = cuda_graphs and device.type == "cuda"
    generate = functools.partial(model.generate, cuda_graph=graphs, static=graphs)
    for _ in range(warmup):
        generate(prompt, 8)
    for n in generation_lengths:
        elapsed_ms, peak = time_and_peak_memory(functools.partial(generate, prompt, n), device)
        tag = _json({"prompt_length": prompt_length, "generated": n, "cuda_graphs": graphs})
        records += [
            {"metric": "profile/generate_total_ms", "value": elapsed_ms, "extra": tag},
            {"metric": "profile/generate_peak_mib", "value": peak, "extra": tag},
        ]
    return records


def _json(data: dict) -> str:
    return json.dumps(data, sort_keys=True)


class ProfileStage(Stage):
    """Times the run's architecture with random weights (speed and memory do not depend on them).

    A run with `model.init` is timed as the architecture it trains: converted from a harness
    model, the harness model of its config (what the conversion builds); converted from a
    transformers model, that family's modules at the source's sizes with the run's layers
    converted and its kept softmax layers and rotary as they are (`architecture_model`; only the
    source's config is read, not its weights). A converted transformers model decodes without
    static buffers or CUDA graphs, so its generation is timed on the plain decoding loop whatever
    `cuda_graphs` says, and its rows record `cuda_graphs: false`."""

    name = "profile"
    config_class = ProfileConfig

    def run(self, spec: RunSpec, ctx: StageContext) -> list[dict[str, Any]]:
        config: ProfileConfig = self.settings(spec)
        device = pick_device(distributed_context(), ctx.device)
        longest = max([*config.seq_lens, config.prompt_length + max(config.generation_lengths, default=0)])
        vocab = None  # a transformers source has its own vocabulary: no data needs preparing
        if spec.model.init is None or not is_transformers_source(spec.model.init):
            vocab = spec.model.vocab_size or ctx.data_for(spec).tokenizer.vocab_size
        model = architecture_model(spec.model, vocab, spec.train.seed, longest).to(device)
        records = profile_training_step(
            model.train(),
            list(config.seq_lens),
            config.batch_size,
            device,
            config.warmup,
            config.repeats,
            config.train_cuda_graph and isinstance(model, LanguageModel),
        )
        records += profile_generation(
            model.eval(),
            config.prompt_length,
            list(config.generation_lengths),
            device,
            config.warmup,
            config.cuda_graphs and isinstance(model, LanguageModel),
        )
        return records
