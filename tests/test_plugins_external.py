"""A user's plugin package works with zero edits to this repository.

A throwaway package is written to a temporary directory, installed offline with pip into a
target directory, and announced through the entry-point groups `regla.feature_maps` and
`regla.gates`; its plugins appear in the registries, build into a LanguageModel, and are picked
up by the repository's own parametrized tests. Modules named by `--plugin` / `plugins:` are
imported with `import_plugin_modules`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.config import AttentionConfig, ModelConfig
from harness.model import LanguageModel
from variants import FEATURE_MAPS, GATES, NORMS, RegistryError, import_plugin_modules

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "regla_user_plugins"


pytestmark = pytest.mark.usefixtures("single_thread")


FEATURE_MAP_MODULE = '''
"""phi(x) = relu(x)²: a user's feature map, registered by decorator on import."""
import torch.nn.functional as F

from variants import FeatureMap, FeatureOutput, feature_map


@feature_map("squared_relu_external", version=3)
class SquaredReLU(FeatureMap):
    positive_kernel = True

    def __init__(self, head_dim, num_heads, *, power: float = 2.0):
        super().__init__(head_dim, num_heads)
        self.power = power

    def forward(self, x, role, state=None):
        return FeatureOutput(F.relu(x) ** self.power)
'''

GATE_MODULE = '''
"""A per-head learnable constant decay: a user's gate."""
import torch
import torch.nn.functional as F

from variants import Gate, GateOutput, gate


@gate("learned_constant_external")
class LearnedConstant(Gate):
    def __init__(self, d_model, num_heads, key_dim, value_dim):
        super().__init__(d_model, num_heads, key_dim, value_dim)
        self.logit = torch.nn.Parameter(torch.full((num_heads, 1), 2.0))

    def forward(self, x, x_prev=None):
        B, T, _ = x.shape
        log_g = F.logsigmoid(self.logit).expand(B, T, self.num_heads, 1)
        return GateOutput(log_k=log_g, activations={"g": log_g.exp()}, preactivations={"g": self.logit})
'''

PYPROJECT = f'''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "regla-user-plugins"
version = "0.1.0"

[project.entry-points."regla.feature_maps"]
squared_relu = "{PACKAGE}.maps"

[project.entry-points."regla.gates"]
learned_constant = "{PACKAGE}.gates"

