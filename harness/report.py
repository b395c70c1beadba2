"""Tables and plots from a grid's result rows: loss curves per variant, a final-metric bar chart,
a markdown table (RESULTS.md) and a consolidated Parquet file under `results/<grid>/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on machines without a display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from . import results as results_io
from .atomic import atomic_write_bytes, atomic_write_text
from .grid import SEED_AXIS

FINAL_METRICS = [
    ("final/val_loss", "val loss"),
    ("final/val_perplexity", "val ppl"),
    ("final/val_bits_per_byte", "val bpb"),
    ("params", "params"),
    ("train/tokens_per_second", "train tok/s"),
]


def axis_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("axis:")]


def run_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: axes, status, final training metrics and eval-task scores."""
    axes = axis_columns(frame)
    index = ["run_name", "run_id"]
    runs = frame.drop_duplicates("run_id").set_index("run_id")[["run_name", *axes]]
    table = runs.rename(columns={a: a.removeprefix("axis:") for a in axes})
    # A failed evaluation task is reported in its own column, not as the run's status.
    failures = results_io.stage_failures(frame)
    table["status"] = "ok"
    if len(failures):
        failed = failures.groupby("run_id")
        table.loc[list(failed.groups), "status"] = "failed"
        table["error"] = failed.apply(lambda g: "; ".join(f"[{r.stage}] {r.error}" for r in g.itertuples()))
    train = frame[frame["stage"] == "train"]
    for metric, label in FINAL_METRICS:
        values = train[train["metric"] == metric].groupby("run_id")["value"].last()
        if len(values):
            table[label] = values
    paths = attention_paths(train)
    if len(paths):
        table["attention path"] = paths
    evals = frame[(frame["stage"] == "eval") & (frame["status"] == "ok") & frame["task"].notna()]
    if len(evals):
        preferred = evals[evals["metric"].isin(["acc", "acc_norm", "bits_per_byte", "word_perplexity"])]
        for (task, metric, shots), group in preferred.groupby(["task", "metric", "shots"], dropna=False):
            suffix = "" if pd.isna(shots) else f" {int(shots)}-shot"
            table[f"{task} {metric}{suffix}"] = group.groupby("run_id")["value"].last()
    recall = frame[(frame["metric"] == "mqar/final_accuracy") & (frame["status"] == "ok")]
    for extra, group in recall.groupby("extra"):
        setting = json.loads(extra)
        table[f"mqar acc T{setting['seq_len']} x{setting['pairs']}"] = group.groupby("run_id")["value"].last()
    return table.reset_index().drop(columns=["run_id"]).set_index(index[0])


def attention_paths(train: pd.DataFrame) -> pd.Series:
    """Per run, the paths its linear-attention layers trained through (`attention/layers_*` rows),
    e.g. "fused 6" or "fused 3, composed 3"; runs without those rows are left out."""
    rows = train[train["metric"].str.startswith("attention/layers_") & (train["value"] > 0)]
    labels = rows["metric"].str.removeprefix("attention/layers_") + " " + rows["value"].astype(int).astype(str)
    return labels.groupby(rows["run_id"]).agg(", ".join)


