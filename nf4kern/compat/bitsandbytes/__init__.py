"""bitsandbytes' 4-bit API (as of 0.50.2) served by nf4kern: code written for bitsandbytes runs
with `import nf4kern.compat.bitsandbytes as bnb` in place of `import bitsandbytes as bnb`.

    bnb.nn          Params4bit, Linear4bit, LinearNF4, LinearFP4 (nf4kern.nn's classes)
    bnb.functional  quantize_4bit, dequantize_4bit, quantize_nf4/fp4, dequantize_nf4/fp4,
                    gemv_4bit, get_4bit_type, QuantState
    bnb.matmul_4bit

The formats are bitsandbytes' own (packed bytes, QuantState, state dict keys), so weights and
checkpoints move between the two libraries unchanged. Only the 4-bit API is served: no 8-bit
layers, optimizers or Embedding4bit.
"""
from __future__ import annotations

import warnings

import torch

from nf4kern.autograd import nf4_linear

from . import functional, nn
from .functional import QuantState

__version__ = "0.50.2"  # the bitsandbytes API version served, for version checks
features = {"multi_backend"}  # flags that transformers and diffusers integrations look for
supported_torch_devices = {"cpu", "cuda"}

__all__ = ["functional", "matmul_4bit", "nn", "supported_torch_devices"]


def matmul_4bit(A: torch.Tensor, B: torch.Tensor, quant_state: QuantState, out: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A @ W^T + bias in A's dtype, W the 4-bit weight [N, K] of quant_state; B is its packed
    data as stored ([n, 1]) or the legacy transposed view ([1, n]): the same bytes in the same
    order. Gradients flow to A and bias."""
    if quant_state is None:
        raise ValueError("quant_state is required")
    if quant_state.shape is None or len(quant_state.shape) != 2:
        raise ValueError("matmul_4bit: quant_state.shape must be 2D [N, K]")
    N, K = quant_state.shape
    if A.shape[-1] == N != K:
        result = _matmul_transposed_weight(A, B, quant_state, bias)
    else:
        result = nf4_linear(A, B, bias, quant_state)
    return functional._into(out, result)


def _matmul_transposed_weight(A, B, quant_state, bias):
    # A weight quantized as [K, N]: bitsandbytes still computes it, with a DeprecationWarning.
    warnings.warn(
        f"matmul_4bit: weight was quantized from a [K, N] tensor (quant_state.shape={list(quant_state.shape)}). "
        "Re-quantize from the weight in [N, K] (out_features, in_features) orientation.",
        DeprecationWarning,
        stacklevel=3,
    )
    # As stored: dequantize_4bit hands the legacy [1, n] view back transposed.
    W = functional.dequantize_4bit(B.reshape(-1, 1), quant_state).to(A.dtype)
    # [N, K] contiguous: torch's CPU GEMM is slow on the transposed bf16 layout.
    return torch.nn.functional.linear(A, W.t().contiguous(), None if bias is None else bias.to(A.dtype))
