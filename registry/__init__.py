"""One registry type for everything the harness looks up by name.

Variants (feature maps, norms, gates), pipeline stages, data sources and attention
implementations are all `Registry` instances, so a name that is not there gets the same error
everywhere: what kind of thing was asked for, the closest registered name, every registered name,
and where third-party entries come from.

    KERNELS = Registry("attention implementation")
    KERNELS.register("chunked", chunked_gla)                    # an object
    KERNELS.register_lazy("triton", "kernels.gla:triton_gla")   # imported on first lookup

    @STAGES.register("probe")                                   # or as a decorator
    class ProbeStage(Stage): ...

The registry sits below every other package of the project and imports none of them.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "RegistryError", "load_object"]


#: marks "no default given" for `Registry.get`
_REQUIRED = object()


class RegistryError(ValueError):
    """A name, option or entry that a registry cannot resolve (a ValueError: bad input)."""


def load_object(target: str) -> Any:
    """The object named by "package.module:attribute" (attribute may be dotted)."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise RegistryError(f"a lazy registry entry must look like 'package.module:object'; got {target!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Mapping[str, T], Generic[T]):
    """Names to objects (classes, functions, instances) for one kind of thing.

    Args:
        kind: the human name used in messages ("feature map", "stage", "data source").
        entry_point_group: optional `importlib.metadata` group through which installed packages
            announce modules that register into this registry; they are imported on first lookup.
        hint: optional extra sentence for the unknown-name error (how to add an entry).

    A `Mapping`: `name in registry`, `registry[name]`, iteration (in registration order) and
    `len` work, and lazy entries are imported when first looked up.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None, *, hint: str = ""):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.hint = hint
        self._entries: dict[str, Any] = {}
        self._lazy: dict[str, str] = {}
        self._sources: dict[str, str] = {}
        self._entry_points_loaded = entry_point_group is None
        #: entry-point name -> why it failed to load
        self._broken: dict[str, str] = {}

    # -- registration -----------------------------------------------------------------------
    def register(self, name: str, obj: Any = None, /) -> Any:
        """Register `obj` under `name`; without `obj`, a decorator that registers what it wraps.

        Registering the very same object twice is harmless (a module imported twice); another
        object under a taken name is refused, naming what holds the name.
        """
        self._check_name(name)
        if obj is None:
            return lambda target: self._add(name, target)
        return self._add(name, obj)

    def register_lazy(self, name: str, target: str) -> None:
        """Register "package.module:object", imported only when `name` is first looked up (so
        heavy or optional dependencies stay unimported until they are needed)."""
        self._check_name(name)
        if name in self._entries or (name in self._lazy and self._lazy[name] != target):
            raise RegistryError(f"duplicate {self.kind} name {name!r}: already registered by {self._sources[name]}")
        self._lazy[name] = target
        self._sources[name] = target

    def unregister(self, name: str) -> None:
        """Remove an entry (for throwaway entries in tests and notebooks); unknown names raise."""
        self.get(name)
        self._entries.pop(name, None)
        self._lazy.pop(name, None)
        del self._sources[name]

    def _check_name(self, name: Any) -> None:
        if not isinstance(name, str) or not name or name != name.strip():
            raise RegistryError(f"{self.kind} name must be a non-empty string without spaces, got {name!r}")

    def _add(self, name: str, obj: Any) -> Any:
        if name in self._entries and self._entries[name] is not obj:
            raise RegistryError(
                f"duplicate {self.kind} name {name!r}: already registered by {self._sources[name]}; choose another name"
            )
        self._lazy.pop(name, None)
        self._entries[name] = obj
        self._sources[name] = describe(obj)
        self._on_register(name, obj)
        return obj

    def _on_register(self, name: str, obj: Any) -> None:
        """Hook for subclasses (e.g. to stamp the name on a plugin class)."""

    # -- lookup -----------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Import every module announced under this registry's entry-point group (once).

        A module that fails to import is recorded and warned about, not raised: it disables only
        the names it would have registered (looking one of those up names the broken entry point),
        so one broken third-party package does not stop everything that does not use it."""
        if self._entry_points_loaded:
            return
        # Set first: a module that lists the registry while it is imported must not recurse.
        self._entry_points_loaded = True
        for entry_point in metadata.entry_points(group=self.entry_point_group):
            try:
                entry_point.load()  # importing the module runs its registration decorators
            except Exception as exc:
                message = (
                    f"{self.kind} plugin entry point {entry_point.name!r} = {entry_point.value!r} "
                    f"(group '{self.entry_point_group}') failed to load: {type(exc).__name__}: {exc}"
                )
                if entry_point.name not in self._broken:
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                self._broken[entry_point.name] = message

    def get(self, name: str, default: Any = _REQUIRED) -> T:
        """The entry registered as `name` (a lazy one is imported now). An unknown name raises the
        did-you-mean error, unless a `default` is given (as `Mapping.get` returns it)."""
        self.load_entry_points()
        if name in self._entries:
            return self._entries[name]
        if name in self._lazy:
            target = self._lazy[name]
            try:
                obj = load_object(target)
            except (ImportError, AttributeError) as exc:
                raise RegistryError(f"{self.kind} {name!r} could not be loaded from {target!r}: {exc}") from exc
            self._lazy.pop(name)
            self._entries[name] = obj
            self._on_register(name, obj)
            return obj
        if default is not _REQUIRED:
            return default
        raise self.unknown(name)

    def unknown(self, name: Any) -> RegistryError:
        """The error for a name that is not registered: closest match, every name, how to add one."""
        known = list(self._sources)
        close = difflib.get_close_matches(str(name), known, n=1)
        suggestion = f" Did you mean {close[0]!r}?" if close else ""
        plural = self.kind if self.kind.endswith("s") else f"{self.kind}s"
        listing = ", ".join(sorted(known)) or "none"
        message = f"unknown {self.kind} {name!r}.{suggestion} Registered {plural}: {listing}."
        if self.entry_point_group:
            message += (
                f" Third-party plugins register through the entry-point group '{self.entry_point_group}'"
                " or `--plugin module.path`."
            )
        if self.hint:
            message += f" {self.hint}"
        if self._broken:
            message += " Plugin entry points that failed to load (one of them may provide it): " + "; ".join(
                self._broken.values()
            )
        return RegistryError(message)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self.load_entry_points()
        return name in self._sources

    def __iter__(self) -> Iterator[str]:
        self.load_entry_points()
        return iter(list(self._sources))

    def __len__(self) -> int:
        self.load_entry_points()
        return len(self._sources)

    def names(self, pattern: str | Iterable[str] = "*") -> list[str]:
        """Registered names matching a wildcard pattern (or any of several), sorted."""
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        return sorted(n for n in self if any(fnmatch.fnmatchcase(n, p) for p in patterns))

    def source_of(self, name: str) -> str:
        """Where an entry comes from: "module.Qualname", or the lazy target."""
        if name not in self:
            raise self.unknown(name)
        return self._sources[name]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind!r}, {len(self._sources)} entries)"


def describe(obj: Any) -> str:
    """ "module.Qualname" of a class or function, or of an instance's class."""
    named = isinstance(obj, type) or (callable(obj) and hasattr(obj, "__qualname__"))
    target: Callable | type = obj if named else type(obj)
    return f"{target.__module__}.{target.__qualname__}"