def markdown_table(table: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    """A GitHub markdown table (written by hand: pandas' to_markdown needs the `tabulate` extra)."""
    headers = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, row in table.iterrows():
        cells = [str(name)]
        for value in row:
            if isinstance(value, float):
                cells.append("" if pd.isna(value) else float_format.format(value))
            else:
                text = "" if value is None else str(value)
                # A cell is one line, and a | inside it would end the cell.
                cells.append(" ".join(text.split()).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_loss_curves(frame: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, metric, title in ((axes[0], "train/loss", "training loss"), (axes[1], "val/loss", "validation loss")):
        subset = frame[(frame["metric"] == metric) & (frame["status"] == "ok")]
        for name, group in subset.groupby("run_name"):
            group = group.sort_values("step")
            ax.plot(
                group["step"], group["value"], label=name, marker="o" if metric == "val/loss" else None, markersize=3
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_final_metrics(table: pd.DataFrame, path: Path, metric: str = "val bpb") -> bool:
    if metric not in table or table[metric].dropna().empty:
        return False
    values = table[metric].dropna().sort_values()
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(values) + 2), 4))
    ax.bar(range(len(values)), values.values, color="tab:blue")
    ax.set_xticks(range(len(values)), values.index, rotation=30, ha="right")
    ax.set_ylabel(f"final {metric} (lower is better)")
    if len(values):
        span = values.max() - values.min()
        ax.set_ylim(max(0, values.min() - 0.5 * span - 1e-3), values.max() + 0.2 * span + 1e-3)
    for i, v in enumerate(values.values):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def with_extra_fields(rows: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """`columns` of the rows plus one column per field of their `extra` JSON (layer, gate, seq_len, ...)."""
    extra = pd.DataFrame([json.loads(e) for e in rows["extra"]], index=rows.index)
    return pd.concat([rows[columns], extra], axis=1)


#: which exposed activation is each gate's effective forget value, in order of preference
FORGET_ACTIVATIONS = ("F", "alpha", "f", "g")


def gate_histograms(frame: pd.DataFrame) -> pd.DataFrame:
    """Probe histogram rows with their layer/gate/bin fields unpacked, layers pooled."""
    hist = frame[(frame["stage"] == "probe") & (frame["metric"] == "gate/hist") & (frame["status"] == "ok")]
    if hist.empty:
        return hist
    hist = with_extra_fields(hist, ["run_name", "step", "value"])
    return hist.groupby(["run_name", "step", "gate", "bin_low", "bin_high"], as_index=False)["value"].mean()


def plot_gate_saturation(frame: pd.DataFrame, path: Path) -> bool:
    """The paper's Fig. 4: forget-gate activation histograms before and after training, per run."""
    hist = gate_histograms(frame)
    if hist.empty:
        return False
    runs = sorted(hist["run_name"].unique())
    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        rows = hist[hist["run_name"] == run]
        gate = next((g for g in FORGET_ACTIVATIONS if g in set(rows["gate"])), rows["gate"].iloc[0])
        rows = rows[rows["gate"] == gate]
        for (step, group), colour in zip(sorted(rows.groupby("step"), key=lambda item: item[0]), ("0.6", "tab:red")):
            label = "before training" if step == 0 else f"after {int(step)} steps"
            ax.bar(
                group["bin_low"],
                group["value"],
                width=group["bin_high"] - group["bin_low"],
                align="edge",
                alpha=0.6,
                color=colour,
                label=label,
            )
        ax.set_title(f"{run}: {gate}", fontsize=9)
        ax.set_xlabel("forget-gate activation")
        ax.set_xlim(0, 1)
    axes[0][0].set_ylabel("fraction of activations")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


THROUGHPUT, REPLAYED_THROUGHPUT = "profile/train_tokens_per_second", "profile/train_graph_tokens_per_second"
PROFILE_PANELS = (
    (THROUGHPUT, "seq_len", "training tokens/s"),
    ("profile/train_peak_mib", "seq_len", "training peak memory (MiB)"),
    ("profile/generate_total_ms", "generated", "generation total time (ms)"),
    ("profile/generate_peak_mib", "generated", "generation peak memory (MiB)"),
)


def profile_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Profile rows with their x coordinate (sequence length or tokens generated) unpacked."""
    rows = frame[(frame["stage"] == "profile") & (frame["status"] == "ok") & frame["extra"].notna()]
    if rows.empty:
        return rows
    return with_extra_fields(rows, ["run_name", "metric", "value"])


def plot_profile(frame: pd.DataFrame, path: Path) -> bool:
    """Throughput and memory vs sequence length, generation time and memory vs tokens generated."""
    table = profile_table(frame)
    if table.empty:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for ax, (metric, x, title) in zip(axes, PROFILE_PANELS):
        subset = table[(table["metric"] == metric) & table[x].notna()] if x in table else table.iloc[:0]
        replayed = table[table["metric"] == REPLAYED_THROUGHPUT] if metric == THROUGHPUT else table.iloc[:0]
        for name, group in subset.groupby("run_name"):
            group = group.sort_values(x)
            (line,) = ax.plot(group[x], group["value"], marker="o", markersize=3, label=name)
            graph = replayed[replayed["run_name"] == name].sort_values(x)
            if len(graph):  # profile.train_cuda_graph: the same run's step replayed, dashed
                ax.plot(graph[x], graph["value"], "--", marker="o", markersize=3, color=line.get_color(),
                        label=f"{name}, step from a CUDA graph")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


#: the axis and levels of a post-linearization grid (grids/paper/postlin_offline.yaml)
INIT_AXIS, CONVERTED, SCRATCH = "axis:init", "converted", "scratch"


def tokens_per_step(spec_json: str) -> int:
    spec = json.loads(spec_json)
    train = spec["train"]
    return train["batch_size"] * train["seq_len"] * train["grad_accum"] * spec.get("processes", 1)


def recovery_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per variant, the final validation bits per byte converted and from scratch, when the grid
    has an `init` axis with both levels (a post-linearization grid); else empty."""
    if INIT_AXIS not in frame or not {CONVERTED, SCRATCH} <= set(frame[INIT_AXIS].dropna()):
        return pd.DataFrame()
    final = frame[(frame["metric"] == "final/val_bits_per_byte") & (frame["status"] == "ok")].copy()
    final["variant"] = final["run_name"].str.split("/").str[0]
    table = final.pivot_table(index="variant", columns=INIT_AXIS, values="value", aggfunc="mean")
    if not {CONVERTED, SCRATCH} <= set(table.columns):
        return pd.DataFrame()
    table = table[[CONVERTED, SCRATCH]].dropna()
    table.columns = ["converted val bpb", "scratch val bpb"]
    table["converted - scratch"] = table["converted val bpb"] - table["scratch val bpb"]
    # The eval stage's scores beside them: each run's mean accuracy over its tasks and shots (the
    # offline suite's), so that a recovery in loss can be read against one in the tasks.
    scores = frame[(frame["stage"] == "eval") & (frame["status"] == "ok") & (frame["metric"] == "acc")].copy()
    if len(scores):
        scores["variant"] = scores["run_name"].str.split("/").str[0]
        per_run = scores.groupby(["variant", INIT_AXIS, "run_name"])["value"].mean().reset_index()
        accuracy = per_run.pivot_table(index="variant", columns=INIT_AXIS, values="value", aggfunc="mean")
        tasks = scores.groupby("run_name")[["task", "shots"]].apply(lambda g: len(g.drop_duplicates())).max()
        for init in (CONVERTED, SCRATCH):
            if init in accuracy:
                table[f"{init} mean acc ({tasks} task-shots)"] = accuracy[init]
    return table


def plot_recovery(frame: pd.DataFrame, path: Path) -> bool:
    """Validation bits per byte against training tokens: each variant converted (solid) and from
    scratch (dashed), one colour per variant."""
    if recovery_table(frame).empty:
        return False
    rows = frame[(frame["metric"] == "val/bits_per_byte") & (frame["status"] == "ok")].copy()
    rows["variant"] = rows["run_name"].str.split("/").str[0]
    colours = {v: f"C{i}" for i, v in enumerate(sorted(rows["variant"].unique()))}
    fig, ax = plt.subplots(figsize=(8, 5))
    for (variant, init, run), group in rows.groupby(["variant", INIT_AXIS, "run_name"]):
        group = group.sort_values("step")
        tokens = group["step"] * tokens_per_step(group["spec_json"].iloc[0])
        style = "-" if init == CONVERTED else "--"
        ax.plot(tokens, group["value"], style, color=colours[variant], marker="o", markersize=3, label=run)
    ax.set_xlabel("training tokens of the run (converted runs start from the trained softmax source)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("recovery: converted (solid) vs from scratch (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(
    grid: str,
    runs_dir: str | Path = "runs",
    results_dir: str | Path = "results",
    command: str | None = None,
    reference: dict | None = None,
    runs: Any = None,
    frame: pd.DataFrame | None = None,
    source_note: str | None = None,
) -> Path:
    """Write results/<grid>/: results.parquet, RESULTS.md and the plots that the grid's stages
    have data for (loss_curves, final_metrics, gate_saturation, profile). `frame`: rows to report
    instead of those under the runs folder (a committed results.parquet)."""
    if frame is None:
        frame = results_io.load(grid, runs_dir)
    if runs is not None:
        frame = results_io.current_rows(frame, runs)
        if frame.empty:
            raise FileNotFoundError(
                f"no results of grid {grid!r}'s current runs under {str(runs_dir)!r}; "
                f"run `python run_ablations.py run {grid}` first"
            )
    out = Path(results_dir) / grid
    out.mkdir(parents=True, exist_ok=True)
    table = run_table(frame)
    if reference:
        label = dict(FINAL_METRICS).get(reference["metric"], reference["metric"])
        table.insert(
            table.columns.get_loc(label) + 1 if label in table.columns else len(table.columns),
            f"paper {label}",
            pd.Series(reference["values"], dtype=float),
        )
    atomic_write_bytes(out / "results.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
    has_training = bool((frame["stage"] == "train").any())
    if has_training:
        plot_loss_curves(frame, out / "loss_curves.png")
    has_final = plot_final_metrics(table, out / "final_metrics.png")
    has_probes = plot_gate_saturation(frame, out / "gate_saturation.png")
    has_profile = plot_profile(frame, out / "profile.png")
    has_recovery = plot_recovery(frame, out / "recovery.png")
    env = frame.iloc[0]
    lines = [f"# Results: grid `{grid}`", ""]
    if source_note:
        lines += [source_note, ""]
    elif command:
        lines += [
            f"Regenerate with `{command}` (stages already done are skipped; each stage's own "
            "command is in the grid file).",
            "",
        ]
    lines += [
        f"Machine: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"lm-eval {env['lm_eval']}; git {env['git_sha']}.",
        "",
        "Validation metrics are on held-out documents; bpb = bits per UTF-8 byte (tokenizer-independent).",
        "",
        markdown_table(table),
        "",
    ]
    if has_training:
        lines += ["![loss curves](loss_curves.png)", ""]
    if has_final:
        lines += ["![final metrics](final_metrics.png)", ""]
    if has_recovery:
        lines += [
            "## Recovery: converted from the softmax source vs trained from scratch (same tokens)",
            "",
            "![recovery](recovery.png)",
            "",
            markdown_table(recovery_table(frame)),
            "",
        ]
    if has_profile:
        profile = profile_table(frame)
        profile["x"] = profile["seq_len"].fillna(profile["generated"]) if "generated" in profile else profile["seq_len"]
        wide = profile.pivot_table(index=["metric", "x"], columns="run_name", values="value")
        wide.index = [f"{m.removeprefix('profile/')} @ {int(x)}" for m, x in wide.index]
        wide.index.name = "measurement"
        lines += [
            "## Profile (random weights; time and memory do not depend on them)",
            "",
            "![profile](profile.png)",
            "",
            markdown_table(wide),
            "",
        ]
    if has_probes:
        lines += [
            "## Gate saturation (forget-gate activations before and after training)",
            "",
            "![gate saturation](gate_saturation.png)",
            "",
            markdown_table(saturation_table(frame)),
            "",
        ]
    if reference:
        lines += [f"`paper` column: {reference['source']}.", ""]
    for title, seeds in (
        ("final validation bits per byte", seed_table(frame)),
        (
            "trained recall, accuracy averaged over the settings",
            seed_table(frame, "mqar/mean_accuracy", stage="mqar", higher_is_better=True),
        ),
    ):
        if len(seeds):
            lines += [
                f"## Over seeds ({title})",
                "",
                "Mean and 95% t-interval over each configuration's seeds; each compared with the best by "
                "Welch's t-test.",
                "",
                markdown_table(seeds),
                "",
            ]
    if reference:
        compared, tau, p_value, disagreements = reference_comparison(frame, reference)
        if len(compared):
            lines += [
                f"## Beside the published numbers ({reference['metric']})",
                "",
                f"Source: {reference['source']}. Kendall's τ between the two rankings: {tau:.2f} "
                f"(p = {p_value:.2g}, {len(compared)} configurations).",
                "",
                markdown_table(compared),
                "",
            ]
            lines += [f"- {sentence}." for sentence in disagreements] or ["- The two rankings agree."]
            lines.append("")
            if plot_ranking_agreement(compared, out / "ranking_agreement.png"):
                lines += ["![ranking agreement](ranking_agreement.png)", ""]
    failures = failure_table(frame)
    if len(failures):
        lines += [
            f"## Failures ({len(failures)})",
            "",
            "Every stage that failed and every evaluation task that could not run, with the reason "
            "and what to do about it. Their runs' other results are in the tables above.",
            "",
            markdown_table(failures),
            "",
        ]
    switches = _recorded_switches(frame)
    if switches:
        lines += ["## Switches recorded with each run", "", switches, ""]
    atomic_write_text(out / "RESULTS.md", "\n".join(lines))
    return out


def failure_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per failed stage or failed evaluation task: run, stage, task, reason, advice."""
    failed = frame[frame["status"] == "failed"]
    rows = []
    for row in failed.itertuples():
        advice = results_io.advice_of(row.extra)
        task = "" if pd.isna(row.task) else str(row.task)
        if task and not pd.isna(row.shots):
            task += f" ({int(row.shots)}-shot)"
        rows.append({"run": row.run_name, "stage": row.stage, "task": task, "reason": row.error, "what to do": advice})
    columns = ["run", "stage", "task", "reason", "what to do"]
    return pd.DataFrame(rows, columns=columns).drop_duplicates().set_index("run")


def variant_of(frame: pd.DataFrame) -> pd.Series:
    """Each row's configuration: its run name without the seed axis (runs that differ only in
    seed share it)."""
    axes = [c for c in axis_columns(frame) if c != f"axis:{SEED_AXIS}"]
    if not axes:
        return frame["run_name"]
    return frame[axes].astype(str).agg("/".join, axis=1)


def seed_table(
    frame: pd.DataFrame,
    metric: str = "final/val_bits_per_byte",
    stage: str = "train",
    higher_is_better: bool = False,
) -> pd.DataFrame:
    """Per configuration over its seeds: mean, 95% t-interval half-width, number of seeds, and
    whether it differs from the best configuration (Welch's t-test, p < 0.05), best first. Empty
    without seeds. Lower is better unless `higher_is_better` (accuracies)."""
    if f"axis:{SEED_AXIS}" not in frame:
        return pd.DataFrame()
    rows = frame[(frame["stage"] == stage) & (frame["metric"] == metric) & (frame["status"] == "ok")]
    if rows.empty:
        return pd.DataFrame()
    samples = rows.assign(variant=variant_of(rows)).groupby("variant")["value"].apply(list)
    means = samples.map(lambda v: float(np.mean(v)))
    best = means.idxmax() if higher_is_better else means.idxmin()
    table = []
    for variant, values in samples.items():
        n = len(values)
        half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        if variant == best:
            verdict = "best"
        elif n > 1 and len(samples[best]) > 1:
            p_value = float(stats.ttest_ind(values, samples[best], equal_var=False).pvalue)
            verdict = f"worse (p = {p_value:.2g})" if p_value < 0.05 else f"not significantly worse (p = {p_value:.2g})"
        else:
            verdict = "one seed: untested"
        table.append({"configuration": variant, "mean": means[variant], "± 95%": half, "seeds": n, "vs best": verdict})
    return pd.DataFrame(table).sort_values("mean", ascending=not higher_is_better).set_index("configuration")


def reference_comparison(frame: pd.DataFrame, reference: dict) -> tuple[pd.DataFrame, float, float, list[str]]:
    """Our numbers (mean over seeds) beside the published ones, Kendall's τ between the two
    rankings with its p-value, and one sentence per pair of configurations ranked the other way
    round. Lower is better for the losses, perplexities and bits per byte compared here."""
    metric = reference["metric"]
    rows = frame[(frame["stage"] == "train") & (frame["metric"] == metric) & (frame["status"] == "ok")]
    ours = rows.assign(variant=variant_of(rows)).groupby("variant")["value"].mean()
    paper = pd.Series(reference["values"], dtype=float)
    common = sorted(set(ours.index) & set(paper.index))
    table = pd.DataFrame({"ours": ours[common], "paper": paper[common]})
    table["our rank"] = table["ours"].rank().astype(int)
    table["paper rank"] = table["paper"].rank().astype(int)
    table = table.sort_values("paper")
    table.index.name = "configuration"
    if len(common) < 2:
        return table, float("nan"), float("nan"), []
    tau, p_value = stats.kendalltau(table["ours"], table["paper"])
    disagreements = []
    for i, a in enumerate(table.index):
        for b in table.index[i + 1 :]:
            if np.sign(table.at[a, "ours"] - table.at[b, "ours"]) != np.sign(
                table.at[a, "paper"] - table.at[b, "paper"]
            ):
                disagreements.append(
                    f"the paper ranks {a} above {b} ({table.at[a, 'paper']:.4g} vs {table.at[b, 'paper']:.4g}); "
                    f"we find the reverse ({table.at[a, 'ours']:.4g} vs {table.at[b, 'ours']:.4g})"
                )
    return table, float(tau), float(p_value), disagreements


def plot_ranking_agreement(table: pd.DataFrame, path: Path) -> bool:
    if len(table) < 2:
        return False
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(table["paper rank"], table["our rank"], color="tab:blue")
    for name, row in table.iterrows():
        ax.annotate(str(name), (row["paper rank"], row["our rank"]), textcoords="offset points", xytext=(4, 4))
    n = len(table)
    ax.plot([1, n], [1, n], color="grey", linestyle="--", linewidth=1, label="same ranking")
    ax.set_xlabel("paper's rank (1 = best)")
    ax.set_ylabel("our rank (1 = best)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def saturation_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per run and gate activation: saturated fractions and mean, before -> after training."""
    probe = frame[
        (frame["stage"] == "probe")
        & (frame["status"] == "ok")
        & frame["metric"].isin(["gate/saturated_high", "gate/saturated_low", "gate/mean", "gate/grad_abs_mean"])
    ]
    probe = with_extra_fields(probe, ["run_name", "step", "metric", "value"])
    pooled = probe.groupby(["run_name", "gate", "metric", "step"])["value"].mean().unstack("step")
    first, last = pooled.columns.min(), pooled.columns.max()
    pooled["change"] = pooled[first].map("{:.3g}".format) + " → " + pooled[last].map("{:.3g}".format)
    table = pooled["change"].unstack("metric").reset_index()
    table.index = table["run_name"] + ": " + table["gate"]
    table.index.name = "run: gate"
    return table.drop(columns=["run_name", "gate"])


def _recorded_switches(frame: pd.DataFrame) -> str:
    """The attention settings of each run (the paper's open choices), as a markdown list."""
    lines = []
    for name, spec_json in frame.drop_duplicates("run_id")[["run_name", "spec_json"]].itertuples(index=False):
        model = json.loads(spec_json)["model"]
        attention = model["attention"]
        softmax = model["softmax_layers"]
        softmax_conv = f"; softmax short_conv={model['softmax_short_conv']}" if model.get("softmax_short_conv") else ""
        if softmax == "all":
            lines.append(f"- **{name}**: softmax attention in every layer (rotary={model['rotary']}){softmax_conv}")
            continue
        lines.append(
            f"- **{name}**: softmax_layers={softmax}; feature_map={attention['feature_map']} "
            f"{attention['feature_map_options'] or ''}; norm={attention['norm']} "
            f"{attention['norm_options'] or ''}; denominator={attention['denominator']}; "
            f"gate={attention['gate']} {attention['gate_options'] or ''}; "
            f"output_gate={attention['output_gate']}"
            + (f"; short_conv={attention['short_conv']}" if attention.get("short_conv") else "")
            + (softmax_conv if softmax != "none" else "")
        )
    return "\n".join(lines)
