"""nf4_linear (y = x W_hat^T + b, gradients to x and bias) against the float64 reference.

Every case draws fresh data from a torch.Generator, quantizes it with nf4kern, and compares the
forward output, dX and dbias with nf4kern.reference (float64 products of the exact float32
dequantized weight). Two bounds per tensor:

  * RMS ratio ||ref - out|| / ||ref|| below a dtype-specific bound;
  * elementwise |ref - out| <= ELEM_TOL * (|a| @ |B| + |bias|), the size of the terms summed
    (one rounding of the operands to the compute dtype and one of the result).

Backends: "torch" (the CPU path) on every case; "triton" (the interpreter) on a few small cases
(tests/test_kernels_matmul.py tests the kernels in depth).
"""
from __future__ import annotations

import pytest
import torch

import nf4kern
from nf4kern import matmul as nf4_matmul_ops
from nf4kern import reference, torch_ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RMS_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ELEM_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}

# (leading dims of x without K, N, K, blocksize). K = 96, 130, 200 with blocksize 64 do not hold
# whole blocks, so blocks straddle rows; K = 97 makes the element count odd (a padding nibble);
# K = 256 / 512 hold whole blocks (the small-M CPU fast path takes those).
SHAPES = [
    ((1,), 17, 96, 64),
    ((3,), 33, 130, 64),
    ((17,), 17, 200, 64),
    ((64,), 33, 96, 64),
    ((65,), 17, 130, 128),
    ((2, 3), 33, 200, 64),
    ((3, 1, 1), 17, 97, 64),
    ((1,), 33, 256, 64),
    ((2,), 17, 512, 128),
    ((4,), 33, 256, 32),
    ((2, 2), 17, 256, 64),
    ((5,), 33, 128, 64),
]


