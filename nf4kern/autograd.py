"""autograd Functions over the fused ops. The 4-bit weight is frozen: it gets no gradient."""
from __future__ import annotations

import torch

from . import lora, matmul
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


class QLoRALinearFunction(torch.autograd.Function):
    """y = x W_hat^T + b + scale (drop(x) A^T) B^T with a seeded dropout mask. Saves x, S and
    the seed; no mask and no dequantized weight."""

    @staticmethod
    def forward(ctx, x, packed, bias, A, B, state, scale, p, seed, backend):
        x2 = x.reshape(-1, x.shape[-1])
        y, S = lora.lora_forward(x2, packed, state, bias, A, B, scale, p, seed, backend)
        ctx.save_for_backward(x, S, packed, A, B)
        ctx.state, ctx.scale, ctx.p, ctx.seed, ctx.backend = state, scale, p, seed, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, S, packed, A, B = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4], ctx.needs_input_grad[2])
        dx, dA, dB, dbias = lora.lora_backward(
            dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), S, packed, ctx.state, A, B,
            ctx.scale, ctx.p, ctx.seed, needs, ctx.backend,
        )
        if dx is not None:
            dx = dx.to(x.dtype).reshape(x.shape)
        if dA is not None:
            dA = dA.to(A.dtype)
        if dB is not None:
            dB = dB.to(B.dtype)
        if dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, None, dbias, dA, dB, None, None, None, None, None


def qlora_linear(x, weight, A, B, scale: float, bias=None, dropout: float = 0.0, quant_state: QuantState | None = None, *, seed: int | None = None, backend: str | None = None):
    """A 4-bit linear layer with a LoRA adapter, fused. `seed` fixes the dropout mask; by
    default it is drawn from torch's global generator (so gradient checkpointing, which
    restores that generator, recomputes the same mask)."""
    state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError("weight has no quant_state: pass a quantized Params4bit or quant_state=")
    _check_lora_args(x, state, A, B, dropout)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item()) if dropout > 0 else 0
    return QLoRALinearFunction.apply(x, weight.detach(), bias, A, B, state, float(scale), float(dropout), seed, backend)


def _check_lora_args(x, state, A, B, dropout) -> None:
    N, K = state.shape
    if A.dim() != 2 or A.shape[1] != K:
        raise ValueError(f"lora_A must have shape [r, {K}], got {tuple(A.shape)}")
    if B.dim() != 2 or B.shape != (N, A.shape[0]):
        raise ValueError(f"lora_B must have shape [{N}, {A.shape[0]}], got {tuple(B.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")
