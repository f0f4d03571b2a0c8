"""The NF4 matmul ops, y = x W_hat^T + b and dx = dy W_hat, dispatched by backend (no autograd).

W_hat is read straight from the packed weight and its scales: the Triton kernels dequantize
tiles in registers, the torch path a cache-sized row chunk at a time.
"""
from __future__ import annotations

import torch

from . import dispatch, torch_ops
from .functional import FLOAT_DTYPES, check_state_device
from .quant_state import QuantState


def _check(x: torch.Tensor, packed: torch.Tensor, state: QuantState, name: str, inner: int) -> None:
    if not isinstance(state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(state).__name__}")
    if state.shape is None or len(state.shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D [out_features, in_features], got shape {state.shape}")
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float32, float16 or bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0 or x.shape[-1] != inner:
        raise ValueError(f"{name} must have last dimension {inner} for a weight of shape {tuple(state.shape)}, got {tuple(x.shape)}")
    if x.device != packed.device:
        raise ValueError(f"{name} is on {x.device} but the weight is on {packed.device}")
    state.check(packed)
    check_state_device(packed, state, "weight")


def _check_bias(bias, x: torch.Tensor, N: int) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dtype not in FLOAT_DTYPES:
        raise ValueError(f"bias must be float32, float16 or bfloat16, got {bias.dtype}")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if bias.dim() != 1 or bias.shape[0] != N:
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")


def _weight_args(packed: torch.Tensor, state: QuantState) -> dict:
    return dict(
        packed=packed.contiguous().view(torch.uint8).reshape(-1),
        code=state.code,
        absmax=None if state.nested else state.absmax,
        N=state.shape[0],
        K=state.shape[1],
        blocksize=state.blocksize,
        nested=(state.absmax, state.state2.absmax, state.offset, state.state2.code) if state.nested else None,
    )


def nf4_matmul(x, packed, state, bias=None, backend=None, out_dtype=None) -> torch.Tensor:
    """x [..., K] -> [..., N] in out_dtype (default x.dtype), float32 accumulation."""
    N, K = state.shape if state.shape is not None and len(state.shape) == 2 else (None, None)
    _check(x, packed, state, "x", K)
    _check_bias(bias, x, N)
    x2 = x.reshape(-1, K)
    out_dtype = out_dtype or x.dtype
    choice = dispatch.select(x.device, backend)
    if choice == "triton":
        from .kernels import matmul as kernel

        y = kernel.nf4_matmul(x2.contiguous(), bias=bias, out_dtype=out_dtype, **_weight_args(packed, state))
    elif choice == "torch":
        y = torch_ops.matmul(x2, _flat(packed), N, K, state.blocksize, state.quant_type, _scales(state), bias).to(out_dtype)
    else:
        from . import reference

        y = reference.matmul(x2, packed, state, bias).to(out_dtype)
    return y.reshape(*x.shape[:-1], N)


def nf4_matmul_dx(dy, packed, state, backend=None, out_dtype=None) -> torch.Tensor:
    """dy [..., N] -> dx [..., K] = dy W_hat, in out_dtype (default dy.dtype)."""
    N, K = state.shape if state.shape is not None and len(state.shape) == 2 else (None, None)
    _check(dy, packed, state, "dy", N)
    dy2 = dy.reshape(-1, N)
    out_dtype = out_dtype or dy.dtype
    choice = dispatch.select(dy.device, backend)
    if choice == "triton":
        from .kernels import matmul as kernel

        dx = kernel.nf4_matmul_dx(dy2.contiguous(), out_dtype=out_dtype, **_weight_args(packed, state))
    elif choice == "torch":
        dx = torch_ops.matmul_dx(dy2, _flat(packed), N, K, state.blocksize, state.quant_type, _scales(state)).to(out_dtype)
    else:
        from . import reference

        dx = reference.matmul_dx(dy2, packed, state).to(out_dtype)
    return dx.reshape(*dy.shape[:-1], K)


def _flat(packed: torch.Tensor) -> torch.Tensor:
    return packed.contiguous().view(torch.uint8).reshape(-1)


def _scales(state: QuantState) -> torch.Tensor:
    if state.nested:
        return torch_ops.dequantize_absmax(state.absmax, state.state2.absmax, state.offset)
    return state.absmax
