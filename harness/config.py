"""Frozen, strictly-loaded configuration dataclasses: the model (and its attention), data, training,
and each stage's settings (eval, probe, profile), with the helpers every spec uses.

`from_dict` builds a (nested) dataclass from plain data and refuses unknown keys, naming the key,
where it was found and what is allowed — a typo in a grid file must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .tasks import KNOWN_TASKS, PERPLEXITY_TASKS, SUITES


class ConfigError(ValueError):
    """A configuration value or key the harness cannot accept."""


def _dataclass_type(annotation: Any) -> type | None:
    """The dataclass inside `X` or `X | None`, if any."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """Strictly build dataclass `cls` from `data` (nested dataclasses recurse)."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown key {key!r} in {where or cls.__name__}{hint}; allowed keys: {', '.join(sorted(fields))}"
            )
        nested = _dataclass_type(hints[key])
        if nested is not None and isinstance(value, Mapping):
            value = from_dict(nested, value, f"{where}.{key}" if where else key)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain JSON-able data, tuples as lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def require_positive_ints(section: str, settings: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{section}.{name} must be a positive integer; got {value!r}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass(frozen=True)
class AttentionConfig:
    """How a linear-attention layer is assembled from the three registries (+ switches)."""

    feature_map: str = "identity"
    feature_map_options: dict = field(default_factory=dict)
    norm: str = "rmsnorm"
    norm_options: dict = field(default_factory=dict)
    gate: str = "gla"
    gate_options: dict = field(default_factory=dict)
    #: divide by phi(q)·z_t as well (classic linear attention), combinable with any norm
    denominator: bool = False
    denominator_eps: float = 1e-6
    #: fla GLA's swish output gate before the output projection
    output_gate: str = "none"
    #: "auto": on CUDA the fused ReGLA op for safe_exp with the refined or GLA's sigmoid gate
    #: (kernels.triton_regla), else the Triton GLA kernel; the torch chunked form on CPU. Or a name
    #: from kernels.IMPLEMENTATIONS, which always takes the composed path (feature map, gate, then
    #: that kernel).
    impl: str = "auto"
    #: where the fused op runs: apply a per-head RMSNorm (and the swish output gate) in the op's
    #: output kernel instead of as separate passes (kernels.blocks.norm_epilogue). The same math
    #: (tests/test_norm_epilogue.py) at less time and memory (BENCHMARKS.md §2: ReGLA then trains
    #: as fast as GLA from T = 1024 on); false keeps the passes, for comparing the two paths.
    fused_epilogue: bool = True
    #: where a per-head output norm's eps lives when the feature map shifts its exponent
    #: (safe_exp): "unshifted", the frame without the shifts, so they cancel exactly and every
    #: key-max scope gives the same output; or "shifted", eps on the shifted output as a plain
    #: RMSNorm applies it (what fla's norm gives; the shifts then leak through eps)
    norm_eps_frame: str = "unshifted"
    #: rotary positions on q and k before the feature map (the model's rotary_base), as a softmax
    #: layer has them: a layer converted from a pretrained model keeps them (model.init)
    rotary: bool = False
    #: width of a causal depthwise convolution (then SiLU) over q, k and v before the feature map,
    #: as fla's GLA `use_short_conv` (width 4 there) and Zoology's mixers have it; 0: none (the
    #: paper's layer). Recorded with every run: it changes what a layer can learn (harness.short_conv)
    short_conv: int = 0

    def __post_init__(self) -> None:
        _choice("attention.output_gate", self.output_gate, ("none", "swish"))
        check_conv_width("attention.short_conv", self.short_conv)
        _choice("attention.norm_eps_frame", self.norm_eps_frame, ("unshifted", "shifted"))
        if not isinstance(self.fused_epilogue, bool):
            raise ConfigError(f"attention.fused_epilogue must be true or false; got {self.fused_epilogue!r}")
        for name in ("feature_map_options", "norm_options", "gate_options"):
            if not isinstance(getattr(self, name), Mapping):
                raise ConfigError(f"attention.{name} must be a mapping of option names to values")


def check_conv_width(where: str, width: object) -> None:
    """A short convolution's width: 0 (none) or an int of at least 2."""
    if isinstance(width, bool) or not isinstance(width, int) or not (width == 0 or width >= 2):
        raise ConfigError(f"{where} is a convolution width in tokens, 0 (none) or at least 2; got {width!r}")


HYBRID_PATTERNS = ("none", "all", "even", "odd", "first_half", "last_half")


def layer_indices(pattern: str | tuple | list, n: int, where: str = "model.softmax_layers") -> tuple[int, ...]:
    """The layers a hybrid pattern names among `n` layers: a name from HYBRID_PATTERNS or a list
    of indices (negative ones count from the end), sorted and without repeats."""
    if isinstance(pattern, str):
        _choice(where, pattern, HYBRID_PATTERNS)
        return {
            "none": (),
            "all": tuple(range(n)),
            "even": tuple(range(0, n, 2)),
            "odd": tuple(range(1, n, 2)),
            "first_half": tuple(range(n // 2)),
            "last_half": tuple(range(n - n // 2, n)),
        }[pattern]
    if not isinstance(pattern, (list, tuple)):
        raise ConfigError(f"{where} must be one of {', '.join(HYBRID_PATTERNS)} or a list of layer indices")
    bad = [i for i in pattern if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n]
    if bad:
        raise ConfigError(
            f"{where}: indices {bad} out of range for {n} layers "
            f"(allowed 0..{n - 1}, or one of {', '.join(HYBRID_PATTERNS)})"
        )
    return tuple(sorted({i % n for i in pattern}))


@dataclass(frozen=True)
class InitConfig:
    """Post-linearization: start from a pretrained causal LM instead of a random init, with its
    attention layers converted to the run's `model.attention` (except `model.softmax_layers`).

    `from_pretrained`: a Hugging Face hub name (GPT-NeoX/Pythia, GPT-2, Llama), a local directory
    (a transformers checkpoint or a harness one), or `run:<run name>`: the trained model of another
    run of the same grid, which then runs first.
    """

    from_pretrained: str = ""
    #: for the first N steps only the parameters the conversion adds (gates, norms) learn
    train_only_new_for_steps: int = 0
    #: the hub revision (branch, tag or commit) of a hub model
    revision: str | None = None
    #: what the source is, set when the grid loads (never by hand): the source run's id, a local
    #: checkpoint's content digest, or the hub name and revision. Part of the run id.
    source_id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.from_pretrained, str) or not self.from_pretrained.strip():
            raise ConfigError(
                "model.init.from_pretrained must name the pretrained model: a hub name, a local directory, "
                "or run:<run name> for another run of the grid"
            )
        steps = self.train_only_new_for_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"model.init.train_only_new_for_steps must be an integer >= 0; got {steps!r}")

    @property
    def source_run(self) -> str | None:
        """The run name of a `run:<name>` source, else None."""
        return self.from_pretrained.removeprefix("run:") if self.from_pretrained.startswith("run:") else None


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only language model; each layer is softmax or linear attention."""

    #: None: taken from the tokenizer when the model is built for training
    vocab_size: int | None = None
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int | None = None
    mlp: str = "swiglu"
    mlp_ratio: float = 4.0
    max_seq_len: int = 256
    #: which layers keep softmax attention: a pattern name or a list of layer indices
    softmax_layers: str | tuple[int, ...] | list = "none"
    rotary: bool = True
    rotary_base: float = 10000.0
    #: width of a short causal convolution over the softmax layers' q, k and v (as
    #: `attention.short_conv` for the linear layers); 0: none, as in the paper's softmax layers
    softmax_short_conv: int = 0
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    #: start from a pretrained model (post-linearization); None: a random init
    init: InitConfig | None = None

    def __post_init__(self) -> None:
        _choice("model.mlp", self.mlp, ("swiglu", "gelu"))
        # vocab_size None: taken from the tokenizer when the model is built
        sized = ("d_model", "n_layers", "n_heads", "max_seq_len")
        require_positive_ints("model", self, sized if self.vocab_size is None else ("vocab_size", *sized))
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads "
                f"({self.n_heads}), or set model.head_dim explicitly"
            )
        if isinstance(self.attention, Mapping):
            object.__setattr__(self, "attention", from_dict(AttentionConfig, self.attention, "model.attention"))
        if isinstance(self.init, Mapping):
            object.__setattr__(self, "init", from_dict(InitConfig, self.init, "model.init"))
        if isinstance(self.softmax_layers, list):
            object.__setattr__(self, "softmax_layers", tuple(self.softmax_layers))
        self.softmax_layer_indices()  # validate now, not at model build time
        check_conv_width("model.softmax_short_conv", self.softmax_short_conv)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def softmax_layer_indices(self) -> tuple[int, ...]:
        return layer_indices(self.softmax_layers, self.n_layers)


#: How training rows are cut from the token stream: "windows" (random windows of seq_len tokens,
#: crossing documents freely) or "documents" (the same windows, attention restarting at every
#: document boundary inside them: the model gets the documents' cu_seqlens).
PACKINGS = ("windows", "documents")


@dataclass(frozen=True)
class DataConfig:
    """Which corpus and tokenizer; `options` go to the source (e.g. data_dir, glob); `packing`
    one of PACKINGS (training batches only: evaluation keeps windows, comparable across runs)."""

    source: str = "offline-english"
    tokenizer: str = "bpe-4096"
    options: dict = field(default_factory=dict)
    packing: str = "windows"

    def __post_init__(self):
        _choice("data.packing", self.packing, PACKINGS)


@dataclass(frozen=True)
class TrainConfig:
    """nanoGPT-style training: AdamW, linear warm-up then cosine decay, clipping, accumulation."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 50
    seed: int = 0
    #: "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    precision: str = "auto"
    #: replay each training step from a CUDA graph (one process on CUDA, windows packing): no host
    #: time between the step's kernels, for models small enough that launching them is the limit
    #: (harness.captured_step)
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        names = ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "log_every")
        require_positive_ints("train", self, (*names, "checkpoint_every"))
        if not isinstance(self.cuda_graph, bool):
            raise ConfigError(f"train.cuda_graph must be true or false; got {self.cuda_graph!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be one of auto, fp32, bf16; got {self.precision!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"train.warmup_steps must be between 0 and train.steps ({self.steps}); got {self.warmup_steps}"
            )
        # The ranges the optimizer and the schedule need (NaN fails every comparison).
        checks = (
            ("lr", lambda v: 0 < v < math.inf, "a positive number"),
            ("min_lr_ratio", lambda v: 0 <= v <= 1, "between 0 and 1"),
            ("weight_decay", lambda v: 0 <= v < math.inf, "a number >= 0"),
            ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("grad_clip", lambda v: 0 < v < math.inf, "a positive number"),
        )
        for name, inside, allowed in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not inside(value):
                raise ConfigError(f"train.{name} must be {allowed}; got {value!r}")


@dataclass(frozen=True)
class EvalConfig:
    """What to score. `tasks` takes task names and suite names (table5, paper, offline).

    `data_dir`: local data, laid out as `<data_dir>/<dataset>/<split>.jsonl` for the paper's tasks
    (see harness.tasks.data_layout) and/or a built offline suite (harness.tasks.build_offline_suite).
    """

    tasks: tuple[str, ...] = ("offline",)
    num_fewshot: tuple[int, ...] = (0,)
    limit: int | None = None
    batch_size: int = 8
    data_dir: str | None = None
    seed: int = 1234
    #: >0 gives stderr columns (closed form for means, resampling for perplexities)
    bootstrap_iters: int = 100
    #: keep lm-eval's per-sample log in its results JSON (written beside the stage's rows)
    log_samples: bool = False

    def __post_init__(self) -> None:
        for name in ("tasks", "num_fewshot"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, int)) else tuple(value))
        unknown = [t for t in self.tasks if t not in KNOWN_TASKS and t not in SUITES]
        for task in unknown:
            close = difflib.get_close_matches(task, [*KNOWN_TASKS, *SUITES], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown evaluation task {task!r}{hint}; known tasks: {', '.join(KNOWN_TASKS)}; "
                f"suites: {', '.join(SUITES)}"
            )
        if not self.tasks:
            raise ValueError("EvalConfig.tasks is empty")
        if not self.num_fewshot or any(not isinstance(n, int) or n < 0 for n in self.num_fewshot):
            raise ValueError(f"EvalConfig.num_fewshot must be non-negative integers, got {self.num_fewshot!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EvalConfig.limit must be a positive integer or None, got {self.limit!r}")
        if self.batch_size < 1:
            raise ValueError(f"EvalConfig.batch_size must be >= 1, got {self.batch_size!r}")

    def resolved_tasks(self) -> tuple[str, ...]:
        """Task names with suites expanded, in order, without repeats."""
        names = (n for t in self.tasks for n in SUITES.get(t, (t,)))
        return tuple(dict.fromkeys(names))

    def shots_for(self, task: str) -> tuple[int, ...]:
        return (0,) if task in PERPLEXITY_TASKS else self.num_fewshot


