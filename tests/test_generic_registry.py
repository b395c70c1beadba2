"""The one registry type behind variants, stages, data sources and attention implementations:
lookup, lazy "module:object" entries, and the same did-you-mean error everywhere."""

from __future__ import annotations

import pytest

import kernels
from harness.data.sources import SOURCES
from harness.stages import STAGES, Stage
from registry import Registry, RegistryError, load_object
from variants import FEATURE_MAPS, GATES, NORMS


def test_register_get_and_mapping_behaviour():
    widgets: Registry[int] = Registry("widget")
    widgets.register("one", 1)

    @widgets.register("double")
    def double(x):
        return 2 * x

    assert widgets["one"] == 1 and widgets.get("double") is double
    assert list(widgets) == ["one", "double"] and len(widgets) == 2 and "one" in widgets
    assert dict(widgets.items()) == {"one": 1, "double": double}
    assert widgets.get("three", None) is None  # Mapping.get with a default does not raise
    assert widgets.names("d*") == ["double"]
    widgets.register("one", 1)  # the same object again: harmless
    with pytest.raises(RegistryError, match="duplicate widget name 'one'"):
        widgets.register("one", 2)
    widgets.unregister("one")
    assert "one" not in widgets


def test_lazy_entries_are_imported_on_first_lookup():
    widgets: Registry = Registry("widget")
    widgets.register_lazy("join", "os.path:join")
    assert "join" in widgets and widgets.source_of("join") == "os.path:join"
    import os.path

    assert widgets["join"] is os.path.join
    widgets.register_lazy("missing", "no_such_module_anywhere:thing")
    with pytest.raises(
        RegistryError, match="widget 'missing' could not be loaded from 'no_such_module_anywhere:thing'"
    ):
        widgets["missing"]
    with pytest.raises(RegistryError, match="must look like 'package.module:object'"):
        load_object("os.path.join")


@pytest.mark.parametrize(
    "registry, typo, suggestion, kind",
    [
        (FEATURE_MAPS, "safe_exq", "safe_exp", "feature map"),
        (NORMS, "rmsnrom", "rmsnorm", "norm"),
        (GATES, "refine", "refined", "gate"),
        (STAGES, "evaluate", "eval", "stage"),
        (SOURCES, "text-filez", "text-files", "data source"),
        (kernels.IMPLEMENTATIONS, "chunkd", "chunked", "attention implementation"),
    ],
)
def test_every_registry_gives_the_same_did_you_mean_error(registry, typo, suggestion, kind):
    with pytest.raises(RegistryError) as info:
        registry[typo]
    message = str(info.value)
    assert message.startswith(f"unknown {kind} {typo!r}. Did you mean {suggestion!r}?")
    assert f"Registered {kind}s: " + ", ".join(registry.names()) in message
    assert isinstance(info.value, ValueError)  # bad input: the CLI reports it, exit code 2


def test_the_harness_registries_hold_what_the_harness_uses():
    assert list(STAGES) == ["train", "eval", "probe", "profile", "mqar"]
    assert all(isinstance(STAGES[name], Stage) and STAGES[name].name == name for name in STAGES)
    assert {"offline-english", "text-files", "wikitext-103", "slimpajama"} <= set(SOURCES)
    assert {"recurrent", "chunked", "parallel"} <= set(kernels.IMPLEMENTATIONS)
    assert kernels.IMPLEMENTATIONS["chunked"] is kernels.chunked_gla


def test_an_implementation_registered_lazily_is_dispatched_to(monkeypatch):
    import torch

    monkeypatch.setattr(kernels.IMPLEMENTATIONS, "_lazy", dict(kernels.IMPLEMENTATIONS._lazy))
    kernels.register_implementation("recurrent_by_name", "kernels.reference:recurrent_gla")
    try:
        q = torch.randn(1, 5, 2, 4, dtype=torch.float64)
        out, _ = kernels.gated_linear_attention(q, q, q, impl="recurrent_by_name")
        expected, _ = kernels.gated_linear_attention(q, q, q, impl="recurrent")
        assert torch.equal(out, expected)
    finally:
        kernels.IMPLEMENTATIONS.unregister("recurrent_by_name")
