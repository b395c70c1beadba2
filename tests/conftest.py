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