@dataclass(frozen=True)
class ProbeConfig:
    batches: int = 2
    batch_size: int = 8
    bins: int = 40
    saturation_eps: float = 0.01


@dataclass(frozen=True)
class ProfileConfig:
    seq_lens: list = field(default_factory=lambda: [128, 256, 512])
    batch_size: int = 4
    generation_lengths: list = field(default_factory=lambda: [64, 128, 256])
    prompt_length: int = 5
    warmup: int = 2
    repeats: int = 5
    #: generation on CUDA: the decode step captured as CUDA graphs over static buffers (the
    #: model's default), or false for the plain loop over the growing state. A setting, so that
    #: the stage id (and with it every profile row) says which one was timed.
    cuda_graphs: bool = True
    #: on CUDA, also the training loop's step with `train.cuda_graph` (harness.captured_step):
    #: replayed from a CUDA graph, the host's launch time taken out of it. Its own rows
    #: (`profile/train_graph_*`); off by default, so that existing stage ids stay as they were.
    train_cuda_graph: bool = False

    def __post_init__(self):
        for name in ("cuda_graphs", "train_cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"profile.{name} must be true or false; got {getattr(self, name)!r}")


#: Stages that train a model of their own from the run's architecture: their settings belong to the
#: run's identity (harness.spec), where other stages' settings only name their own results.
STAGES_THAT_TRAIN_THEIR_OWN_MODEL = ("mqar",)


@dataclass(frozen=True)
class MQARConfig:
    """Trained multi-query associative recall (Zoology, Arora et al. 2024): a fresh model of the
    run's architecture learns to recall the value of each queried key; accuracy per setting.

    `settings`: [sequence length, key-value pairs] each; keys and values come from disjoint
    halves of a `vocab_size` vocabulary; queries follow the pairs at power-law distributed gaps
    (`power_a`, as Zoology's). Training stops early once held-out accuracy reaches `target`.
    `seed` (model init, training and held-out sequences): None takes the run's `train.seed`, so a
    grid's seeds axis (`scales: {seeds: N}`) gives each seed its own model and data.
    """

    settings: list = field(default_factory=lambda: [[64, 4], [128, 8], [256, 16]])
    vocab_size: int = 256
    steps: int = 400
    batch_size: int = 32
    # 1e-3: at 3e-3 and 1e-2 a 2-layer softmax model (d 64, vocab 256, 64 tokens, 4 pairs) stayed at
    # 0.25 accuracy for 1000-2500 steps (a value from the context, the right one of four by chance); at
    # 1e-3 it formed its recall circuit by step 500 and reached 0.93 by 1100. Zoology sweeps the lr
    # per architecture; a grid can too (`mqar.lr` as an axis: mqar's settings are part of a run's
    # identity, STAGES_THAT_TRAIN_THEIR_OWN_MODEL).
    lr: float = 1e-3
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_batch_size: int = 64
    target: float = 0.99
    power_a: float = 0.01
    seed: int | None = None

    def __post_init__(self) -> None:
        require_positive_ints("mqar", self, ("vocab_size", "steps", "batch_size", "eval_every", "eval_batch_size"))
        if not self.settings:
            raise ConfigError("mqar.settings needs at least one [sequence length, pairs]")
        for setting in self.settings:
            if not (
                isinstance(setting, (list, tuple)) and len(setting) == 2 and all(isinstance(x, int) for x in setting)
            ):
                raise ConfigError(f"mqar.settings entries are [sequence length, pairs]; got {setting!r}")
            length, pairs = setting
            if pairs < 1 or length < 4 * pairs:
                raise ConfigError(
                    f"mqar.settings {setting}: needs pairs >= 1 and length >= 4 x pairs (room for the pairs and "
                    "a query for each)"
                )
            if 2 * pairs > self.vocab_size // 2:
                raise ConfigError(f"mqar.settings {setting}: {pairs} pairs need vocab_size >= {4 * pairs}")
        if not 0 < self.target <= 1:
            raise ConfigError(f"mqar.target must be in (0, 1]; got {self.target!r}")
