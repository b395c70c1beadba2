"""Frozen, strictly-loaded configuration dataclasses for models (and the helpers every spec uses).

`from_dict` builds a (nested) dataclass from plain data and refuses unknown keys, naming the key,
where it was found and what is allowed — a typo in a grid file must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
    #: "auto": on CUDA the fused ReGLA op for safe_exp + refined (kernels.triton_regla), else the
    #: Triton GLA kernel; the torch chunked form on CPU. Or a name from kernels.IMPLEMENTATIONS,
    #: which always takes the composed path (feature map, gate, then that kernel).
    impl: str = "auto"

    def __post_init__(self) -> None:
        _choice("attention.output_gate", self.output_gate, ("none", "swish"))
        for name in ("feature_map_options", "norm_options", "gate_options"):
            if not isinstance(getattr(self, name), Mapping):
                raise ConfigError(f"attention.{name} must be a mapping of option names to values")


HYBRID_PATTERNS = ("none", "all", "even", "odd", "first_half", "last_half")


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
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        _choice("model.mlp", self.mlp, ("swiglu", "gelu"))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if name == "vocab_size" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer; got {value!r}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads "
                f"({self.n_heads}), or set model.head_dim explicitly"
            )
        if isinstance(self.attention, Mapping):
            object.__setattr__(self, "attention", from_dict(AttentionConfig, self.attention, "model.attention"))
        if isinstance(self.softmax_layers, list):
            object.__setattr__(self, "softmax_layers", tuple(self.softmax_layers))
        self.softmax_layer_indices()  # validate now, not at model build time

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def softmax_layer_indices(self) -> tuple[int, ...]:
        n = self.n_layers
        pattern = self.softmax_layers
        if isinstance(pattern, str):
            _choice("model.softmax_layers", pattern, HYBRID_PATTERNS)
            return {
                "none": (),
                "all": tuple(range(n)),
                "even": tuple(range(0, n, 2)),
                "odd": tuple(range(1, n, 2)),
                "first_half": tuple(range(n // 2)),
                "last_half": tuple(range(n - n // 2, n)),
            }[pattern]
        indices = tuple(pattern)
        bad = [i for i in indices if not isinstance(i, int) or not -n <= i < n]
        if bad:
            raise ConfigError(
                f"model.softmax_layers: indices {bad} out of range for {n} layers "
                f"(allowed 0..{n - 1}, or one of {', '.join(HYBRID_PATTERNS)})"
            )
        return tuple(sorted({i % n for i in indices}))
