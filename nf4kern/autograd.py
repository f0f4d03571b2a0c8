"""autograd Functions over the fused ops. The 4-bit weight is frozen: it gets no gradient."""
from __future__ import annotations

import torch

from . import matmul
from .quant_state import QuantState


class NF4Linear(torch.autograd.Function):
    """y = x W_hat^T + b. Saves the packed weight and its state for backward, nothing
    activation-sized: dx = dy W_hat is computed from the packed weight again."""

    @staticmethod
    def forward(ctx, x, packed, bias, state, backend):
        ctx.state, ctx.backend = state, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(packed)
        return matmul.nf4_matmul(x, packed, state, bias, backend)

    @staticmethod
    def backward(ctx, dy):
        (packed,) = ctx.saved_tensors
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = matmul.nf4_matmul_dx(dy, packed, ctx.state, ctx.backend)
        if ctx.needs_input_grad[2]:
            dbias = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, None, dbias, None, None


def nf4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, quant_state: QuantState | None = None, *, backend: str | None = None) -> torch.Tensor:
    """x W_hat^T + bias for a 4-bit weight (a Params4bit, or packed data with quant_state).

    Gradients flow to x and bias; the weight is frozen.
    """
    state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError("weight has no quant_state: pass a quantized Params4bit or quant_state=")
    return NF4Linear.apply(x, weight.detach(), bias, state, backend)
