"""A small generic plugin registry, one instance per axis (feature map, norm, gate).

Modelled on timm's model registry: register with a decorator, create by name, list with
wildcards. Third-party plugins arrive through Python entry points (one group per axis) or by
importing a module named on the command line / in a grid file; either way no file of this
repository needs editing.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """A plugin name or option that the registry cannot resolve."""


class Registry(Generic[T]):
    """Maps names to plugin classes for one axis.

    `axis` is the human name used in errors ("feature map"); `entry_point_group` is the
    `importlib.metadata` group that third-party packages use to announce plugins.
    """

    def __init__(self, axis: str, entry_point_group: str):
        self.axis = axis
        self.entry_point_group = entry_point_group
        self._plugins: dict[str, type[T]] = {}
        self._sources: dict[str, str] = {}
        self._entry_points_loaded = False

    # -- registration -------------------------------------------------------------------
    def register(self, name: str, *, version: int | str = 1) -> Callable[[type[T]], type[T]]:
        """Class decorator: `@registry.register("safe_exp", version=2)`.

        `version` enters every run id that uses the plugin: bump it when the plugin's math
        changes so that old results are invalidated on purpose.
        """
        if not isinstance(name, str) or not name or name != name.strip():
            raise RegistryError(f"{self.axis} name must be a non-empty string without spaces, got {name!r}")

        def decorator(cls: type[T]) -> type[T]:
            if name in self._plugins and self._plugins[name] is not cls:
                raise RegistryError(
                    f"duplicate {self.axis} name {name!r}: already registered by "
                    f"{self._sources[name]}; choose another name"
                )
            cls.registry_name = name  # type: ignore[attr-defined]
            cls.version = version  # type: ignore[attr-defined]
            self._plugins[name] = cls
            self._sources[name] = f"{cls.__module__}.{cls.__qualname__}"
            return cls

        return decorator

    def unregister(self, name: str) -> None:
        """Remove a plugin (for throwaway plugins in tests and notebooks); unknown names raise."""
        self.get(name)
        del self._plugins[name], self._sources[name]

    # -- lookup -------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Import every plugin module announced under this axis's entry-point group (once)."""
        if self._entry_points_loaded:
            return
        # Set first: a plugin module that lists the registry while it is imported must not recurse.
        self._entry_points_loaded = True
        for entry_point in metadata.entry_points(group=self.entry_point_group):
            try:
                # Loading the entry point imports its module, whose decorators register plugins.
                entry_point.load()
            except Exception as exc:
                # Retry (and fail the same way) on the next lookup instead of silently going on
                # without the broken package's plugins.
                self._entry_points_loaded = False
                raise RegistryError(
                    f"{self.axis} plugin entry point {entry_point.name!r} = {entry_point.value!r} "
                    f"(group '{self.entry_point_group}') failed to load: {type(exc).__name__}: {exc}"
                ) from exc

    def names(self, pattern: str | Iterable[str] = "*") -> list[str]:
        """Registered names matching a wildcard pattern (or any of several), sorted."""
        self.load_entry_points()
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        return sorted(n for n in self._plugins if any(fnmatch.fnmatchcase(n, p) for p in patterns))

    def get(self, name: str) -> type[T]:
        self.load_entry_points()
        if name not in self._plugins:
            known = sorted(self._plugins)
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RegistryError(
                f"unknown {self.axis} {name!r}.{hint} Registered {self.axis}s: {', '.join(known)}. "
                f"Third-party plugins register through the entry-point group "
                f"'{self.entry_point_group}' or `--plugin module.path`."
            )
        return self._plugins[name]

    def __contains__(self, name: object) -> bool:
        self.load_entry_points()
        return name in self._plugins

    def version_of(self, name: str) -> int | str:
        return self.get(name).version  # type: ignore[attr-defined]

    def source_of(self, name: str) -> str:
        self.get(name)
        return self._sources[name]

    def options_of(self, name: str) -> dict[str, Any]:
        """The keyword options a plugin accepts beyond the dimensions the harness passes."""
        return _keyword_options(self.get(name))

    def check_options(self, name: str, options: dict[str, Any]) -> None:
        """Raise if `options` has names plugin `name` does not accept, listing the allowed ones."""
        cls = self.get(name)
        allowed = _keyword_options(cls)
        accepts_any = any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values()
        )
        unknown = sorted(set(options) - set(allowed))
        if unknown and not accepts_any:
            allowed_text = ", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none"
            raise RegistryError(
                f"{self.axis} {name!r} got unknown option(s) {', '.join(unknown)}; "
                f"allowed options (with defaults): {allowed_text}"
            )

    def create(self, name: str, /, *args: Any, **options: Any) -> T:
        """Instantiate plugin `name`; unknown options raise an error listing the allowed ones."""
        self.check_options(name, options)
        return self.get(name)(*args, **options)

    def __repr__(self) -> str:
        return f"Registry({self.axis!r}, {len(self._plugins)} plugins)"


def _keyword_options(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def import_plugin_modules(modules: Iterable[str]) -> None:
    """Import user plugin modules (from `--plugin` or a grid's `plugins:` key)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise RegistryError(
                f"could not import plugin module {module!r}: {exc}. A plugin module must be "
                f"importable (installed, or on PYTHONPATH) and register its classes with the "
                f"@feature_map / @norm / @gate decorators from `variants`."
            ) from exc
