"""Shared test helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("NF4KERN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
TINY_LLAMA = SHARED / "fixtures" / "tiny-llama-nf4-dq"


def require_fixture(path: Path) -> Path:
    """The fixture path; a missing fixture fails in CI (it must be there) and skips elsewhere."""
    if not path.exists():
        message = f"fixture {path} not found (set NF4KERN_SHARED to the shared/ folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def randn(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def assert_bytes_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    a8, b8 = a.contiguous().view(torch.uint8).reshape(-1), b.contiguous().view(torch.uint8).reshape(-1)
    assert a8.shape == b8.shape, f"{what}: {a8.shape} bytes vs {b8.shape}"
    diff = (a8 != b8).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.numel()} bytes differ, first at {diff[0].item()}"


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]
