"""The project's imports flow one way: every module imports only modules of its own layer or of
a layer below it, and no set of modules imports itself in a circle.

`LAYERS` is the architecture, bottom first; a new module belongs to the layer of its package
(the longest matching prefix). Imports inside function bodies count the same as top-level ones,
so a loop cannot be hidden by moving an import into a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("registry", "kernels", "variants", "harness")
SCRIPTS = ("run_ablations.py", "benchmarks")

#: Bottom first. A module may import from its own layer and the layers below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("registry",),  # the generic name -> object registry, imports nothing of the project
    ("kernels",),  # attention ops: torch references, Triton kernels, dispatch, fusion descriptions
    ("variants",),  # feature maps, norms, gates (use kernels' safe-exp shifts and fusion descriptions)
    # leaf utilities
    ("harness.atomic", "harness.measure", "harness.distributed", "harness.progress", "harness.tracking"),
    ("harness.data",),  # corpora, tokenizers, token cache, batching
    ("harness.tasks",),  # lm-eval task files (the offline suite reads the data layer)
    ("harness.config",),  # every config dataclass (eval settings name the tasks)
    ("harness.short_conv", "harness.layers", "harness.decoding", "harness.model", "harness.checkpoint_io"),  # the model
    ("harness.postlin",),  # a pretrained model converted to linear attention (post-linearization)
    ("harness.spec",),  # RunSpec and its ids (checks plugin and data names)
    ("harness.captured_step", "harness.train", "harness.lm_eval_model", "harness.evaluate"),  # what stages run
    ("harness.stages",),  # the stage package and its registry
    ("harness.grid", "harness.results"),  # grid files -> specs; rows -> Parquet
    ("harness.runner", "harness.report"),
    ("harness.executor",),  # parallel workers over the runner
    ("harness.cluster",),  # the same workers as a submitit job array
    ("harness.hf",),  # the transformers export of the model and its checkpoints
    ("harness.cli", "harness.lm_eval"),
    ("run_ablations", "benchmarks"),  # entry points
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    files += [ROOT / "run_ablations.py", *(ROOT / "benchmarks").glob("*.py")]
    return {module_name(p): p for p in files}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that module `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from package import name` imports the submodule `package.name` when there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            # The deepest project module the dotted name lies in (`kernels.fusion.X` -> kernels.fusion).
            parts = target.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in known:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


#: Package roots whose __init__ only holds a docstring: below everything, importing nothing.
EMPTY_PACKAGES = ("harness",)


def layer_of(name: str) -> int:
    if name in EMPTY_PACKAGES:
        return -1
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"module {name} belongs to no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# A package's __init__ imports its own modules to re-export them; those modules importing each
# other through the package (`from . import x`) is the same edge, not a loop through __init__.
def without_own_package(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {
        name: {t for t in targets if not name.startswith(t + ".")}  # a module importing its parent package
        for name, targets in graph.items()
    }


def test_every_module_belongs_to_a_layer():
    for name in project_modules():
        layer_of(name)
    graph = import_graph()
    assert all(not graph[name] for name in EMPTY_PACKAGES)


def test_no_import_goes_up_a_layer():
    upward = [
        f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
        for name, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(name)
    ]
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_loop():
    loops = cycles(without_own_package(import_graph()))
    assert not loops, "import loops:\n" + "\n".join(" <-> ".join(loop) for loop in loops)


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set(), "c": {"b"}}, []),
    ],
)
def test_the_loop_finder_finds_loops(graph, expected):
    assert cycles(graph) == expected


def test_the_graph_sees_imports_inside_functions_and_relative_imports(tmp_path):
    module = tmp_path / "mod.py"
    module.write_text("from .sibling import x\n\ndef f():\n    from ..other import y\n    import kernels.fusion\n")
    known = {"pkg.sub.sibling", "pkg.other", "kernels", "kernels.fusion"}
    assert imported_modules("pkg.sub.mod", module, known) == {"pkg.sub.sibling", "pkg.other", "kernels.fusion"}


def test_an_upward_import_is_reported():
    # harness.spec sits below the stages: a spec module reaching for STAGES would be reported.
    assert layer_of("harness.stages.scoring") > layer_of("harness.spec")
    assert layer_of("harness.stages") > layer_of("harness.train")
    assert layer_of("kernels.fusion") < layer_of("variants.gates")
