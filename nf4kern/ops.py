"""nf4kern's ops registered with torch.library (namespace `nf4kern`), each with a fake kernel for
tracing and, for the differentiable ones, registered autograd: torch.compile(fullgraph=True)
sees them as single graph nodes and never traces into their Python or numpy internals.

The 4-bit weight travels as its tensors (packed bytes, absmax, nested absmax, offset) plus
(N, K, blocksize, quant_type); a QuantState is rebuilt inside the kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import codebook as cb
from . import lora, matmul
from .quant_state import QuantState

_LIB = "nf4kern"


def weight_args(state: QuantState) -> tuple:
    """(absmax, nested_absmax, offset, N, K, blocksize, quant_type) of a 2-D quantized weight."""
    nested_absmax = state.state2.absmax if state.nested else None
    N, K = state.shape
    return state.absmax, nested_absmax, state.offset, N, K, state.blocksize, state.quant_type


def _state(absmax, nested_absmax, offset, N, K, blocksize, quant_type) -> QuantState:
    code = torch.from_numpy(cb.codebook(quant_type).copy()).to(absmax.device)
    state2 = None
    if nested_absmax is not None:
        dyn = torch.from_numpy(cb.dynamic_map().copy()).to(absmax.device)
        state2 = QuantState(nested_absmax, code=dyn, blocksize=cb.NESTED_BLOCKSIZE, dtype=torch.float32)
    return QuantState(absmax, (N, K), code, blocksize, quant_type, torch.float32, offset, state2)


def _check_devices(first: str, **tensors) -> None:
    """The fake kernels run whenever any input is a meta (or fake) tensor; one on a device unlike
    the activations' would otherwise yield an uninitialised result instead of an error."""
    device = tensors[first].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}")


