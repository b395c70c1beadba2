"""The probe stage: gate-saturation probes (the paper's §5.1, Fig. 4).

For each linear-attention layer, read every gate activation the gate plugin exposes (its
`activations`, values in (0, 1]) and the gradient of the loss at each pre-activation (its
`preactivations`), on held-out batches, for the model at initialisation (rebuilt from the run's
seed) and after training. Records:
  gate/hist            histogram fractions (extra: layer, gate, bin_low, bin_high)
  gate/saturated_high  fraction of activations > 1 − eps
  gate/saturated_low   fraction of activations < eps
  gate/mean            mean activation
  gate/grad_abs_mean   mean |∂loss/∂pre-activation| (the saturation symptom: vanishing gradients)
with step 0 for "before" and train.steps for "after".
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..config import ProbeConfig
from ..distributed import distributed_context, pick_device
from ..model import LanguageModel
from ..postlin.start import initial_model, load_trained
from ..spec import RunSpec
from .base import Stage, StageContext


def gate_statistics(
    model: LanguageModel, batches: list[tuple[torch.Tensor, torch.Tensor]], config: ProbeConfig, step: int
) -> list[dict[str, Any]]:
    """Histogram and saturation records for every exposed gate activation of every linear layer."""
    layers = model.linear_attention_layers()
    values: dict[tuple[int, str], list[torch.Tensor]] = {}
    grads: dict[tuple[int, str], list[torch.Tensor]] = {}
    for layer in layers:
        layer.capture_gates = True
    try:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            logits, _ = model(x)
            captured = [layer.captured for layer in layers]
            for gate_output in captured:
                for tensor in gate_output.preactivations.values():
                    tensor.retain_grad()
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            loss.backward()
            for index, gate_output in enumerate(captured):
                for name, tensor in gate_output.activations.items():
                    values.setdefault((index, name), []).append(tensor.detach().float().flatten())
                for name, tensor in gate_output.preactivations.items():
                    if tensor.grad is not None:
                        grads.setdefault((index, name), []).append(tensor.grad.detach().float().abs().flatten())
    finally:
        for layer in layers:
            layer.capture_gates = False
            layer.captured = None
        model.zero_grad(set_to_none=True)

    records: list[dict[str, Any]] = []
    edges = torch.linspace(0, 1, config.bins + 1)
    for (layer, name), chunks in sorted(values.items()):
        activations = torch.cat(chunks)
        tag = {"layer": layer, "gate": name}
        counts = torch.histc(activations.clamp(0, 1), bins=config.bins, min=0.0, max=1.0)
        fractions = counts / activations.numel()
        for i, fraction in enumerate(fractions.tolist()):
            records.append(
                {
                    "metric": "gate/hist",
                    "value": fraction,
                    "step": step,
                    "extra": json.dumps({**tag, "bin_low": float(edges[i]), "bin_high": float(edges[i + 1])}),
                }
            )
        summary = {
            "gate/saturated_high": (activations > 1 - config.saturation_eps).float().mean(),
            "gate/saturated_low": (activations < config.saturation_eps).float().mean(),
            "gate/mean": activations.mean(),
        }
        if (layer, name) in grads:
            summary["gate/grad_abs_mean"] = torch.cat(grads[(layer, name)]).mean()
        records += [
            {"metric": metric, "value": float(v), "step": step, "extra": json.dumps(tag)}
            for metric, v in summary.items()
        ]
    return records


class ProbeStage(Stage):
    name = "probe"
    requires = ("train",)
    config_class = ProbeConfig

    def run(self, spec: RunSpec, ctx: StageContext) -> list[dict[str, Any]]:
        config: ProbeConfig = self.settings(spec)
        device = pick_device(distributed_context(), ctx.device)
        data = ctx.data_for(spec)
        batches = [
            (x.to(device), y.to(device))
            for x, y in data.validation.eval_batches(config.batch_size, spec.train.seq_len, config.batches)
        ]
        # Before training: the fresh model, or with model.init the converted source.
        initial = initial_model(spec.model, data.tokenizer, spec.train.seed, ctx.run_dir.parent).to(device).train()
        trained, _ = load_trained(ctx.model_dir, map_location=device)
        trained.to(device).train()
        if not initial.linear_attention_layers():
            return [{"metric": "gate/none", "value": 0.0, "extra": json.dumps({"reason": "softmax-only model"})}]
        return gate_statistics(initial, batches, config, step=0) + gate_statistics(
            trained, batches, config, step=spec.train.steps
        )
