"""The fused LoRA ops on a 4-bit base (no autograd):

    forward   y = x W_hat^T + b + s (drop(x) A^T) B^T,        S = drop(x) A^T  (M x r)
    backward  dS = s dY B,  dB = s dY^T S,  dA = dS^T drop(x),  dX = dY W_hat + (dS A) * mask/(1-p)

The dropout mask is a function of (seed, element index): never stored, regenerated in backward.
Saved for backward: x, S and the seed.
"""
from __future__ import annotations

import torch

from . import dispatch, matmul, torch_ops
from .quant_state import QuantState


def keep_multiplier(seed: int, shape: tuple[int, int], p: float, device) -> torch.Tensor | None:
    """float32 (0 or 1/(1-p)) per element of x, a pure function of the seed; None when p == 0.

    This is the mask of the torch and reference paths: torch's CPU generator seeded with `seed`.
    The Triton kernels draw theirs from Philox keyed by the seed (never stored, regenerated in
    backward); `nf4kern.kernels.lora.keep_mask(seed, M, K, p, device)` materialises that one.
    The two paths' masks differ; each is reproducible from the seed.
    """
    if p == 0.0:
        return None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # In place: (u >= p) as 1.0 / 0.0, then / (1 - p); no bool tensor and no conversion pass.
    return torch.rand(shape, generator=generator).ge_(p).div_(1.0 - p).to(device)


def lora_forward(x2, packed, state: QuantState, bias, A, B, scale: float, p: float, seed: int, backend=None):
    """(y [M, N] in x's dtype, S [M, r] float32) for 2-D x."""
    choice = dispatch.select(x2.device, backend)
    if choice == "triton":
        from .kernels import lora as kernel

        return kernel.lora_forward(x2, A=A, B=B, scale=scale, p=p, seed=seed, bias=bias,
                                   **matmul._weight_args(packed, state))
    keep = keep_multiplier(seed, tuple(x2.shape), p, x2.device)
    if choice == "reference":
        from . import reference

        y, S = reference.lora_forward(x2, packed, state, bias, A, B, scale, keep)
        return y.to(x2.dtype), S.float()
    xd = x2.float() if keep is None else x2.float() * keep
    S = xd @ A.float().t()
    # The base product comes back in float32, so that y is rounded to x's dtype once, adapter
    # included (bf16 at M > 16 on CPUs with native bf16 GEMM multiplies in bf16, whose GEMM
    # rounds its product before the adapter is added).
    y = matmul.nf4_matmul(x2, packed, state, bias, backend=choice, out_dtype=torch.float32)
    y.addmm_(S, B.float().t(), alpha=scale)
    return y.to(x2.dtype), S


def lora_backward(dy2, x2, S, packed, state: QuantState, A, B, scale: float, p: float, seed: int, needs, backend=None):
    """(dx, dA, dB, dbias) for 2-D dy and x; entries not in `needs` (a 4-tuple of bools) are None."""
    need_dx, need_dA, need_dB, need_dbias = needs
    choice = dispatch.select(dy2.device, backend)
    if choice == "triton":
        from .kernels import lora as kernel

        return kernel.lora_backward(dy2, x2, S, A=A, B=B, scale=scale, p=p, seed=seed, needs=needs,
                                    **matmul._weight_args(packed, state))
    keep = keep_multiplier(seed, tuple(x2.shape), p, x2.device)
    if choice == "reference":
        from . import reference

        grads = reference.lora_backward(dy2, x2, packed, state, A, B, scale, keep)
        return tuple(g if need else None for g, need in zip(grads, needs))
    dyf = dy2.float()
    dS = dyf @ B.float()
    dS.mul_(scale)
    dx = dA = dB = dbias = None
    if need_dx:
        lora_dx = dS @ A.float()
        if keep is not None:
            lora_dx.mul_(keep)
        dx = matmul.nf4_matmul_dx(dy2, packed, state, backend=choice, out_dtype=torch.float32).add_(lora_dx)
    if need_dA:
        xd = x2.float() if keep is None else x2.float() * keep
        dA = dS.t() @ xd
    if need_dB:
        dB = (dyf.t() @ S).mul_(scale)
    if need_dbias:
        dbias = dyf.sum(0)
    return dx, dA, dB, dbias
