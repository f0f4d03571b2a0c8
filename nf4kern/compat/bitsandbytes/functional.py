"""bitsandbytes.functional's 4-bit functions, with its signatures and defaults (note: fp4 and no
double quantization by default, unlike Linear4bit), computed by nf4kern.

Differences, all deliberate: NaN/inf in a tensor to quantize raise ValueError (bitsandbytes
silently writes blocks that decode to NaN); `out=` works on every device (bitsandbytes has no CPU
kernel for it); a packed tensor of one byte is never returned transposed (bitsandbytes' legacy
transpose catches it by accident); get_4bit_type knows only nf4 and fp4, and with no device
builds the table on the GPU only when there is one.
"""
from __future__ import annotations

import torch

from nf4kern import codebook as cb
from nf4kern import functional as _nf4
from nf4kern.autograd import nf4_linear
from nf4kern.quant_state import QuantState

__all__ = [
    "QuantState",
    "dequantize_4bit",
    "dequantize_fp4",
    "dequantize_nf4",
    "gemv_4bit",
    "get_4bit_type",
    "quantize_4bit",
    "quantize_fp4",
    "quantize_nf4",
]


def quantize_4bit(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_type="fp4", quant_storage=torch.uint8):
    """(packed [ceil(numel/2) / itemsize, 1] in quant_storage, QuantState). `absmax` and `out`
    are optional buffers the results are copied into."""
    packed, state = _nf4.quantize_4bit(A, _blocksize(blocksize), quant_type, compress_statistics, quant_storage)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return _into(out, packed), state


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
    """The tensor of quant_state.shape in quant_state.dtype. Without quant_state, `absmax` (float32
    block scales) and `out` (giving shape and dtype) describe it, with blocksize and quant_type.
    The legacy transposed packed view ([1, n]) gives the transposed tensor, as in bitsandbytes."""
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit requires both absmax and out when quant_state is not provided")
        code = get_4bit_type(quant_type, absmax.device)
        quant_state = QuantState(absmax, out.shape, code, _blocksize(blocksize), quant_type, out.dtype)
    result = _into(out, _nf4.dequantize_4bit(A, quant_state))
    return result.t() if _is_transposed_view(A) else result


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """A @ W^T in A's dtype for the 4-bit weight W of `state`, B its packed data as stored or
    transposed. Any number of rows works; bitsandbytes' kernel is meant for one. transposed_A and
    transposed_B are ignored, as in bitsandbytes."""
    if state is None:
        raise ValueError("state cannot be None. gemv_4bit() requires the state from quantize_4bit()")
    return _into(out, nf4_linear(A, B, None, state))


def get_4bit_type(typename, device=None, blocksize=64):
    """The 16 float32 values of a 4-bit code, indexed by code. (blocksize selects among
    bitsandbytes' af4 tables, which are not served.)"""
    if typename not in cb.QUANT_TYPES:
        raise NotImplementedError(f"Typename {typename} not supported")
    if device is None:  # bitsandbytes always means "cuda", which fails on a CPU-only machine
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.from_numpy(cb.codebook(typename).copy()).to(device)


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """`result`, or `out` holding a copy of it (bitsandbytes' optional output buffers)."""
    return result if out is None else out.copy_(result)


def _blocksize(blocksize):
    return 64 if blocksize is None else blocksize


def _is_transposed_view(packed: torch.Tensor) -> bool:
    # W.t() of a packed column [n, 1]; a single byte is the column itself.
    return packed.dim() == 2 and packed.shape[0] == 1 and packed.shape[1] > 1
