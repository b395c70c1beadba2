"""Which plugin configurations the parametrized tests cover: every registered plugin with its
defaults, then each option that selects a different code path, one non-default value at a time.
A newly registered plugin (built-in or third-party) is picked up with no new test code."""

from __future__ import annotations

from variants import Registry
from variants.feature_maps import HEDGEHOG_FORMS, KEY_MAX_SCOPES, VARIANCE_PLACEMENTS
from variants.gates import AXES, INPUTS

MODE_SWITCHES = {
    "key_max": KEY_MAX_SCOPES,
    "variance_factor": VARIANCE_PLACEMENTS,
    "axis": AXES,
    "input": INPUTS,
    "per_head": (True, False),
    "affine": (True, False),
    "form": HEDGEHOG_FORMS,
}


def plugin_modes(registry: Registry, skip: tuple[str, ...] = ()) -> list[tuple[str, dict, str]]:
    """(name, options, case id) for each plugin's defaults and each non-default mode."""
    modes = []
    for name in registry.names():
        options = registry.options_of(name)
        modes.append((name, {}, name))
        for switch, values in MODE_SWITCHES.items():
            if switch in options and switch not in skip:
                modes += [(name, {switch: v}, f"{name}[{switch}={v}]") for v in values if v != options[switch]]
    return modes
