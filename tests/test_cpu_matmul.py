"""The CPU matmul path multiplies bf16 inputs in bf16 only where the CPU has native bf16 GEMM,
and in float32 otherwise; both choices are checked here whatever this machine has."""
import pytest
import torch

import nf4kern
from nf4kern import reference, torch_ops


def _rms_ratio(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("native_bf16", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_dx_against_reference(native_bf16, dtype, monkeypatch, rng):
    monkeypatch.setattr(torch_ops, "native_bf16_matmul", lambda: native_bf16)
    w = torch.randn(33, 200, generator=rng) * 0.02
    packed, state = nf4kern.quantize_4bit(w, 64, double_quant=True)
    x = torch.randn(2, 17, 200, generator=rng).to(dtype).requires_grad_()
    bias = torch.randn(33, generator=rng)
    y = nf4kern.nf4_linear(x, packed, bias, state)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_y = reference.matmul(x.reshape(-1, 200), packed, state, bias)
    ref_dx = reference.matmul_dx(dy.reshape(-1, 33), packed, state)
    bound = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert _rms_ratio(y.reshape(-1, 33), ref_y) < bound
    assert _rms_ratio(x.grad.reshape(-1, 200), ref_dx) < bound


def test_only_bf16_uses_the_bf16_product(monkeypatch):
    monkeypatch.setattr(torch_ops, "native_bf16_matmul", lambda: True)
    assert torch_ops._compute_dtype(torch.bfloat16) == torch.bfloat16
    assert torch_ops._compute_dtype(torch.float16) == torch.float32
    monkeypatch.setattr(torch_ops, "native_bf16_matmul", lambda: False)
    assert torch_ops._compute_dtype(torch.bfloat16) == torch.float32
