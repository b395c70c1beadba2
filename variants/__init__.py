"""Interchangeable parts of a linear-attention layer, one registry per axis.

    from variants import feature_map, FeatureMap, FeatureOutput

    @feature_map("my_map", version=1)
    class MyMap(FeatureMap):
        ...

Third-party packages announce modules under the entry-point groups `regla.feature_maps`,
`regla.norms` and `regla.gates`; `import_plugin_modules` imports modules named by `--plugin`.
"""

from .base import FeatureMap, FeatureOutput, Gate, GateOutput, OutputNorm
from .feature_maps import FEATURE_MAPS, feature_map, variance_reduction_factor
from .gates import GATES, gate
from .norms import NORMS, norm
from .registry import Registry, RegistryError, import_plugin_modules

REGISTRIES = {"feature_map": FEATURE_MAPS, "norm": NORMS, "gate": GATES}

__all__ = [
    "FeatureMap",
    "FeatureOutput",
    "Gate",
    "GateOutput",
    "OutputNorm",
    "FEATURE_MAPS",
    "GATES",
    "NORMS",
    "REGISTRIES",
    "Registry",
    "RegistryError",
    "feature_map",
    "gate",
    "norm",
    "import_plugin_modules",
    "variance_reduction_factor",
]
