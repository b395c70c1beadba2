"""The plugin registry: lookup, wildcard listing, and errors that say what is allowed."""

from __future__ import annotations

import pytest
from torch import nn

from variants import FEATURE_MAPS, GATES, NORMS, REGISTRIES, FeatureMap, Registry, RegistryError, import_plugin_modules


def test_one_registry_per_axis_with_its_entry_point_group():
    assert REGISTRIES == {"feature_map": FEATURE_MAPS, "norm": NORMS, "gate": GATES}
    assert FEATURE_MAPS.entry_point_group == "regla.feature_maps"
    assert NORMS.entry_point_group == "regla.norms"
    assert GATES.entry_point_group == "regla.gates"


def test_the_built_ins_of_the_paper_are_registered():
    assert {"identity", "relu", "elu_plus_one", "hedgehog", "safe_exp"} <= set(FEATURE_MAPS.names())
    assert {"none", "denominator", "rmsnorm", "layernorm", "groupnorm"} <= set(NORMS.names())
    assert {"none", "scalar", "fast_decay", "gla", "refined"} <= set(GATES.names())


def test_wildcard_listing():
    assert FEATURE_MAPS.names("*exp*") == ["exp", "safe_exp"]
    assert FEATURE_MAPS.names("safe*") == ["safe_exp"]
    assert FEATURE_MAPS.names("elu*") == ["elu_plus_one"]
    assert NORMS.names("*norm") == ["groupnorm", "layernorm", "rmsnorm"]
    # Several patterns: the union, sorted, each name once.
    assert GATES.names(["fast*", "*decay", "none"]) == ["fast_decay", "fixed_decay", "none"]
    assert FEATURE_MAPS.names("no_such_*") == []
    assert FEATURE_MAPS.names() == sorted(FEATURE_MAPS.names())


def test_every_plugin_carries_its_name_version_and_source():
    for registry in REGISTRIES.values():
        for name in registry.names():
            cls = registry.get(name)
            assert cls.registry_name == name
            assert registry.version_of(name) == cls.version
            assert isinstance(cls.version, (int, str))
            assert registry.source_of(name).endswith(cls.__qualname__)
            assert name in registry


@pytest.mark.parametrize(
    "axis, registry, typo, suggestion",
    [
        ("feature map", FEATURE_MAPS, "safe_exq", "safe_exp"),
        ("norm", NORMS, "rmsnrom", "rmsnorm"),
        ("gate", GATES, "refine", "refined"),
    ],
)
def test_unknown_name_names_the_axis_suggests_and_lists(axis, registry, typo, suggestion):
    with pytest.raises(RegistryError) as info:
        registry.get(typo)
    message = str(info.value)
    assert f"unknown {axis} {typo!r}" in message
    assert f"Did you mean {suggestion!r}?" in message
    for name in registry.names():
        assert name in message
    assert registry.entry_point_group in message
    with pytest.raises(RegistryError, match=f"unknown {axis}"):
        registry.create(typo, 8, 2)


def test_unknown_name_without_a_close_match_still_lists_what_exists():
    with pytest.raises(RegistryError) as info:
        NORMS.get("zzzzzzzz")
    message = str(info.value)
    assert "Did you mean" not in message
    assert "Registered norms: " + ", ".join(NORMS.names()) in message


def test_duplicate_registration_is_refused():
    registry: Registry[nn.Module] = Registry("widget", "example.widgets")

    @registry.register("alpha")
    class Alpha(nn.Module):
        pass

    with pytest.raises(RegistryError) as info:

        @registry.register("alpha")
        class OtherAlpha(nn.Module):
            pass

    message = str(info.value)
    assert "duplicate widget name 'alpha'" in message
    assert f"{Alpha.__module__}.{Alpha.__qualname__}" in message
    assert registry.get("alpha") is Alpha
    # Re-registering the very same class (a module imported twice) is harmless.
    registry.register("alpha")(Alpha)
    assert registry.names() == ["alpha"]


def test_duplicate_of_a_built_in_is_refused_and_leaves_the_built_in():
    builtin = FEATURE_MAPS.get("relu")
    with pytest.raises(RegistryError, match="duplicate feature map name 'relu'"):

        @FEATURE_MAPS.register("relu")
        class MyRelu(FeatureMap):
            pass

    assert FEATURE_MAPS.get("relu") is builtin


@pytest.mark.parametrize("bad_name", ["", " padded ", 3])
def test_plugin_names_must_be_plain_strings(bad_name):
    with pytest.raises(RegistryError, match="name must be a non-empty string"):
        Registry("widget", "example.widgets").register(bad_name)


def test_unknown_option_lists_the_allowed_options_with_defaults():
    with pytest.raises(RegistryError) as info:
        FEATURE_MAPS.create("safe_exp", 8, 2, key_maxx="running")
    message = str(info.value)
    assert "feature map 'safe_exp' got unknown option(s) key_maxx" in message
    assert "key_max='running'" in message
    assert "variance_factor='kernel'" in message
    assert "chunk_size=64" in message


def test_plugin_without_options_says_none_are_allowed():
    with pytest.raises(RegistryError) as info:
        NORMS.create("none", 8, 2, eps=1e-3)
    assert "allowed options (with defaults): none" in str(info.value)


def test_options_of_reports_keyword_options():
    assert GATES.options_of("refined")["log_clamp"] == -8.0
    assert set(GATES.options_of("refined")) >= {"axis", "input", "rank", "tau", "bias_init", "log_clamp"}
    assert FEATURE_MAPS.options_of("identity") == {}


def test_create_passes_options_through():
    safe_exp = FEATURE_MAPS.create("safe_exp", 8, 2, key_max="chunk", chunk_size=4)
    assert (safe_exp.key_max, safe_exp.chunk_size) == ("chunk", 4)


def test_import_plugin_modules_error_explains_what_a_plugin_module_must_be():
    with pytest.raises(RegistryError) as info:
        import_plugin_modules(["no_such_plugin_package.deep.module"])
    message = str(info.value)
    assert "could not import plugin module 'no_such_plugin_package.deep.module'" in message
    assert "@feature_map / @norm / @gate" in message
