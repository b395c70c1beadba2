"""Gated linear attention ops: torch references (recurrent, chunked, parallel), Triton
kernels for CUDA, one dispatch function that picks between them, and ReGLA's attention fused
into the Triton kernels (`triton_regla`: safe-exp feature maps and refining gate inside).

The Triton ops (`triton_gla`, `triton_gla_refined`, `triton_regla`) are composed of the building
blocks in `kernels.blocks` (gate scans, chunk states, output, gradients); `triton_recurrent` is a
fused token-by-token recurrence with key- and value-side gates, `triton_gla`'s exact fallback for
value gates too fast for its chunk kernels."""

from .dispatch import IMPLEMENTATIONS, gated_linear_attention, register_implementation
from .reference import chunked_gla, parallel_gla, recurrent_gla

__all__ = [
    "IMPLEMENTATIONS",
    "gated_linear_attention",
    "register_implementation",
    "chunked_gla",
    "parallel_gla",
    "recurrent_gla",
    "triton_decode_step",
    "triton_regla",
]

try:  # The Triton fast path registers itself wherever triton is importable (CPU runs use its interpreter).
    from .triton_decode import triton_decode_step
    from .triton_gla import triton_gla
    from .triton_regla import triton_regla
except ImportError:
    triton_regla = None  # the fused ReGLA op needs triton; layers then take the composed path
    triton_decode_step = None
else:
    register_implementation("triton", triton_gla)
