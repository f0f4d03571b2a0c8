"""The differentiable entry points over the fused ops. Their autograd is registered with
torch.library in nf4kern.ops (so torch.compile sees single nodes); the 4-bit weight is frozen
and gets no gradient.

    nf4_linear   y = x W_hat^T + b                      saves the packed weight only
    qlora_linear y = x W_hat^T + b + s (drop(x) A^T) B^T  saves x, S = drop(x) A^T and the seed
"""
from __future__ import annotations

import torch

from . import ops
from .quant_state import QuantState


def _state_of(weight, quant_state) -> QuantState:
    state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError("weight has no quant_state: pass a quantized Params4bit or quant_state=")
    if state.shape is None or len(state.shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D [out_features, in_features], got shape {state.shape}")
    return state


def nf4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, quant_state: QuantState | None = None, *, backend: str | None = None) -> torch.Tensor:
    """x W_hat^T + bias for a 4-bit weight (a Params4bit, or packed data with quant_state).

    Gradients flow to x and bias; the weight is frozen.
    """
    absmax, nested_absmax, offset, N, K, blocksize, quant_type = ops.weight_args(_state_of(weight, quant_state))
    return ops.nf4_matmul(x, weight.detach(), absmax, nested_absmax, offset, bias, N, K, blocksize, quant_type, backend)


def qlora_linear(x, weight, A, B, scale: float, bias=None, dropout: float = 0.0, quant_state: QuantState | None = None, *, seed: int | torch.Tensor | None = None, backend: str | None = None):
    """A 4-bit linear layer with a LoRA adapter, fused. `seed` fixes the dropout mask; by
    default it is drawn from torch's global generator (so gradient checkpointing, which
    restores that generator, recomputes the same mask)."""
    state = _state_of(weight, quant_state)
    _check_lora_args(state, A, B, dropout)
    if seed is None:
        seed = torch.randint(0, 2**62, ()) if dropout > 0 else torch.zeros((), dtype=torch.int64)
    elif not isinstance(seed, torch.Tensor):
        seed = torch.tensor(seed, dtype=torch.int64)
    absmax, nested_absmax, offset, N, K, blocksize, quant_type = ops.weight_args(state)
    y, _ = ops.lora_forward(
        x, weight.detach(), absmax, nested_absmax, offset, bias, A, B, float(scale), float(dropout), seed,
        N, K, blocksize, quant_type, backend,
    )
    return y


def _check_lora_args(state, A, B, dropout) -> None:
    N, K = state.shape
    if A.dim() != 2 or A.shape[1] != K:
        raise ValueError(f"lora_A must have shape [r, {K}], got {tuple(A.shape)}")
    if B.dim() != 2 or B.shape != (N, A.shape[0]):
        raise ValueError(f"lora_B must have shape [{N}, {A.shape[0]}], got {tuple(B.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")
