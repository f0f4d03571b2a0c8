"""The fused LoRA kernels (nf4kern.kernels.lora, and the LoRA epilogues of kernels.matmul) under
the Triton interpreter, against the float64 reference nf4kern.reference.lora_forward /
lora_backward with the kernels' own dropout mask from keep_mask.

Small odd shapes that reach every path: M = 1 (GEMV forward) to 65 and 100 (tiled GEMMs,
several M tiles and groups), K odd and not a multiple of the tile, N over several chunks of the
dY pass, r from 1 to 256 (several r tiles); fp32, fp16 and bf16 activations with float32 or
same-dtype adapters; NF4 and FP4; plain and nested scales; bias or none; dropout 0 and 0.1.
Every buffer the kernels allocate (outputs and workspaces) starts as NaN.
"""
from __future__ import annotations

import math

import pytest
import torch
import triton

import nf4kern
from nf4kern import matmul as nf4_matmul_ops
from nf4kern import reference
from nf4kern.autograd import qlora_linear
from nf4kern.kernels import lora as kl
from nf4kern.kernels import matmul as mm

# Elementwise |out - ref| <= TOL * (the same sum over absolute values), per result dtype: one
# rounding of each operand to the dot dtype and one of the result (fp32: accumulation order).
ELEM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
RMS_TOL = {torch.float32: 2e-6, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}
FP32 = torch.float32  # S, dA, dB and dbias are float32 whatever the activations


