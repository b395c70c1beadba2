"""Test-session setup shared by all test files."""
import os

import torch

# Without CUDA, Triton kernels can only run under Triton's interpreter, and it must be switched on
# before any `triton.jit` decorator runs (i.e. before `kernels` is imported by a test module).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