def _rms_ratio(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_close(out, ref, magnitude, dtype, what):
    """RMS-ratio and elementwise bounds; magnitude = |a| @ |B| (+ |bias|) in float64."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    ratio = _rms_ratio(out, ref)
    assert ratio < RMS_TOL[dtype], f"{what}: RMS ratio {ratio:.3g} >= {RMS_TOL[dtype]:g} ({dtype})"
    err = (out.double() - ref).abs()
    bound = ELEM_TOL[dtype] * magnitude + 1e-30
    worst = int((err / bound).argmax())
    assert bool((err <= bound).all()), (
        f"{what}: |ref - out| {err.reshape(-1)[worst]:.3g} > {bound.reshape(-1)[worst]:.3g} at flat index {worst} ({dtype})"
    )


def _weight(N, K, blocksize, quant_type, double_quant, gen, storage=torch.uint8):
    # Rows of different magnitude, so the block scales differ.
    w = torch.randn(N, K, generator=gen) * (0.01 + 0.05 * torch.rand(N, 1, generator=gen))
    packed, state = nf4kern.quantize_4bit(w, blocksize, quant_type, double_quant, quant_storage=storage)
    return packed, state, reference.dequantized_weight(packed, state)


def _check_linear(lead, N, K, blocksize, quant_type, double_quant, dtype, with_bias, backend, gen):
    packed, state, w_hat = _weight(N, K, blocksize, quant_type, double_quant, gen)
    x = torch.randn(*lead, K, generator=gen).to(dtype).requires_grad_()
    bias = (torch.randn(N, generator=gen) * 0.1).to(dtype).requires_grad_() if with_bias else None
    x_before = x.detach().clone()

    y = nf4kern.nf4_linear(x, packed, bias, state, backend=backend)
    assert y.shape == (*lead, N)
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(dy)

    x2 = x.detach().reshape(-1, K)
    dy2 = dy.reshape(-1, N)
    ref_y = reference.matmul(x2, packed, state, bias)
    mag_y = x2.double().abs() @ w_hat.abs().T
    if with_bias:
        mag_y = mag_y + bias.detach().double().abs()
    what = f"{backend} {quant_type} dq={double_quant} x{tuple(x.shape)} W[{N},{K}] bs={blocksize}"
    assert_close(y.detach().reshape(-1, N), ref_y, mag_y, dtype, f"forward, {what}")

    ref_dx = reference.matmul_dx(dy2, packed, state)
    assert x.grad is not None and x.grad.shape == x.shape
    assert_close(x.grad.reshape(-1, K), ref_dx, dy2.double().abs() @ w_hat.abs(), dtype, f"dX, {what}")

    if with_bias:
        ref_db = dy2.double().sum(0)
        assert_close(bias.grad, ref_db, dy2.double().abs().sum(0), dtype, f"dbias, {what}")
    assert torch.equal(x.detach().view(torch.uint8), x_before.view(torch.uint8)), "x was modified"


# -- the torch (CPU) backend: every shape, dtype, quant type, double quant and bias ------------


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x{}_N{}_K{}_bs{}".format("x".join(map(str, s[0])), *s[1:]))
def test_torch_backend(shape, dtype, quant_type, double_quant, with_bias, rng):
    lead, N, K, blocksize = shape
    _check_linear(lead, N, K, blocksize, quant_type, double_quant, dtype, with_bias, "torch", rng)


@pytest.mark.parametrize("native_bf16", [False, True])
@pytest.mark.parametrize("M", [1, 2, 4, 5, 64])
def test_torch_backend_both_bf16_choices(M, native_bf16, monkeypatch, rng):
    """bf16 activations take a bf16 product only where the CPU has native bf16 GEMM: check
    both choices (and the small-M paths) whatever this machine has."""
    monkeypatch.setattr(torch_ops, "native_bf16_matmul", lambda: native_bf16)
    _check_linear((M,), 33, 256, 64, "nf4", True, torch.bfloat16, True, "torch", rng)


@pytest.mark.parametrize("M", [1, 40])
def test_bf16_product_rounds_once_with_a_bias(M, monkeypatch, rng):
    """With native bf16 GEMM, y = x W_hat^T + b is rounded to bf16 once, bias included (bias
    added after a bf16 GEMM would round twice: ~28% of the outputs then differ by an ulp).
    Small M multiplies in float32 with the unrounded W_hat, large M in bf16."""
    monkeypatch.setattr(torch_ops, "native_bf16_matmul", lambda: True)
    N, K = 96, 16  # a short K: the float32 accumulation is exact, so one rounding is all there is
    w = torch.randn(N, K, generator=rng)
    packed, state = nf4kern.quantize_4bit(w, 64, "nf4", double_quant=True)
    x = torch.randn(M, K, generator=rng).bfloat16()
    bias = torch.randn(N, generator=rng).bfloat16()
    y = nf4kern.nf4_linear(x, packed, bias, state, backend="torch")
    product = torch.bfloat16 if M > torch_ops._FLOAT32_MAX_M else torch.float32
    w_hat = nf4kern.dequantize_4bit(packed, state, dtype=product).double()
    once = (x.double() @ w_hat.T + bias.double()).bfloat16()
    assert (y != once).float().mean().item() < 0.01


def test_only_bf16_at_large_m_uses_the_bf16_product(monkeypatch):
    monkeypatch.setattr(torch_ops, "native_bf16_matmul", lambda: True)
    large, small = torch_ops._FLOAT32_MAX_M + 1, torch_ops._FLOAT32_MAX_M
    assert torch_ops._compute_dtype(torch.bfloat16, large) == torch.bfloat16
    assert torch_ops._compute_dtype(torch.bfloat16, small) == torch.float32
    assert torch_ops._compute_dtype(torch.float16, large) == torch.float32
    monkeypatch.setattr(torch_ops, "native_bf16_matmul", lambda: False)
    assert torch_ops._compute_dtype(torch.bfloat16, large) == torch.float32


def test_torch_backend_large_k_small_m(rng):
    """A long K (many blocks per row) at small M."""
    for M, K in ((1, 4096), (3, 2048)):
        _check_linear((M,), 40, K, 64, "nf4", True, torch.float32, True, "torch", rng)


@pytest.mark.parametrize("M", [1, 3, 40])
@pytest.mark.parametrize("K,blocksize", [(70, 64), (96, 64), (130, 32), (256, 64)])
def test_torch_backend_many_row_chunks(M, K, blocksize, monkeypatch, rng):
    """The CPU path dequantizes W a row chunk at a time, each chunk starting on a block boundary;
    shrunk chunks make every shape take many of them, blocks straddling rows included (the
    growth with M is capped low too, so large M also splits)."""
    monkeypatch.setattr(torch_ops, "_CHUNK", 256)
    monkeypatch.setattr(torch_ops, "_GEMM_CHUNK_MAX", 2048)
    N = 37
    chunks, _ = torch_ops._row_chunks(N, K, blocksize, torch_ops._gemm_chunk(M, K, torch.float32))
    assert len(chunks) > 1 and all((r0 * K) % blocksize == 0 for r0, _ in chunks)
    _check_linear((M,), N, K, blocksize, "nf4", True, torch.float32, True, "torch", rng)


@pytest.mark.parametrize("K,blocksize", [(70, 64), (130, 32)])
def test_torch_backend_many_row_chunks_bf16_product(K, blocksize, monkeypatch, rng):
    """The bf16 product (native bf16 GEMM, M > 16) takes larger chunks: shrunk, so that it also
    splits W into many."""
    monkeypatch.setattr(torch_ops, "native_bf16_matmul", lambda: True)
    monkeypatch.setattr(torch_ops, "_GEMM_CHUNK_MAX", 1024)
    M, N = torch_ops._FLOAT32_MAX_M + 7, 37
    chunks, _ = torch_ops._row_chunks(N, K, blocksize, torch_ops._gemm_chunk(M, K, torch.bfloat16))
    assert len(chunks) > 1 and all((r0 * K) % blocksize == 0 for r0, _ in chunks)
    _check_linear((M,), N, K, blocksize, "nf4", True, torch.bfloat16, True, "torch", rng)


@pytest.mark.parametrize("native_bf16", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("K,blocksize,blocks_a_chunk", [(128, 64, 1), (96, 32, 2), (192, 64, 2)])
def test_torch_backend_dx_by_column_chunks(K, blocksize, blocks_a_chunk, quant_type, native_bf16, monkeypatch, rng):
    """A large M x K takes dx a column chunk of W at a time (no accumulation into dx): lowered
    thresholds make these small shapes take it, a block column or two a chunk (the last one
    partial where two do not divide K)."""
    monkeypatch.setattr(torch_ops, "native_bf16_matmul", lambda: native_bf16)
    monkeypatch.setattr(torch_ops, "_DX_COLUMNS_MIN", 0)
    monkeypatch.setattr(torch_ops, "_DX_COLUMN_CHUNK", 37 * blocksize * blocks_a_chunk)
    chunks = []
    dequantize_columns = torch_ops.dequantize_columns
    monkeypatch.setattr(torch_ops, "dequantize_columns", lambda *a: chunks.append(a[4:6]) or dequantize_columns(*a))
    M = torch_ops._FLOAT32_MAX_M + 23
    _check_linear((M,), 37, K, blocksize, quant_type, True, torch.bfloat16, True, "torch", rng)
    assert len(chunks) > 1 and chunks[0][0] == 0 and chunks[-1][1] == K


def test_torch_backend_dx_columns_need_whole_blocks_per_row(monkeypatch):
    """K not a multiple of the blocksize (blocks straddle rows): dx stays on row chunks."""
    monkeypatch.setattr(torch_ops, "_DX_COLUMNS_MIN", 0)
    monkeypatch.setattr(torch_ops, "dequantize_columns", lambda *a: pytest.fail("column chunks for K % blocksize != 0"))
    w = torch.randn(9, 70)
    packed, state = nf4kern.quantize_4bit(w, 64, "nf4", True)
    dy = torch.randn(3, 9)
    dx = nf4kern.matmul.nf4_matmul_dx(dy, packed, state, backend="torch")
    ref = reference.matmul_dx(dy, packed, state)
    assert ((dx.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_zero_weight_blocks_and_zero_input(rng):
    """All-zero weight rows (absmax 0, and with double quant nested codes of the offset) and
    an all-zero x row give the reference's result."""
    w = torch.randn(17, 128, generator=rng) * 0.02
    w[3] = 0.0
    w[10, :64] = 0.0
    for double_quant in (False, True):
        packed, state = nf4kern.quantize_4bit(w, 64, "nf4", double_quant)
        x = torch.randn(3, 128, generator=rng)
        x[1] = 0.0
        y = nf4kern.nf4_linear(x, packed, None, state)
        ref = reference.matmul(x, packed, state)
        assert _rms_ratio(y, ref) < RMS_TOL[torch.float32]
        assert torch.all(y[1] == 0)


# -- the triton backend under the interpreter: a few small cases -------------------------------


TRITON_CASES = [
    ((1,), 17, 130, 64, "nf4", True, torch.float32, True),
    ((3,), 33, 96, 64, "fp4", False, torch.bfloat16, False),
    ((2, 17), 17, 128, 64, "nf4", True, torch.float16, True),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"x{'x'.join(map(str, c[0]))}_N{c[1]}_K{c[2]}_{c[4]}_{str(c[6]).split('.')[-1]}")
def test_triton_backend(case, rng):
    lead, N, K, blocksize, quant_type, double_quant, dtype, with_bias = case
    _check_linear(lead, N, K, blocksize, quant_type, double_quant, dtype, with_bias, "triton", rng)


# -- autograd contract --------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
def test_nothing_activation_sized_is_saved(double_quant, rng):
    M, N, K = 37, 24, 192  # M appears in no weight shape
    packed, state, _ = _weight(N, K, 64, "nf4", double_quant, rng)
    weight_tensors = [packed, state.absmax]
    if double_quant:
        weight_tensors += [state.state2.absmax, state.offset]
    x = torch.randn(M, K, generator=rng, requires_grad=True)
    bias = torch.randn(N, generator=rng, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nf4kern.nf4_linear(x, packed, bias, state)
    y.sum().backward()
    assert saved, "nothing saved: the hook did not see the backward's inputs"
    for t in saved:
        assert M not in t.shape, f"a tensor of shape {tuple(t.shape)} (activation-sized) was saved"
        assert any(t.data_ptr() == w.data_ptr() and t.shape == w.reshape(t.shape).shape for w in weight_tensors), (
            f"saved a tensor that is not the weight's: {tuple(t.shape)} {t.dtype}"
        )
    assert any(t.data_ptr() == packed.data_ptr() for t in saved), "the packed weight was not saved"
    assert sum(t.numel() * t.element_size() for t in saved) <= sum(w.numel() * w.element_size() for w in weight_tensors)


def test_weight_gets_no_grad(rng):
    # A float storage dtype can require grad; nf4_linear must still treat the weight as frozen.
    packed, state, _ = _weight(16, 128, 64, "nf4", True, rng, storage=torch.bfloat16)
    packed.requires_grad_(True)
    before = packed.detach().clone()
    x = torch.randn(4, 128, generator=rng, requires_grad=True)
    y = nf4kern.nf4_linear(x, packed, None, state)
    y.sum().backward()
    assert packed.grad is None
    assert x.grad is not None
    assert torch.equal(packed.detach().view(torch.uint8), before.view(torch.uint8))


def test_no_grad_and_x_without_grad(rng):
    packed, state, _ = _weight(16, 128, 64, "nf4", False, rng)
    x = torch.randn(2, 128, generator=rng)
    with torch.no_grad():
        y0 = nf4kern.nf4_linear(x, packed, None, state)
    bias = torch.randn(16, generator=rng, requires_grad=True)
    y = nf4kern.nf4_linear(x, packed, bias, state)  # only bias needs a gradient
    assert not y0.requires_grad and y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((16,), 2.0))
    torch.testing.assert_close(y.detach(), y0 + bias.detach())


# -- errors -------------------------------------------------------------------------------------


@pytest.fixture
def small_weight(rng):
    packed, state, _ = _weight(8, 64, 64, "nf4", True, rng)
    return packed, state


@pytest.mark.parametrize("shape", [(2, 63), (2, 65), (64, 2), (0,)])
def test_wrong_last_dim(shape, small_weight):
    packed, state = small_weight
    with pytest.raises(ValueError, match="last dimension 64"):
        nf4kern.nf4_linear(torch.randn(shape), packed, None, state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_wrong_dtype(dtype, small_weight):
    packed, state = small_weight
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        nf4kern.nf4_linear(torch.ones(2, 64, dtype=dtype), packed, None, state)


def test_wrong_bias_shape(small_weight):
    packed, state = small_weight
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        nf4kern.nf4_linear(torch.randn(2, 64), packed, torch.randn(7), state)


def test_missing_quant_state(small_weight):
    packed, _ = small_weight
    with pytest.raises(ValueError, match="quant_state"):
        nf4kern.nf4_linear(torch.randn(2, 64), packed)


def test_wrong_device(small_weight):
    packed, state = small_weight
    # nf4_linear routes meta tensors to the op's fake kernel (tracing), so the device check is
    # exercised on the op layer below it; a real second device is used when there is one.
    with pytest.raises(ValueError, match="is on meta but the weight is on cpu"):
        nf4_matmul_ops.nf4_matmul(torch.randn(2, 64, device="meta"), packed, state)
    with pytest.raises(ValueError, match="is on meta but the weight is on cpu"):
        nf4_matmul_ops.nf4_matmul_dx(torch.randn(2, 8, device="meta"), packed, state)
    if torch.cuda.is_available():
        with pytest.raises((ValueError, RuntimeError)):
            nf4kern.nf4_linear(torch.randn(2, 64, device="cuda"), packed, None, state)
