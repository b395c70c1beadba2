"""How much safe_exp's key-max scope changes a layer's normalised output, with the per-head
RMSNorm's eps in the shifted frame (a plain RMSNorm, as fla's) and in the unshifted frame (the
default), at random initialisation: d_model 256, 4 heads of 64, T = 1024, fp32, eps 1e-5.

    .venv/bin/python scripts/measure_eps_frame_leak.py
"""

from __future__ import annotations

import torch

from harness.config import AttentionConfig
from harness.layers import LinearAttention

D, H, K, T = 256, 4, 64, 1024


def normalised_output(x: torch.Tensor, scope: str, frame: str) -> torch.Tensor:
    torch.manual_seed(1)
    config = AttentionConfig(
        feature_map="safe_exp",
        feature_map_options={"key_max": scope},
        norm="rmsnorm",
        gate="refined",
        norm_eps_frame=frame,
        impl="chunked",
    )
    layer = LinearAttention(D, H, K, config)
    captured = []
    layer.norm.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        layer(x)
    return captured[0]


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, T, D)
    changed = x.clone()
    changed[:, 3 * T // 4 :] = 3 * torch.randn(2, T // 4, D)
    print("frame      running-vs-sequence  chunk-vs-sequence  sequence: leak from the last quarter")
    for frame in ("shifted", "unshifted"):
        reference = normalised_output(x, "sequence", frame)
        running = (normalised_output(x, "running", frame) - reference).abs().max().item()
        chunk = (normalised_output(x, "chunk", frame) - reference).abs().max().item()
        later = normalised_output(changed, "sequence", frame)
        leak = (later[:, : 3 * T // 4] - reference[:, : 3 * T // 4]).abs().max().item()
        print(f"{frame:10s} {running:19.3g}  {chunk:17.3g}  {leak:10.3g}")


if __name__ == "__main__":
    main()
