"""The variant registry, one instance per axis (feature map, norm, gate): the project's generic
`registry.Registry` plus plugin versions and keyword options.

Modelled on timm's model registry: register with a decorator, create by name, list with
wildcards. Third-party plugins arrive through Python entry points (one group per axis) or by
importing a module named on the command line / in a grid file; either way no file of this
repository needs editing.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from registry import Registry as BaseRegistry
from registry import RegistryError

T = TypeVar("T")

__all__ = ["Registry", "RegistryError", "import_plugin_modules"]


class Registry(BaseRegistry[T]):
    """Maps names to plugin classes for one axis, with versions and keyword options.

    `axis` is the human name used in errors ("feature map"); `entry_point_group` is the
    `importlib.metadata` group that third-party packages use to announce plugins.
    """

    def __init__(self, axis: str, entry_point_group: str):
        super().__init__(axis, entry_point_group)

    @property
    def axis(self) -> str:
        return self.kind

    # -- registration -------------------------------------------------------------------
    def register(self, name: str, *, version: int | str = 1) -> Callable[[type[T]], type[T]]:
        """Class decorator: `@registry.register("safe_exp", version=2)`.

        `version` enters every run id that uses the plugin: bump it when the plugin's math
        changes so that old results are invalidated on purpose.
        """
        self._check_name(name)

        def decorator(cls: type[T]) -> type[T]:
            # Checked before stamping, so a refused duplicate leaves the registered class as it was.
            if name in self._entries and self._entries[name] is not cls:
                self._add(name, cls)  # raises the duplicate-name error
            cls.registry_name = name  # type: ignore[attr-defined]
            cls.version = version  # type: ignore[attr-defined]
            return self._add(name, cls)

        return decorator

    # -- plugin metadata ----------------------------------------------------------------
    def version_of(self, name: str) -> int | str:
        return self.get(name).version  # type: ignore[attr-defined]

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
