"""Backend choice: Triton kernels for CUDA tensors, the torch path for CPU tensors, no other device.

`backend=` on a call, or the environment variable NF4KERN_BACKEND, forces one of
"triton" (the interpreter on CPU tensors, when TRITON_INTERPRET=1), "torch" or "reference".
"""
from __future__ import annotations

import os
import types

import numpy as np
import torch

BACKENDS = ("triton", "torch", "reference")
ENV_VAR = "NF4KERN_BACKEND"
DEVICE_TYPES = ("cpu", "cuda")


def select(device: torch.device, backend: str | None = None) -> str:
    if device.type not in DEVICE_TYPES:
        # Every other device (meta, mps, xpu...) would otherwise reach the torch path, which
        # for meta returns uninitialised memory instead of failing.
        raise ValueError(f"nf4kern runs on cpu and cuda tensors only; got a tensor on {device}")
    choice = backend or os.environ.get(ENV_VAR) or "auto"
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice not in BACKENDS:
        source = "backend" if backend else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS} or 'auto', got {choice!r}")
    if choice == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "the Triton backend on CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported, or use backend='torch'"
        )
    if choice != "triton" and device.type not in ("cpu",):
        raise ValueError(f"backend {choice!r} runs on CPU tensors only; got a tensor on {device}")
    return choice


def ops(backend: str):
    """The module (or namespace) with quantize_blocks, quantize_nested and dequantize."""
    if backend == "torch":
        from . import torch_ops

        return torch_ops
    if backend == "triton":
        try:
            from .kernels import quant
        except ImportError as e:
            raise ImportError(f"backend 'triton' needs the triton package: {e}") from e
        return quant
    return _reference_ops


def _reference_quantize_blocks(x, blocksize, quant_type):
    from . import reference

    q = reference.quantize(x, blocksize, quant_type, double_quant=False)
    return torch.from_numpy(q.packed), torch.from_numpy(q.absmax)


def _reference_quantize_nested(absmax, offset):
    from . import reference

    q, nested = reference.quantize_nested(absmax.numpy(), np.float32(offset.item()))
    return torch.from_numpy(q), torch.from_numpy(nested)


def _reference_dequantize(packed, absmax, n, blocksize, quant_type, out_dtype, nested_absmax=None, offset=None):
    from . import reference

    q = reference.Quantized(
        packed.numpy(),
        absmax.numpy(),
        None if nested_absmax is None else nested_absmax.numpy(),
        None if offset is None else np.float32(offset.item()),
    )
    return reference.dequantize(q, n, blocksize, quant_type, out_dtype)


_reference_ops = types.SimpleNamespace(
    quantize_blocks=_reference_quantize_blocks,
    quantize_nested=_reference_quantize_nested,
    dequantize=_reference_dequantize,
)