[tool.setuptools]
packages = ["{PACKAGE}"]
'''


@pytest.fixture
def isolated_registries(monkeypatch):
    """Plugins registered by a test leave the registries (and sys.modules) as they were."""
    for registry in (FEATURE_MAPS, NORMS, GATES):
        registry.load_entry_points()
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_lazy", dict(registry._lazy))
        monkeypatch.setattr(registry, "_sources", dict(registry._sources))
        # The registry reads entry points once; make it look again.
        monkeypatch.setattr(registry, "_entry_points_loaded", False)
        monkeypatch.setattr(registry, "_broken", {})
    modules_before = set(sys.modules)
    yield
    for name in set(sys.modules) - modules_before:
        del sys.modules[name]


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory) -> Path:
    """The throwaway package, installed with pip (offline, no build isolation) into a target dir."""
    root = tmp_path_factory.mktemp("user_plugins")
    source = root / "source"
    (source / PACKAGE).mkdir(parents=True)
    (source / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (source / PACKAGE / "__init__.py").write_text("")
    (source / PACKAGE / "maps.py").write_text(textwrap.dedent(FEATURE_MAP_MODULE))
    (source / PACKAGE / "gates.py").write_text(textwrap.dedent(GATE_MODULE))
    target = root / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--quiet",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(target.glob("regla_user_plugins-0.1.0.dist-info/entry_points.txt"))
    return target


def tiny_model(attention: AttentionConfig) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=29, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2.0, attention=attention)
    return LanguageModel(config).double()


def test_installed_package_plugins_appear_and_build_into_a_model(installed_package, isolated_registries, monkeypatch):
    assert "squared_relu_external" not in FEATURE_MAPS._entries
    monkeypatch.syspath_prepend(str(installed_package))

    assert "squared_relu_external" in FEATURE_MAPS.names()
    assert FEATURE_MAPS.names("*external*") == ["squared_relu_external"]
    assert "learned_constant_external" in GATES.names()
    assert FEATURE_MAPS.source_of("squared_relu_external") == f"{PACKAGE}.maps.SquaredReLU"
    assert FEATURE_MAPS.version_of("squared_relu_external") == 3
    assert FEATURE_MAPS.options_of("squared_relu_external") == {"power": 2.0}

    # Its positive kernel admits the denominator; its option goes through the config.
    attention = AttentionConfig(
        feature_map="squared_relu_external",
        feature_map_options={"power": 1.5},
        norm="denominator",
        gate="learned_constant_external",
    )
    model = tiny_model(attention)
    layer = model.linear_attention_layers()[0]
    assert type(layer.feature_map).__module__ == f"{PACKAGE}.maps" and layer.feature_map.power == 1.5
    idx = torch.randint(0, 29, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(layer.gate.logit.grad).all() and layer.gate.logit.grad.abs().sum() > 0

    # Unknown options of the user's plugin are reported like those of a built-in.
    with pytest.raises(RegistryError, match="unknown option.s. exponent; allowed options .with defaults.: power=2.0"):
        FEATURE_MAPS.create("squared_relu_external", 8, 2, exponent=2)


def test_parametrized_tests_pick_up_an_installed_plugin_with_no_new_test_code(installed_package):
    """The repository's plugin tests, run with the package importable, include its plugins."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(installed_package), str(REPO_ROOT)]), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "external",
            str(REPO_ROOT / "tests" / "test_variants.py"),
            str(REPO_ROOT / "tests" / "test_model.py"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    # feature map: contract, positive kernel, causal flag; gate: contract, causal/resume;
    # model: finite gradients, causality, gradcheck (for each of the two plugins).
    assert passed >= 11, summary
    assert "failed" not in summary and "skipped" not in summary, summary


def test_entry_point_from_a_dist_info_on_sys_path(tmp_path, isolated_registries, monkeypatch):
    """Without pip: a module plus a hand-written .dist-info with entry_points.txt on sys.path."""
    (tmp_path / "handmade_norm_plugin.py").write_text(
        textwrap.dedent('''
        from variants import OutputNorm, norm

        @norm("max_abs_external")
        class MaxAbs(OutputNorm):
            """o / max |o| per head: a user's norm."""
            def __init__(self, head_dim, num_heads):
                super().__init__(head_dim, num_heads)

            def forward(self, o):
                return o / o.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    ''')
    )
    dist_info = tmp_path / "handmade_norm_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: handmade-norm-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[regla.norms]\nmax_abs = handmade_norm_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    assert NORMS.names("max_abs*") == ["max_abs_external"]
    model = tiny_model(AttentionConfig(feature_map="safe_exp", norm="max_abs_external", gate="refined"))
    logits, _ = model(torch.randint(0, 29, (1, 7)))
    assert torch.isfinite(logits).all()


def test_broken_entry_point_is_reported_by_name_every_time(tmp_path, isolated_registries, monkeypatch):
    dist_info = tmp_path / "broken_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[regla.gates]\nbroken = module_that_does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # Everything that does not need the broken package still works, with a warning...
    with pytest.warns(RuntimeWarning, match="gate plugin entry point 'broken'"):
        assert "refined" in GATES.names()
    assert GATES.get("gla") is not None
    # ...and a name it might have provided fails, naming the broken entry point, every time.
    for _ in range(2):
        with pytest.raises(RegistryError) as info:
            GATES.get("gate_from_the_broken_package")
        message = str(info.value)
        assert "unknown gate 'gate_from_the_broken_package'" in message
        assert "gate plugin entry point 'broken' = 'module_that_does_not_exist_anywhere'" in message
        assert "(group 'regla.gates') failed to load: ModuleNotFoundError" in message


def test_import_plugin_modules_registers_a_module_from_a_path(tmp_path, isolated_registries, monkeypatch):
    (tmp_path / "my_lab_feature_maps.py").write_text(
        textwrap.dedent('''
        import torch
        from variants import FeatureMap, FeatureOutput, feature_map

        @feature_map("softplus_external")
        class Softplus(FeatureMap):
            """phi(x) = softplus(x): positive, smooth."""
            positive_kernel = True

            def __init__(self, head_dim, num_heads):
                super().__init__(head_dim, num_heads)

            def forward(self, x, role, state=None):
                return FeatureOutput(torch.nn.functional.softplus(x))
    ''')
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "softplus_external" not in FEATURE_MAPS.names()
    import_plugin_modules(["my_lab_feature_maps"])
    assert FEATURE_MAPS.names("softplus*") == ["softplus_external"]
    model = tiny_model(AttentionConfig(feature_map="softplus_external", norm="rmsnorm", gate="gla", denominator=True))
    logits, _ = model(torch.randint(0, 29, (2, 9)))
    assert logits.shape == (2, 9, 29) and torch.isfinite(logits).all()
    # Importing again is harmless: the module is cached, nothing registers twice.
    import_plugin_modules(["my_lab_feature_maps"])
