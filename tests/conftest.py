"""Test-session setup shared by all test files."""

import os

import torch

# Without CUDA, Triton kernels can only run under Triton's interpreter, and it must be switched on
# before any `triton.jit` decorator runs (i.e. before `kernels` is imported by a test module).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """Tiny fp64 tensors: extra threads only add overhead, and stall on a busy machine.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


PSEUDO_ENGLISH = (
    "the cat dog bird sees eats likes a small big red green quickly slowly runs jumps "
    "over under house tree garden and then"
).split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Twelve files of simple, learnable pseudo-English (a `text-files` source for pipeline tests)."""
    import random

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = PSEUDO_ENGLISH
    for i in range(12):
        sentences = []
        for _ in range(120):
            subject, verb, obj = rng.choice(words[:4]), rng.choice(words[4:7]), rng.choice(words[:4])
            sentences.append(f"The {subject} {verb} the {rng.choice(words[8:12])} {obj}.")
        (root / f"doc{i:02d}.txt").write_text(" ".join(sentences))
    return root


@pytest.fixture
def nan_filled_kernel_buffers(monkeypatch):
    """Every buffer the Triton building blocks allocate (through `kernels.blocks.common.empty`)
    starts as NaN, so an element a kernel leaves unwritten fails the check; so does every output
    they write into an input's buffer (`common.reuse`), given a fresh one here."""
    import importlib
    import pkgutil

    import kernels.blocks

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    def nan_reuse(buffer):
        return torch.full_like(buffer, float("nan"))

    for module in pkgutil.iter_modules(kernels.blocks.__path__, "kernels.blocks."):
        loaded = importlib.import_module(module.name)
        monkeypatch.setattr(loaded, "empty", nan_empty)
        if hasattr(loaded, "reuse"):
            monkeypatch.setattr(loaded, "reuse", nan_reuse)


@pytest.fixture
def bf16_products_as_on_gpu(monkeypatch):
    """Under the interpreter, run the GPU's bf16 operand path: the kernels round operands to bf16
    as on a GPU, and the interpreter's (wrong) bf16 product is replaced by an exact one of the
    rounded values, which is what a tensor core computes with fp32 accumulation."""
    if torch.cuda.is_available():
        return
    import importlib

    import triton.language as tl

    common = importlib.import_module("kernels.blocks.common")
    exact_dot = tl.dot

    def dot_of_rounded_operands(a, b, *args, _semantic=None, **kwargs):
        upcast = lambda x: x.to(tl.float32, _semantic=_semantic)  # noqa: E731
        return exact_dot(upcast(a), upcast(b), *args, _semantic=_semantic, **kwargs)

    dot_of_rounded_operands.__triton_builtin__ = True
    monkeypatch.setattr(tl, "dot", dot_of_rounded_operands)
    monkeypatch.setattr(
        common,
        "dot_options",
        lambda dtype: dict(PREC="tf32", DOT=tl.bfloat16 if dtype == torch.bfloat16 else tl.float32),
    )