# -- quantize / dequantize --------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::quantize_4bit", mutates_args=())
def quantize_4bit(A: Tensor, blocksize: int, quant_type: str, double_quant: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(packed uint8 [ceil(n/2)], absmax, nested absmax, offset); without double quant absmax
    is float32 and the last two are empty."""
    from .functional import quantize_4bit as quantize

    packed, state = quantize(A, blocksize, quant_type, double_quant)
    if not double_quant:
        return packed.reshape(-1), state.absmax, A.new_empty(0, dtype=torch.float32), A.new_empty(0, dtype=torch.float32)
    return packed.reshape(-1), state.absmax, state.state2.absmax, state.offset


@quantize_4bit.register_fake
def _(A, blocksize, quant_type, double_quant):
    n = A.numel()
    blocks = -(-n // blocksize)
    packed = A.new_empty(-(-n // 2), dtype=torch.uint8)
    if not double_quant:
        return packed, A.new_empty(blocks, dtype=torch.float32), A.new_empty(0, dtype=torch.float32), A.new_empty(0, dtype=torch.float32)
    nested = A.new_empty(-(-blocks // cb.NESTED_BLOCKSIZE), dtype=torch.float32)
    return packed, A.new_empty(blocks, dtype=torch.uint8), nested, A.new_empty((), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], offset: Optional[Tensor],
    shape: list[int], blocksize: int, quant_type: str, dtype: torch.dtype,
) -> Tensor:
    from .functional import dequantize_4bit as dequantize

    state = _state(absmax, nested_absmax, offset, 1, 1, blocksize, quant_type)
    state.shape, state.dtype = torch.Size(shape), dtype
    return dequantize(packed, state)


@dequantize_4bit.register_fake
def _(packed, absmax, nested_absmax, offset, shape, blocksize, quant_type, dtype):
    _check_devices("packed", packed=packed, absmax=absmax, nested_absmax=nested_absmax, offset=offset)
    return packed.new_empty(shape, dtype=dtype)


# -- the NF4 matmul ---------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::nf4_matmul", mutates_args=())
def nf4_matmul(
    x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], offset: Optional[Tensor],
    bias: Optional[Tensor], N: int, K: int, blocksize: int, quant_type: str, backend: Optional[str] = None,
) -> Tensor:
    state = _state(absmax, nested_absmax, offset, N, K, blocksize, quant_type)
    return matmul.nf4_matmul(x, packed, state, bias, backend)


@nf4_matmul.register_fake
def _(x, packed, absmax, nested_absmax, offset, bias, N, K, blocksize, quant_type, backend=None):
    _check_devices("x", x=x, weight=packed, absmax=absmax, nested_absmax=nested_absmax, offset=offset, bias=bias)
    return x.new_empty(*x.shape[:-1], N)


@torch.library.custom_op(f"{_LIB}::nf4_matmul_dx", mutates_args=())
def nf4_matmul_dx(
    dy: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], offset: Optional[Tensor],
    N: int, K: int, blocksize: int, quant_type: str, backend: Optional[str] = None,
) -> Tensor:
    state = _state(absmax, nested_absmax, offset, N, K, blocksize, quant_type)
    return matmul.nf4_matmul_dx(dy, packed, state, backend)


@nf4_matmul_dx.register_fake
def _(dy, packed, absmax, nested_absmax, offset, N, K, blocksize, quant_type, backend=None):
    _check_devices("dy", dy=dy, weight=packed, absmax=absmax, nested_absmax=nested_absmax, offset=offset)
    return dy.new_empty(*dy.shape[:-1], K)


def _matmul_setup(ctx, inputs, output):
    x, packed, absmax, nested_absmax, offset, bias, N, K, blocksize, quant_type, backend = inputs
    # The weight only: nothing activation-sized is kept for backward.
    ctx.save_for_backward(packed, absmax, nested_absmax, offset)
    ctx.meta = (N, K, blocksize, quant_type, backend)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _matmul_backward(ctx, dy):
    packed, absmax, nested_absmax, offset = ctx.saved_tensors
    N, K, blocksize, quant_type, backend = ctx.meta
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        dx = nf4_matmul_dx(dy, packed, absmax, nested_absmax, offset, N, K, blocksize, quant_type, backend)
    if ctx.needs_input_grad[5]:
        dbias = dy.reshape(-1, N).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, None, None, None, None, dbias, None, None, None, None, None


nf4_matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup)


# -- LoRA on a 4-bit base -----------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::lora_forward", mutates_args=())
def lora_forward(
    x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], offset: Optional[Tensor],
    bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float, p: float, seed: Tensor,
    N: int, K: int, blocksize: int, quant_type: str, backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """(y [..., N] in x's dtype, S = drop(x) A^T as float32 [M, r]); the mask is a function of seed."""
    state = _state(absmax, nested_absmax, offset, N, K, blocksize, quant_type)
    y, S = lora.lora_forward(x.reshape(-1, K), packed, state, bias, A, B, scale, p, int(seed.item()), backend)
    return y.reshape(*x.shape[:-1], N), S


@lora_forward.register_fake
def _(x, packed, absmax, nested_absmax, offset, bias, A, B, scale, p, seed, N, K, blocksize, quant_type, backend=None):
    # The seed is a CPU scalar whatever the device.
    _check_devices("x", x=x, weight=packed, absmax=absmax, nested_absmax=nested_absmax, offset=offset, bias=bias,
                   lora_A=A, lora_B=B)
    M = x.numel() // K
    return x.new_empty(*x.shape[:-1], N), x.new_empty(M, A.shape[0], dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::lora_backward", mutates_args=())
def lora_backward(
    dy: Tensor, x: Tensor, S: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
    offset: Optional[Tensor], A: Tensor, B: Tensor, scale: float, p: float, seed: Tensor,
    N: int, K: int, blocksize: int, quant_type: str, needs: list[bool], backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dbias) in float32; an entry not in `needs` comes back empty."""
    state = _state(absmax, nested_absmax, offset, N, K, blocksize, quant_type)
    grads = lora.lora_backward(
        dy.reshape(-1, N), x.reshape(-1, K), S, packed, state, A, B, scale, p, int(seed.item()), tuple(needs), backend
    )
    return tuple(g.float() if g is not None else dy.new_empty(0, dtype=torch.float32) for g in grads)


@lora_backward.register_fake
def _(dy, x, S, packed, absmax, nested_absmax, offset, A, B, scale, p, seed, N, K, blocksize, quant_type, needs, backend=None):
    M = x.numel() // K
    shapes = ((M, K), tuple(A.shape), tuple(B.shape), (N,))
    return tuple(dy.new_empty(s if need else (0,), dtype=torch.float32) for s, need in zip(shapes, needs))


def _lora_setup(ctx, inputs, output):
    x, packed, absmax, nested_absmax, offset, bias, A, B, scale, p, seed, N, K, blocksize, quant_type, backend = inputs
    # x, S and the seed (plus the frozen weight and the adapter): no mask, no dequantized weight.
    ctx.save_for_backward(x, output[1], packed, absmax, nested_absmax, offset, A, B, seed)
    ctx.meta = (scale, p, N, K, blocksize, quant_type, backend)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _lora_backward(ctx, dy, dS_unused):
    x, S, packed, absmax, nested_absmax, offset, A, B, seed = ctx.saved_tensors
    scale, p, N, K, blocksize, quant_type, backend = ctx.meta
    g = ctx.needs_input_grad
    needs = [g[0], g[6], g[7], g[5]]
    dx, dA, dB, dbias = lora_backward(dy, x, S, packed, absmax, nested_absmax, offset, A, B, scale, p, seed, N, K, blocksize, quant_type, needs, backend)
    return (
        dx.reshape(x.shape).to(x.dtype) if g[0] else None,
        None, None, None, None,
        dbias.to(ctx.bias_dtype) if g[5] else None,
        dA.to(A.dtype) if g[6] else None,
        dB.to(B.dtype) if g[7] else None,
        None, None, None, None, None, None, None, None,
    )


lora_forward.register_autograd(_lora_backward, setup_context=_lora_setup)
