"""A short causal depthwise convolution over a linear-attention layer's q, k and v projections,
followed by SiLU: fla's `ShortConvolution` (the `use_short_conv` option of its GLA layer) and the
short convolutions of Zoology's Based and Mamba.

Why a layer needs it: a token's q, k and v then see its few predecessors, which is what recall
needs first (the key of a pair sits one token before its value) and what a linear layer without
positions otherwise has to learn through a gate that forgets almost everything at once. Without
it, GLA did not learn even to copy a value from the context in trained associative recall
(results/paper-mqar-gpu/COMMAND.md).

The weight has nn.Conv1d's depthwise layout and initialisation ([C, 1, W], the last tap on the
current token), so weights of fla's or torch's depthwise convolutions load as they are. One
sequence takes `F.conv1d`; packed documents take the same sum written as W shifted products with
the taps that would reach into the previous document masked, which F.conv1d cannot express.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class ShortConvolution(nn.Conv1d):
    """SiLU(causal depthwise convolution of width `width`) over [B, T, C] inputs."""

    def __init__(self, channels: int, width: int):
        if width < 2:
            raise ValueError(f"a short convolution needs a width of at least 2 tokens; got {width}")
        super().__init__(channels, channels, width, groups=channels, padding=0, bias=False)
        self.width = width

    def forward(
        self, x: Tensor, history: Tensor | None = None, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x [B, T, C] -> (y [B, T, C], the last W − 1 inputs [B, W − 1, C], what the next call
        continues from as its `history`). `history`: the W − 1 inputs before x (zeros when None: a
        sequence's start). `positions` [B, T]: each token's position inside its document, for
        documents packed along T; a tap never reads before its document's first token."""
        B, T, C = x.shape
        W = self.width
        if history is None:
            history = x.new_zeros(B, W - 1, C)
        elif history.shape != (B, W - 1, C):
            raise ValueError(
                f"a short convolution's history must be [B, W - 1, C] = {[B, W - 1, C]}; got {list(history.shape)}"
            )
        padded = torch.cat([history.to(x.dtype), x], dim=1)  # [B, T + W - 1, C]
        weight = self.weight.to(x.dtype)
        if positions is None:
            y = F.conv1d(padded.transpose(1, 2), weight, groups=C).transpose(1, 2)
        else:
            taps = weight[:, 0, :]  # [C, W]: taps[:, W - 1 - lag] multiplies the token `lag` back
            y = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32))
            for lag in range(W):
                shifted = padded[:, W - 1 - lag : W - 1 - lag + T]
                inside = (positions >= lag).unsqueeze(-1)  # the tap stays inside the document
                y = y + torch.where(inside, shifted * taps[:, W - 1 - lag], 0.0)
            y = y.to(x.dtype)
        return F.silu(y), padded[:, T:]
