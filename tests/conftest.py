"""Test setup. Triton kernels run on the CPU under the interpreter, which must be chosen before
triton is first imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def rng():
    """A fresh, reproducible generator per test."""
    return torch.Generator().manual_seed(1234)
