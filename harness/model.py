"""Decoder-only language model whose layers are softmax or linear attention (hybrids included)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .decoding import Sampling, generate_eagerly, generate_static
from .layers import Block, LinearAttention

Tensor = torch.Tensor


class LanguageModel(nn.Module):
    """Token embedding -> blocks -> final RMSNorm -> (tied) LM head.

    `forward(idx, cache=None, use_cache=False)` returns (logits [B, T, vocab], cache): the cache is a
    list with one entry per layer (a LinearState or a KVCache) for incremental decoding.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError(
                "model.vocab_size is not set: build the model with the tokenizer's vocabulary "
                "size (dataclasses.replace(config, vocab_size=tokenizer.vocab_size))"
            )
        self.config = config
        softmax = set(config.softmax_layer_indices())
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i in softmax) for i in range(config.n_layers))
        self.final_norm = nn.RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) for matrices, residual outputs scaled by 1/sqrt(2 n_layers).
        Biases are left alone: gates initialise their own (bias_init is a switch)."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                residual = name.endswith(("o_proj", "mlp.down"))
                nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * self.config.n_layers) if residual else std)

    def forward(
        self, idx: Tensor, cache: list[Any] | None = None, use_cache: bool = False, cu_seqlens: Tensor | None = None
    ) -> tuple[Tensor, list[Any] | None]:
        """`cu_seqlens`: [N + 1] offsets of documents packed into the rows of idx (over the B·T tokens
        read row after row, every row start among them); no attention crosses a boundary. None:
        each row is one sequence. Best kept on the host: the ops read the offsets as host values."""
        hidden, new_cache = self.hidden_states(idx, cache, use_cache, cu_seqlens)
        return self.lm_head(hidden), new_cache

    def hidden_states(
        self, idx: Tensor, cache: list[Any] | None = None, use_cache: bool = False, cu_seqlens: Tensor | None = None
    ) -> tuple[Tensor, list[Any] | None]:
        """The final-normed hidden states [B, T, d_model] that `forward` feeds the LM head: for a
        loss on a few positions (trained recall scores one token in many), the head applied to
        those alone gives the same logits for a fraction of the head's cost."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, time] token ids; got shape {tuple(idx.shape)}")
        x = self.embed(idx)
        new_cache = [] if use_cache else None
        for i, block in enumerate(self.blocks):
            x, state = block(x, cache[i] if cache is not None else None, use_cache, cu_seqlens)
            if use_cache:
                new_cache.append(state)
        return self.final_norm(x), new_cache

    def loss(self, idx: Tensor, targets: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        logits, _ = self(idx, cu_seqlens=cu_seqlens)
        # At least fp32 for the softmax (bf16 logits lose the tail), and fp64 stays fp64.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        eos_id: int | None = None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cuda_graph: bool | None = None,
        static: bool | None = None,
    ) -> Tensor:
        """Decoding with the recurrent state (linear layers) and KV cache (softmax layers): greedy, or
        sampled with `do_sample` (temperature, top_k, a generator on idx's device for reproducible
        draws). Stops after `max_new_tokens` or when every sequence produced `eos_id`.

        `cuda_graph` captures the whole decode step as CUDA graphs over static buffers (the default
        on CUDA; off elsewhere, where there are no graphs), so the time per token does not grow
        with the number of tokens generated for linear layers (harness.decoding). `static` decodes
        over those static buffers without graphs (the default: as `cuda_graph`)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
        if cuda_graph and not idx.is_cuda:
            raise ValueError(f"cuda_graph=True needs the model and idx on a CUDA device; idx is on {idx.device}")
        sampling = Sampling(do_sample, temperature, top_k, generator)
        cuda_graph = idx.is_cuda if cuda_graph is None else cuda_graph
        static = cuda_graph if static is None else static or cuda_graph
        if max_new_tokens == 0:
            return idx
        if static:
            return generate_static(self, idx, max_new_tokens, eos_id, sampling, cuda_graph)
        return generate_eagerly(self, idx, max_new_tokens, eos_id, sampling)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.embed.weight), None)
            params.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in params.values())

    def linear_attention_layers(self) -> list[LinearAttention]:
        return [b.attn for b in self.blocks if isinstance(b.attn, LinearAttention)]


def build_model(config: ModelConfig, vocab_size: int, seed: int) -> LanguageModel:
    """A freshly initialised model for a tokenizer of `vocab_size` tokens, seeded by `seed` (the
    run's `train.seed`, so that a rebuilt model equals the one a run started from)."""
    if config.vocab_size is None:
        config = replace(config, vocab_size=vocab_size)
    elif config.vocab_size < vocab_size:
        raise ValueError(
            f"model.vocab_size ({config.vocab_size}) is smaller than the tokenizer's "
            f"vocabulary ({vocab_size}); leave it unset to take the tokenizer's"
        )
    torch.manual_seed(seed)
    return LanguageModel(config)