@pytest.fixture
def poison(monkeypatch):
    """Every floating tensor made by torch.empty (kernel outputs and workspaces) starts as NaN."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def assert_close(out, expect, bound, tol_dtype, what):
    """out ~ expect (float64) within ELEM_TOL * bound elementwise and RMS_TOL overall."""
    got = out.double()
    assert got.shape == expect.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expect.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    worst = ((got - expect).abs() / (ELEM_TOL[tol_dtype] * bound + 1e-30)).max().item()
    assert worst <= 1.0, f"{what}: elementwise error {worst:.3g}x the bound"
    norm = expect.norm().item()
    if norm > 0:
        rms = ((got - expect).norm() / norm).item()
        assert rms <= RMS_TOL[tol_dtype], f"{what}: RMS error ratio {rms:.3g}"


class Case:
    """A quantized [N, K] weight, x, an adapter and dY, with float64 expectations."""

    def __init__(self, M, K, N, r, dtype, adapter, p, bias, nested, quant_type, blocksize,
                 seed=1234):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(N, K, generator=g) * 0.5
        self.packed, self.state = nf4kern.quantize_4bit(w, blocksize, quant_type, nested)
        self.w_hat = reference.dequantized_weight(self.packed, self.state)
        self.x = torch.randn(M, K, generator=g).to(dtype)
        self.A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(adapter)
        self.B = (torch.randn(N, r, generator=g) * 0.5).to(adapter)
        self.bias = (torch.randn(N, generator=g) * 0.5).to(dtype) if bias else None
        self.dy = torch.randn(M, N, generator=g).to(dtype)
        self.scale, self.p, self.seed, self.dtype = 1.5, p, 1000 + seed, dtype
        self.keep = kl.keep_mask(self.seed, M, K, p, "cpu") if p > 0 else None

    def weight(self):
        return nf4_matmul_ops._weight_args(self.packed, self.state)

    def forward(self):
        return kl.lora_forward(self.x, A=self.A, B=self.B, scale=self.scale, p=self.p,
                               seed=self.seed, bias=self.bias, **self.weight())

    def backward(self, S, needs=(True, True, True, True)):
        return kl.lora_backward(self.dy, self.x, S, A=self.A, B=self.B, scale=self.scale,
                                p=self.p, seed=self.seed, needs=needs, **self.weight())

    def check_forward(self, y, S):
        y_ref, S_ref = reference.lora_forward(self.x, self.packed, self.state, self.bias, self.A,
                                              self.B, self.scale, self.keep)
        x, A, B = self.x.double().abs(), self.A.double().abs(), self.B.double().abs()
        xd = x if self.keep is None else x * self.keep.double()
        assert S.dtype == FP32 and y.dtype == self.dtype
        assert_close(S, S_ref, xd @ A.T, FP32, "S")
        bound = x @ self.w_hat.abs().T + self.scale * (xd @ A.T) @ B.T
        if self.bias is not None:
            bound = bound + self.bias.double().abs()
        assert_close(y, y_ref, bound, self.dtype, "y")

    def check_backward(self, grads, needs=(True, True, True, True)):
        refs = reference.lora_backward(self.dy, self.x, self.packed, self.state, self.A, self.B,
                                       self.scale, self.keep)
        dy, x = self.dy.double().abs(), self.x.double().abs()
        A, B = self.A.double().abs(), self.B.double().abs()
        keep = 1.0 if self.keep is None else self.keep.double()
        dS = self.scale * dy @ B
        bounds = (dy @ self.w_hat.abs() + (dS @ A) * keep, dS.T @ (x * keep),
                  self.scale * dy.T @ ((x * keep) @ A.T), dy.sum(0))
        dtypes = (self.dtype, FP32, FP32, FP32)
        for name, got, ref, bound, dtype, need in zip(("dx", "dA", "dB", "dbias"), grads, refs,
                                                      bounds, dtypes, needs):
            if not need:
                assert got is None, f"{name} computed though not needed"
                continue
            assert got.dtype == dtype, f"{name}: {got.dtype}"
            assert_close(got, ref, bound, dtype, name)


# (M, K, N, r, activation dtype, adapter dtype, p, bias, nested, quant_type, blocksize)
CASES = [
    (1, 40, 17, 1, torch.bfloat16, FP32, 0.1, True, True, "nf4", 64),       # GEMV, r = 1
    (1, 97, 33, 16, FP32, FP32, 0.0, False, False, "fp4", 32),              # GEMV, odd K
    (3, 130, 17, 5, torch.float16, FP32, 0.1, True, False, "nf4", 64),
    (3, 40, 17, 256, torch.bfloat16, FP32, 0.1, False, True, "nf4", 64),    # 4 r tiles
    (5, 97, 17, 8, FP32, FP32, 0.1, True, True, "nf4", 64),                 # odd-K dx, M <= 16
    (9, 97, 33, 17, torch.bfloat16, torch.bfloat16, 0.1, False, True, "fp4", 64),
    (17, 97, 33, 17, torch.bfloat16, torch.bfloat16, 0.1, True, True, "fp4", 64),  # 16-bit dots
    (17, 40, 33, 64, FP32, FP32, 0.1, True, True, "nf4", 32),
    (17, 130, 17, 5, torch.float16, torch.float16, 0.0, False, True, "nf4", 64),
    (65, 97, 17, 16, torch.float16, FP32, 0.1, True, True, "nf4", 64),     # tiled GEMMs
    (65, 130, 33, 100, torch.bfloat16, FP32, 0.0, True, False, "fp4", 64),  # 2 r tiles
    (65, 40, 33, 1, FP32, FP32, 0.1, False, True, "nf4", 64),
]


@pytest.mark.parametrize("M,K,N,r,dtype,adapter,p,bias,nested,quant_type,blocksize", CASES)
def test_forward_backward(M, K, N, r, dtype, adapter, p, bias, nested, quant_type, blocksize,
                          poison):
    case = Case(M, K, N, r, dtype, adapter, p, bias, nested, quant_type, blocksize)
    y, S = case.forward()
    case.check_forward(y, S)
    case.check_backward(case.backward(S))


def _forced_split(n):
    """mm._split_for replaced: split every reduction into about n parts."""
    def split_for(tiles, red, step, device, min_steps=4):
        per = triton.cdiv(triton.cdiv(red, step), n) * step
        return triton.cdiv(red, per), per
    return split_for


@pytest.mark.parametrize("M,K,N,r,dtype,split,groups", [
    # Split-K in S and in the forward / dx GEMMs (the LoRA term added by split 0 only); one
    # group over all M tiles of the dY pass (dB and dbias accumulated in place over 2 tiles).
    (40, 130, 130, 17, torch.bfloat16, 3, 1),
    # Two M groups of 2 tiles and two N groups of 3 chunks (both partial sets reduced), dA split.
    (100, 97, 130, 5, torch.float16, 3, 2),
])
def test_splits_and_groups(M, K, N, r, dtype, split, groups, monkeypatch, poison):
    monkeypatch.setattr(mm, "_split_for", _forced_split(split))
    monkeypatch.setattr(kl, "_MAX_GROUPS", groups)
    spies = {name: _LaunchSpy(getattr(mod, name)) for mod, name in
             ((kl, "_lora_s_kernel"), (kl, "_lora_dy_kernel"), (kl, "_lora_da_kernel"),
              (mm, "_nf4_gemm_kernel"), (mm, "_nf4_gemm_dx_kernel"))}
    for name, spy in spies.items():
        monkeypatch.setattr(kl if name.startswith("_lora") else mm, name, spy)
    case = Case(M, K, N, r, dtype, FP32, 0.1, True, True, "nf4", 64)
    y, S = case.forward()
    case.check_forward(y, S)
    case.check_backward(case.backward(S))
    assert spies["_lora_s_kernel"].launches[0][1]["SPLIT_K"] > 1
    grid = spies["_lora_dy_kernel"].launches[0][0]
    if groups == 1:
        assert grid[:2] == (1, 1)
        assert spies["_nf4_gemm_kernel"].launches[0][1]["SPLIT_K"] > 1
        assert spies["_nf4_gemm_dx_kernel"].launches[0][1]["SPLIT_K"] > 1
    else:
        assert grid[:2] == (2, 2) and spies["_lora_da_kernel"].launches[0][1]["SPLIT_M"] > 1


class _LaunchSpy:
    """Wraps a kernel to record (grid, constexprs) of each launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((tuple(grid), kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("needs", [(False, True, False, False), (True, False, False, False),
                                   (False, False, True, True)])
def test_only_needed_gradients(needs, poison):
    case = Case(17, 40, 33, 5, torch.bfloat16, FP32, 0.1, True, False, "nf4", 64)
    _, S = case.forward()
    case.check_backward(case.backward(S, needs), needs)


# -- the dropout mask ---------------------------------------------------------------------------


def test_keep_mask_values_and_statistics():
    p = 0.1
    m = kl.keep_mask(42, 300, 100, p, "cpu")
    assert m.dtype == FP32 and m.shape == (300, 100)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=FP32)
    assert ((m == 0) | (m == scale)).all()
    n = m.numel()
    kept = (m > 0).double().mean().item()
    assert abs(kept - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    # No visible structure: per-column and per-row keep fractions, and the four columns that
    # share one Philox call, behave like independent draws.
    cols = (m > 0).double().mean(0)
    assert (cols - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / 300)
    quads = (m > 0).reshape(300, 25, 4)
    same = (quads == quads[..., :1]).all(-1).double().mean().item()
    assert abs(same - ((1 - p) ** 4 + p**4)) < 0.03
    assert not torch.equal(m[0], m[1])
    half = kl.keep_mask(7, 200, 200, 0.5, "cpu")
    assert abs((half > 0).double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / 40000)


def test_keep_mask_is_a_function_of_seed_row_and_column():
    m = kl.keep_mask(42, 300, 100, 0.1, "cpu")
    assert torch.equal(m, kl.keep_mask(42, 300, 100, 0.1, "cpu"))
    assert not torch.equal(m, kl.keep_mask(43, 300, 100, 0.1, "cpu"))
    # Element (m, k) does not depend on the shape or the tiling (no flat index).
    assert torch.equal(kl.keep_mask(42, 37, 61, 0.1, "cpu"), m[:37, :61])
    # 64-bit seeds: the high word counts.
    big = 2**40 + 42
    assert not torch.equal(kl.keep_mask(big, 300, 100, 0.1, "cpu"), m)
    assert torch.equal(kl.keep_mask(5, 3, 4, 0.0, "cpu"), torch.ones(3, 4))


def test_kernels_use_the_keep_mask(poison):
    """With p = 0.5 a wrong mask could not pass: S and dA against x * keep_mask."""
    case = Case(17, 40, 17, 16, FP32, FP32, 0.5, False, False, "nf4", 64, seed=9)
    y, S = case.forward()
    xd = case.x.double() * case.keep.double()
    assert_close(S, xd @ case.A.double().T, xd.abs() @ case.A.double().abs().T, FP32, "S")
    _, dA, _, _ = case.backward(S, (False, True, False, False))
    dS = case.scale * case.dy.double() @ case.B.double()
    assert_close(dA, dS.T @ xd, dS.abs().T @ xd.abs(), FP32, "dA")


# -- through autograd ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,p", [(torch.bfloat16, 0.1), (FP32, 0.0)])
def test_qlora_linear_triton_gradients(dtype, p, poison):
    g = torch.Generator().manual_seed(3)
    N, K, r = 33, 40, 17
    packed, state = nf4kern.quantize_4bit(torch.randn(N, K, generator=g) * 0.5, 64, "nf4", True)
    x = torch.randn(2, 5, K, generator=g).to(dtype).requires_grad_(True)
    A = (torch.randn(r, K, generator=g) / math.sqrt(K)).requires_grad_(True)
    B = (torch.randn(N, r, generator=g) * 0.5).requires_grad_(True)
    bias = torch.randn(N, generator=g).to(dtype).requires_grad_(True)
    y = qlora_linear(x, packed, A, B, 2.0, bias, p, state, seed=77, backend="triton")
    assert y.shape == (2, 5, N) and y.dtype == dtype
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)

    x2, dy2 = x.detach().reshape(-1, K), dy.reshape(-1, N)
    keep = kl.keep_mask(77, 10, K, p, "cpu") if p > 0 else None
    y_ref, _ = reference.lora_forward(x2, packed, state, bias, A, B, 2.0, keep)
    dx_ref, dA_ref, dB_ref, dbias_ref = reference.lora_backward(dy2, x2, packed, state, A, B, 2.0, keep)

    def rms(out, ref):
        return ((out.detach().double().reshape(ref.shape) - ref).norm() / ref.norm()).item()

    assert rms(y, y_ref) < RMS_TOL[dtype]
    assert x.grad.dtype == dtype and rms(x.grad, dx_ref) < RMS_TOL[dtype]
    assert bias.grad.dtype == dtype and rms(bias.grad, dbias_ref) < RMS_TOL[dtype]
    assert A.grad.dtype == FP32 and rms(A.grad, dA_ref) < 1e-5
    assert B.grad.dtype == FP32 and rms(B.grad, dB_ref) < 1e-5


# -- edges and errors ----------------------------------------------------------------------------


def test_no_rows():
    case = Case(1, 40, 17, 4, FP32, FP32, 0.1, True, False, "nf4", 64)
    case.x, case.dy = case.x[:0], case.dy[:0]
    y, S = case.forward()
    assert y.shape == (0, 17) and S.shape == (0, 4)
    dx, dA, dB, dbias = case.backward(S)
    assert dx.shape == (0, 40)
    for t in (dA, dB, dbias):
        assert t.dtype == FP32 and (t == 0).all()


def test_rejects_unsupported_arguments():
    case = Case(3, 40, 17, 4, FP32, FP32, 0.1, False, False, "nf4", 64)
    w = case.weight()
    args = dict(A=case.A, B=case.B, scale=1.0, p=0.1, seed=1, **w)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        kl.lora_forward(case.x.double(), **args)
    with pytest.raises(TypeError, match="lora_A must be a float16, bfloat16 or float32"):
        kl.lora_forward(case.x, **dict(args, A=case.A.double()))
    with pytest.raises(ValueError, match=r"lora_A must be \[r, K=40\]"):
        kl.lora_forward(case.x, **dict(args, A=case.A[:, :39]))
    with pytest.raises(ValueError, match=r"lora_B must be \[N=17, r=4\]"):
        kl.lora_forward(case.x, **dict(args, B=case.B[:, :3]))
    with pytest.raises(ValueError, match="dropout probability"):
        kl.lora_forward(case.x, **dict(args, p=1.0))
    with pytest.raises(ValueError, match="seed"):
        kl.lora_forward(case.x, **dict(args, seed=1.5))
    S = torch.zeros(3, 4)
    back = dict(args, needs=(True, True, True, True))
    with pytest.raises(ValueError, match="S must be the forward's float32"):
        kl.lora_backward(case.dy, case.x, S.half(), **back)
    with pytest.raises(ValueError, match="x has 2 rows, dy 3"):
        kl.lora_backward(case.dy, case.x[:2], S, **back)
    dx_w = dict(packed=w["packed"], code=w["code"], absmax=w["absmax"], N=17, K=40, blocksize=64)
    with pytest.raises(ValueError, match="pass both lora_ds and lora_a"):
        mm.nf4_matmul_dx(case.dy, lora_ds=S, **dx_w)
    with pytest.raises(ValueError, match=r"lora_ds must be \[M=3, r\] and lora_a \[r, K=40\]"):
        mm.nf4_matmul_dx(case.dy, lora_ds=S, lora_a=case.A[:3], **dx_w)
    with pytest.raises(ValueError, match="dropout probability"):
        mm.nf4_matmul_dx(case.dy, lora_ds=S, lora_a=case.A, lora_p=-0.1, **dx_w)


def test_compile_specs_cover_every_kernel():
    specs = [s if isinstance(s, dict) else vars(s) for s in kl.COMPILE_SPECS]
    names = [s["name"] for s in specs]
    assert len(names) == len(set(names))
    for s in specs:
        assert list(s["signature"]) == list(s["fn"].arg_names)
        assert {n for n, t in s["signature"].items() if t == "constexpr"} == set(s["constexprs"])
    kernels = {s["fn"] for s in specs}
    assert kernels == {kl._lora_s_kernel, kl._lora_dy_kernel, kl._lora_da_kernel,
                       kl._keep_mask_kernel}
    for fn in (kl._lora_s_kernel, kl._lora_dy_kernel, kl._lora_da_kernel):
        acts = {s["signature"].get("x_ptr", s["signature"].get("dy_ptr")) for s in specs
                if s["fn"] is fn}
        assert acts == {"*fp16", "*bf16", "*fp32"}
    dx_lora = [vars(s) if not isinstance(s, dict) else s for s in mm.COMPILE_SPECS]
    dx_lora = [s for s in dx_lora if s["fn"] is mm._nf4_gemm_dx_kernel and s["constexprs"]["HAS_LORA"]]
    assert {s["signature"]["dy_ptr"] for s in dx_lora} == {"*fp16", "*bf16", "*fp32"}
