"""Decoding speed and memory of 6-layer softmax, GLA and ReGLA models against the generated length
(the paper's generation figure, §5.2 / Fig. 5), with and without the fused decoding step and CUDA
graphs.

Models: Pythia-160m's width (d_model 768, 12 heads of 64, vocabulary 50304, GELU MLP) at 6
layers, the variants of grids/paper/efficiency.yaml, random weights (speed does not depend on
them). Modes:
  eager            the plain loop: the model's growing state (softmax: a KV cache grown by torch.cat)
  graphs           the whole decode step captured as CUDA graphs over static buffers
                   (harness.decoding; softmax: a preallocated KV cache attended over power-of-two windows)
and, for the linear models, each with the fused decoding step (kernels.triton_decode) or the
composed one (feature map, gate, recurrence and norm as separate ops): `+fused` / `+composed`.

Per-token latency at length n is the time of one decode step after n tokens: the n tokens are
prefilled as a prompt (the state a step sees after n tokens does not depend on whether they were
prompt or generated), then `--steps` steps are timed one by one, synchronised (median, p20, p80),
each including the greedy choice of the next token. Memory: `state_mib` is what the decoding state
holds after n tokens (KV caches, recurrent states, static buffers and graphs' pools), `peak_mib`
the allocator's high-water mark over the timed steps, both above the memory before the prefill.
`--e2e-lengths` also times whole `model.generate` calls (prompt of 5 tokens, graphs and fused step
on, capture included) to check the curve against real generation.

On CPU (the test suite runs it at tiny sizes) there are no CUDA graphs: the `graphs` mode runs the
same static-buffer step uncaptured, and no memory is measured (NaN); rows record what ran.

    python3 benchmarks/bench_generation.py --out DIR [--lengths 64,...,8192] [--batches 1,16]
    python3 benchmarks/bench_generation.py --out DIR --replot DIR/generation.parquet   # plot only
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import matplotlib
import pandas as pd
import torch

matplotlib.use("Agg")  # headless: plots are written on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import AttentionConfig, ModelConfig  # noqa: E402
from harness.decoding import StaticDecoder  # noqa: E402
from harness.measure import time_call  # noqa: E402
from harness.model import LanguageModel  # noqa: E402

#: The variants of grids/paper/efficiency.yaml.
MODELS = {
    "softmax": dict(softmax_layers="all"),
    "gla": dict(attention=AttentionConfig(feature_map="identity", norm="rmsnorm", gate="gla", output_gate="swish")),
    "regla": dict(attention=AttentionConfig(feature_map="safe_exp", norm="rmsnorm", gate="refined")),
}
DEFAULT_LENGTHS = [64, 128, 256, 512, 1024, 2048, 4096, 8192]
PROMPT_LENGTH = 5


def build_model(name: str, args, device: torch.device) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        mlp="gelu",
        mlp_ratio=4.0,
        max_seq_len=max(args.lengths + args.e2e_lengths) + args.steps + args.warmup + PROMPT_LENGTH + 1,
        **MODELS[name],
    )
    return LanguageModel(config).to(device, getattr(torch, args.dtype)).eval()


def modes_of(model: LanguageModel, wanted: list[str]) -> list[tuple[str, bool, bool]]:
    """(mode name, graphs, fused step) for each wanted mode this model has."""
    linear = bool(model.linear_attention_layers())
    modes = []
    for graphs in (False, True):
        base = "graphs" if graphs else "eager"
        for fused in (True, False) if linear else (False,):
            name = f"{base}+{'fused' if fused else 'composed'}" if linear else base
            if base in wanted or name in wanted:
                modes.append((name, graphs, fused))
    return modes


@contextlib.contextmanager
def fused_step(model: LanguageModel, enabled: bool):
    layers = model.linear_attention_layers()
    for layer in layers:
        layer.fused_decode_step = enabled
    try:
        yield
    finally:
        for layer in layers:
            layer.fused_decode_step = True


def memory_mib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


@torch.no_grad()
def measure_step(model: LanguageModel, batch: int, length: int, graphs: bool, args, device) -> dict:
    """One decode step after `length` prefilled tokens: timing and memory."""
    cuda = device.type == "cuda"
    generator = torch.Generator(device).manual_seed(length)
    prompt = torch.randint(0, args.vocab, (batch, length), device=device, generator=generator)
    before = memory_mib(device)
    logits, cache = model(prompt, use_cache=True)
    token = logits[:, -1].argmax(-1, keepdim=True)
    del logits
    if graphs:
        decoder = StaticDecoder(model, cache, length, length + args.steps + args.warmup + 1)
        if cuda:
            decoder.capture(cache, length)
        del cache
        decoder.token.copy_(token)
        position = iter(range(length, decoder.capacity))

        def step() -> None:
            decoder.token.copy_(decoder.decode(next(position)).argmax(-1, keepdim=True))

    else:

        def step() -> None:
            # The state after `length` tokens each time: the cache is not advanced.
            model(token, cache, use_cache=True)[0][:, -1].argmax(-1, keepdim=True)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    state_mib = memory_mib(device) - before
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_call(step, device, args.warmup, args.steps)
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 - before if cuda else float("nan")
    return dict(timing, state_mib=state_mib, peak_mib=peak_mib, cuda_graph=graphs and cuda)


@torch.no_grad()
def measure_generation(model: LanguageModel, batch: int, n: int, args, device) -> dict:
    """A whole `model.generate` call of n tokens after a 5-token prompt (the harness's defaults:
    graphs on CUDA)."""
    prompt = torch.randint(0, args.vocab, (batch, PROMPT_LENGTH), device=device)
    model.generate(prompt, 8)  # warm-up: compilation and lazy initialisation stay out of the time
    timing = time_call(lambda: model.generate(prompt, n), device, 0, 1)
    return dict(timing, cuda_graph=device.type == "cuda")


def plot(out: Path, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows)
    steps = frame[frame.kind == "step"]
    batches = sorted(steps.batch.unique())
    fig, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 8), squeeze=False)
    for column, batch in enumerate(batches):
        at_batch = steps[steps.batch == batch]
        for (model, mode), group in at_batch.groupby(["model", "mode"]):
            group = group.sort_values("length")
            style = dict(marker="o", ms=3, label=f"{model} {mode}", ls="-" if "graphs" in mode else "--")
            axes[0][column].errorbar(
                group.length,
                group.median_ms,
                yerr=[group.median_ms - group.p20_ms, group.p80_ms - group.median_ms],
                **style,
            )
            axes[1][column].plot(group.length, group.state_mib, **style)
        axes[0][column].set(title=f"batch {batch}: time per token", ylabel="ms per token", yscale="log")
        axes[1][column].set(title=f"batch {batch}: decoding state", ylabel="MiB", yscale="symlog")
        for ax in (axes[0][column], axes[1][column]):
            ax.set(xscale="log", xlabel="tokens before the step (generated length)")
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "generation.png", dpi=120)
    plt.close(fig)


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers; got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the Parquet, plot and log")
    parser.add_argument("--lengths", type=parse_ints, default=DEFAULT_LENGTHS, help="tokens before the timed step")
    parser.add_argument("--batches", type=parse_ints, default=[1, 16])
    parser.add_argument("--models", default="softmax,gla,regla", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument(
        "--modes",
        default="eager,graphs",
        help="comma-separated: eager, graphs (all their variants), or one variant such as graphs+fused",
    )
    parser.add_argument("--e2e-lengths", type=parse_ints, default=[1024, 8192], help="whole generate() calls")
    parser.add_argument("--no-e2e", action="store_true", help="skip the whole generate() calls")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per point")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--n-heads", type=int, default=12)
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--replot", metavar="PARQUET", help="only redraw the plot into --out from this file")
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    if args.no_e2e:
        args.e2e_lengths = []
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        plot(out, pd.read_parquet(args.replot).to_dict("records"))
        return
    device = torch.device(args.device)
    log_file = open(out / "bench_generation.log", "a")

    def log(message: str) -> None:
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    meta = dict(
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        dtype=args.dtype,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        vocab=args.vocab,
    )
    log(f"meta {meta}")
    wanted = args.modes.split(",")
    rows: list[dict] = []
    started = time.time()
    for name in args.models.split(","):
        model = build_model(name, args, device)
        for batch in args.batches:
            for mode, graphs, fused in modes_of(model, wanted):
                with fused_step(model, fused):
                    for length in args.lengths:
                        result = measure_step(model, batch, length, graphs, args, device)
                        row = dict(meta, kind="step", model=name, mode=mode, batch=batch, length=length, **result)
                        rows.append(row)
                        log(
                            f"{name:8s} {mode:16s} B={batch:<3d} n={length:<6d} {row['median_ms']:8.3f} ms/token "
                            f"state {row['state_mib']:9.1f} MiB  peak {row['peak_mib']:9.1f} MiB"
                        )
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            for n in args.e2e_lengths:
                result = measure_generation(model, batch, n, args, device)
                rows.append(dict(meta, kind="generate", model=name, mode="generate", batch=batch, length=n, **result))
                log(
                    f"{name:8s} generate()       B={batch:<3d} n={n:<6d} {result['median_ms'] / 1e3:8.2f} s total, "
                    f"{result['median_ms'] / n:.3f} ms/token"
                )
            pd.DataFrame(rows).to_parquet(out / "generation.parquet")  # after every batch: a stopped run keeps its rows
        del model
    pd.DataFrame(rows).to_parquet(out / "generation.parquet")
    plot(out, rows)
    log(f"done in {time.time() - started:.0f} s: {out / 'generation.parquet'}, {out / 'generation.png'}")


if __name__ == "__main__":
    main()
