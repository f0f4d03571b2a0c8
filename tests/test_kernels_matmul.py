"""The fused 4-bit matmuls (nf4kern.kernels.matmul) under the Triton interpreter, against the
float64 reference: y = x @ W_hat^T + bias and dx = dy @ W_hat with W_hat from
nf4kern.reference.dequantize.

Shapes are small but cover every path: M = 1 (GEMV), 2..64 (split-K GEMM, one M tile), > 64
(tiled GEMM, several M and N tiles); K odd, K not a multiple of the tile or of the blocksize
(blocks straddling rows), N odd; split-K taken and not; NF4 and FP4; plain and nested scales;
fp32, fp16 and bf16; bias and none. Every output buffer starts as NaN.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from nf4kern import codebook as cb
from nf4kern import reference as ref
from nf4kern.kernels import matmul as mm
from nf4kern.kernels.matmul import nf4_matmul, nf4_matmul_dx

# Elementwise: |out - ref| <= TOL * (|x| @ |W|^T + |bias|): one rounding of each weight to the
# operand dtype and one of the result, each at most eps/2 relative (fp32: accumulation order).
ELEM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# RMS error ratio ||out - ref|| / ||ref||.
RMS_TOL = {torch.float32: 2e-6, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}


class Weight:
    """A random [N, K] weight quantized by the reference, with the kernels' arguments."""

    def __init__(self, N, K, blocksize, quant_type, nested, gen, zero_rows=()):
        w = torch.randn(N, K, generator=gen) * (0.5 + torch.rand(N, 1, generator=gen))
        for r in zero_rows:  # all-zero blocks: absmax 0
            w[r] = 0.0
        self.N, self.K, self.blocksize = N, K, blocksize
        q = ref.quantize(w, blocksize, quant_type, nested)
        self.w_hat = ref.dequantize(q, N * K, blocksize, quant_type, torch.float32).reshape(N, K)
        self.packed = torch.from_numpy(q.packed.copy())
        self.code = torch.from_numpy(cb.codebook(quant_type).copy())
        if nested:
            self.absmax = None
            self.nested = (torch.from_numpy(q.absmax.copy()), torch.from_numpy(q.nested_absmax.copy()),
                           torch.tensor(np.float32(q.offset)), torch.from_numpy(cb.dynamic_map().copy()))
        else:
            self.absmax = torch.from_numpy(q.absmax.copy())
            self.nested = None

    def args(self):
        return dict(packed=self.packed, code=self.code, absmax=self.absmax, N=self.N, K=self.K,
                    blocksize=self.blocksize, nested=self.nested)


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def assert_matmul_close(out, a, b, bias=None, dtype=None, what=""):
    """out ~ a @ b (+ bias) in float64; the bound scales with |a| @ |b| per element."""
    dtype = dtype or out.dtype
    a64, b64 = a.double(), b.double()
    expect = a64 @ b64
    scale = a64.abs() @ b64.abs()
    if bias is not None:
        expect = expect + bias.double()
        scale = scale + bias.double().abs()
    got = out.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = (got - expect).abs()
    bound = ELEM_TOL[dtype] * scale + 1e-30
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: elementwise error {worst:.3g}x the bound"
    norm = expect.norm().item()
    if norm > 0:
        rms = ((got - expect).norm() / norm).item()
        assert rms <= RMS_TOL[dtype], f"{what}: RMS error ratio {rms:.3g}"


def _coarsest(dtype_a, dtype_b):
    """The looser tolerance of the operand dtype and the output dtype."""
    return max(dtype_a, dtype_b, key=lambda d: ELEM_TOL[d])


# (M, N, K, blocksize, quant_type, nested, dtype, bias). K % blocksize != 0 straddles rows.
FORWARD_CASES = [
    (1, 33, 130, 32, "nf4", False, torch.float32, True),    # GEMV, straddling blocks
    (1, 17, 200, 64, "fp4", True, torch.bfloat16, False),   # GEMV, straddling, nested
    (1, 33, 128, 64, "nf4", True, torch.float16, True),     # GEMV, one scale per row
    (1, 17, 97, 64, "nf4", False, torch.float32, False),    # GEMV, odd K
    (1, 17, 512, 64, "nf4", True, torch.bfloat16, True),    # GEMV, split-K
    (3, 17, 96, 64, "nf4", True, torch.float16, True),      # split-K GEMM path, straddling
    (3, 33, 512, 32, "fp4", False, torch.bfloat16, False),  # split-K taken, M = 3
    (17, 33, 130, 32, "fp4", False, torch.bfloat16, True),
    (17, 17, 97, 32, "nf4", True, torch.float32, True),     # odd K
    (64, 33, 200, 64, "nf4", True, torch.float16, False),
    (64, 17, 256, 64, "fp4", True, torch.float32, True),
    (65, 17, 96, 32, "fp4", True, torch.bfloat16, True),    # tiled GEMM
    (65, 33, 97, 64, "nf4", True, torch.float16, False),    # tiled GEMM, odd K
    (130, 33, 200, 64, "nf4", False, torch.float32, True),  # 2 M tiles
    (70, 17, 128, 64, "nf4", False, torch.bfloat16, True),  # tiled GEMM, one scale per row
]


@pytest.mark.parametrize("M,N,K,blocksize,quant_type,nested,dtype,bias", FORWARD_CASES)
def test_forward(M, N, K, blocksize, quant_type, nested, dtype, bias, rng):
    w = Weight(N, K, blocksize, quant_type, nested, rng, zero_rows=(1,))
    x = torch.randn(M, K, generator=rng).to(dtype)
    b = (torch.randn(N, generator=rng) * 0.5).to(dtype) if bias else None
    out = _poisoned((M, N), dtype)
    y = nf4_matmul(x, bias=b, out=out, **w.args())
    assert y is out and y.dtype == dtype and y.shape == (M, N)
    assert_matmul_close(y, x, w.w_hat.T, b, what=f"y M={M}")


# (M, N, K, blocksize, quant_type, nested, dtype)
DX_CASES = [
    (1, 33, 130, 32, "nf4", False, torch.float32),
    (1, 17, 200, 64, "fp4", True, torch.bfloat16),
    (3, 17, 96, 64, "nf4", True, torch.float16),
    (3, 520, 64, 64, "nf4", True, torch.bfloat16),   # split-K over N taken
    (17, 33, 97, 64, "nf4", True, torch.bfloat16),   # odd K
    (64, 33, 200, 64, "fp4", False, torch.float16),
    (65, 17, 130, 32, "nf4", True, torch.bfloat16),  # tiled GEMM, straddling
    (65, 33, 97, 32, "fp4", False, torch.float32),   # tiled GEMM, odd K
    (130, 17, 128, 64, "nf4", True, torch.float16),  # 2 M tiles, 2 K tiles, one scale per row
]


@pytest.mark.parametrize("M,N,K,blocksize,quant_type,nested,dtype", DX_CASES)
def test_dx(M, N, K, blocksize, quant_type, nested, dtype, rng):
    w = Weight(N, K, blocksize, quant_type, nested, rng, zero_rows=(0,))
    dy = torch.randn(M, N, generator=rng).to(dtype)
    out = _poisoned((M, K), dtype)
    dx = nf4_matmul_dx(dy, out=out, **w.args())
    assert dx is out and dx.shape == (M, K)
    assert_matmul_close(dx, dy, w.w_hat, what=f"dx M={M}")


def test_many_tiles_grouped_order(rng):
    """Several M and N tiles of the large GEMM (grouped program order), and of dx."""
    w = Weight(300, 64, 64, "nf4", True, rng)
    x = torch.randn(260, 64, generator=rng).to(torch.float16)
    b = torch.randn(300, generator=rng).to(torch.float16)
    y = nf4_matmul(x, bias=b, out=_poisoned((260, 300), torch.float16), **w.args())
    assert_matmul_close(y, x, w.w_hat.T, b, what="y")
    dy = torch.randn(260, 300, generator=rng).to(torch.float16)
    dx = nf4_matmul_dx(dy, out=_poisoned((260, 64), torch.float16), **w.args())
    assert_matmul_close(dx, dy, w.w_hat, what="dx")


@pytest.mark.parametrize("M", [1, 5, 70])
def test_out_dtype_and_strided_operands(M, rng):
    """bf16 activations with an fp32 result; x and out as non-contiguous views."""
    w = Weight(17, 64, 32, "nf4", False, rng)
    x = torch.randn(64, M, generator=rng).to(torch.bfloat16).T  # column-major view
    b = torch.randn(17, generator=rng)
    out_store = _poisoned((17, M), torch.float32)
    y = nf4_matmul(x, bias=b, out_dtype=torch.float32, out=out_store.T, **w.args())
    assert y.dtype == torch.float32 and y.data_ptr() == out_store.data_ptr()
    assert_matmul_close(y, x, w.w_hat.T, b, dtype=torch.bfloat16, what="y fp32 out")
    dy = torch.randn(M, 17, generator=rng).to(torch.bfloat16)
    dx = nf4_matmul_dx(dy, out_dtype=torch.float32, **w.args())
    assert dx.dtype == torch.float32
    assert_matmul_close(dx, dy, w.w_hat, dtype=torch.bfloat16, what="dx fp32 out")


def test_default_out_and_odd_element_count(rng):
    """N * K odd: the last byte holds a padding nibble; no out buffer given."""
    w = Weight(7, 33, 32, "fp4", True, rng)
    x = torch.randn(2, 33, generator=rng)
    assert_matmul_close(nf4_matmul(x, **w.args()), x, w.w_hat.T, what="y")
    dy = torch.randn(2, 7, generator=rng)
    assert_matmul_close(nf4_matmul_dx(dy, **w.args()), dy, w.w_hat, what="dx")


def test_empty_shapes(rng):
    w = Weight(5, 64, 64, "nf4", False, rng)
    assert nf4_matmul(torch.zeros(0, 64), **w.args()).shape == (0, 5)
    assert nf4_matmul_dx(torch.zeros(0, 5), **w.args()).shape == (0, 64)
    empty = dict(w.args(), N=0, packed=torch.zeros(0, dtype=torch.uint8), absmax=torch.zeros(0))
    assert nf4_matmul(torch.ones(3, 64), **empty).shape == (3, 0)
    dx = nf4_matmul_dx(torch.ones(3, 0), out=_poisoned((3, 64), torch.float32), **empty)
    assert (dx == 0).all()
    kzero = dict(w.args(), K=0, packed=torch.zeros(0, dtype=torch.uint8), absmax=torch.zeros(0))
    bias = torch.arange(5, dtype=torch.float32)
    y = nf4_matmul(torch.ones(2, 0), bias=bias, out=_poisoned((2, 5), torch.float32), **kzero)
    assert torch.equal(y, bias.expand(2, 5))


def test_rejects_bad_arguments(rng):
    w = Weight(5, 64, 64, "nf4", False, rng)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError):
        nf4_matmul(torch.randn(2, 63), **w.args())
    with pytest.raises(ValueError):
        nf4_matmul(x, **dict(w.args(), packed=w.packed[:-1]))
    with pytest.raises(ValueError):
        nf4_matmul(x, **dict(w.args(), absmax=w.absmax[:-1]))
    with pytest.raises(ValueError):
        nf4_matmul(x, **dict(w.args(), blocksize=48))
    with pytest.raises(ValueError):
        nf4_matmul(x, out=torch.empty(2, 5, dtype=torch.float16), **w.args())
    with pytest.raises(ValueError):
        nf4_matmul(x, bias=torch.zeros(4), **w.args())
    with pytest.raises(TypeError):
        nf4_matmul(x.to(torch.float64), **w.args())
    with pytest.raises(ValueError):
        nf4_matmul_dx(torch.randn(2, 6), **w.args())


def test_config_choice():
    """Paths by M, the K step inside one block when rows hold whole blocks, split-K sizing."""
    cpu = torch.device("cpu")
    assert mm._pick("fwd", 16, torch.bfloat16, 4096, 64, cpu).block_m == 16
    assert mm._pick("fwd", 64, torch.bfloat16, 4096, 64, cpu).block_m == 64
    assert mm._pick("fwd", 65, torch.bfloat16, 4096, 64, cpu) == mm._TABLES[("fwd", "half")].large
    assert mm._pick("dx", 65, torch.float32, 4096, 64, cpu) == mm._TABLES[("dx", "fp32")].large
    assert mm._pick("fwd", 65, torch.float16, 4097, 64, cpu) == mm._TABLES[("fwd", "odd")].large
    assert mm._block_k_for(64, 32, 4096) == 32 and mm._block_k_for(64, 64, 4096) == 64
    assert mm._block_k_for(64, 64, 4100) == 64 and mm._block_k_for(128, 64, 40) == 64
    split, per = mm._split_for(tiles=64, red=4096, step=64, device=cpu)
    assert split > 1 and per % 64 == 0 and (split - 1) * per < 4096 <= split * per
    assert mm._split_for(tiles=10_000, red=4096, step=64, device=cpu)[0] == 1


def test_compile_specs_well_formed():
    """Each spec names a kernel, types every argument, and fixes every constexpr."""
    names = set()
    for spec in mm.COMPILE_SPECS:
        s = spec if isinstance(spec, dict) else vars(spec)
        assert s["name"] not in names
        names.add(s["name"])
        fn = s["fn"]
        assert list(s["signature"]) == list(fn.arg_names)
        const = {n for n, t in s["signature"].items() if t == "constexpr"}
        assert const == set(s["constexprs"])
        assert s["num_warps"] in (1, 2, 4, 8) and s["num_stages"] >= 1
    kernels = {(s if isinstance(s, dict) else vars(s))["fn"] for s in mm.COMPILE_SPECS}
    assert kernels == {mm._nf4_gemm_kernel, mm._nf4_gemm_dx_kernel, mm._nf4_gemv_kernel,
                       mm._splitk_reduce_kernel}
    assert any(s["name"] == "fwd_large_bf16_nested" and 90 in s["require_wgmma_on"]
               for s in (x if isinstance(x, dict) else vars(x) for x in mm.COMPILE_SPECS))


class _LaunchSpy:
    """Wraps a kernel to record the constexprs of each launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_paths_taken(monkeypatch, rng):
    """The cases above reach the paths they claim: GEMV vs GEMM by M, split-K, ROW_SCALE."""
    spies = {name: _LaunchSpy(getattr(mm, name)) for name in
             ("_nf4_gemv_kernel", "_nf4_gemm_kernel", "_nf4_gemm_dx_kernel", "_splitk_reduce_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(mm, name, spy)

    def run(M, N, K, blocksize, dx=False):
        for spy in spies.values():
            spy.launches.clear()
        w = Weight(N, K, blocksize, "nf4", True, rng)
        if dx:
            nf4_matmul_dx(torch.randn(M, N, generator=rng), **w.args())
        else:
            nf4_matmul(torch.randn(M, K, generator=rng), **w.args())
        return {name: spy.launches[0] for name, spy in spies.items() if spy.launches}

    got = run(1, 17, 512, 64)
    assert set(got) == {"_nf4_gemv_kernel", "_splitk_reduce_kernel"}
    assert got["_nf4_gemv_kernel"]["SPLIT_K"] == 2 and got["_nf4_gemv_kernel"]["ROW_SCALE"]
    got = run(1, 17, 200, 64)
    assert set(got) == {"_nf4_gemv_kernel"} and not got["_nf4_gemv_kernel"]["ROW_SCALE"]
    got = run(3, 33, 512, 32)
    assert got["_nf4_gemm_kernel"]["SPLIT_K"] == 4 and got["_nf4_gemm_kernel"]["BLOCK_M"] == 16
    got = run(65, 17, 96, 32)
    assert got["_nf4_gemm_kernel"]["SPLIT_K"] == 1 and got["_nf4_gemm_kernel"]["BLOCK_M"] == 128
    assert "_splitk_reduce_kernel" not in got
    got = run(3, 520, 64, 64, dx=True)
    assert got["_nf4_gemm_dx_kernel"]["SPLIT_K"] == 2 and "_splitk_reduce_kernel" in got
    got = run(17, 33, 97, 64, dx=True)
    assert not got["_nf4_gemm_dx_kernel"]["PAIRED"]


def _random_cases(n, seed):
    g = np.random.default_rng(seed)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for _ in range(n):
        M = int(g.choice([1, 2, 5, 16, 31, 33, 64, 65, 100]))
        N = int(g.integers(1, 80))
        K = int(g.integers(1, 300))
        yield (M, N, K, int(g.choice([32, 64, 128])), str(g.choice(["nf4", "fp4"])),
               bool(g.integers(2)), dtypes[int(g.integers(3))], bool(g.integers(2)))


@pytest.mark.parametrize("M,N,K,blocksize,quant_type,nested,dtype,bias", list(_random_cases(24, 7)))
def test_random_shapes(M, N, K, blocksize, quant_type, nested, dtype, bias, rng):
    """Forward and dx on random shapes (any parity, tiny K and N)."""
    w = Weight(N, K, blocksize, quant_type, nested, rng)
    x = torch.randn(M, K, generator=rng).to(dtype)
    b = torch.randn(N, generator=rng).to(dtype) if bias else None
    y = nf4_matmul(x, bias=b, out=_poisoned((M, N), dtype), **w.args())
    assert_matmul_close(y, x, w.w_hat.T, b, what="y")
    dy = torch.randn(M, N, generator=rng).to(dtype)
    dx = nf4_matmul_dx(dy, out=_poisoned((M, K), dtype), **w.args())
    assert_matmul_close(dx, dy, w.w_hat, what="dx")


_AOT_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from nf4kern.kernels.matmul import COMPILE_SPECS
    spec = next(s if isinstance(s, dict) else vars(s) for s in COMPILE_SPECS
                if (s if isinstance(s, dict) else vars(s))["name"] == "fwd_large_bf16_nested")
    src = ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec["attrs"])
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
                                "enable_fp_fusion": False})
    print("WGMMA" if "wgmma" in c.asm["ptx"] else "NO-WGMMA")
""")


def test_large_gemm_compiles_to_wgmma_on_sm90():
    """Ahead-of-time compile (no GPU needed) of the large-M GEMM for sm_90: its tl.dot is wgmma.
    Runs in a subprocess: under TRITON_INTERPRET=1 kernels cannot be compiled."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="0")
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("WGMMA") and "NO-WGMMA" not in r.stdout


# (M, N, K, r, dtype, lora_s dtype, lora_b dtype): GEMV, split-K GEMM, tiled GEMM; r padded to
# the r step, and r over several steps.
LORA_CASES = [
    (1, 33, 130, 8, torch.bfloat16, torch.float32, torch.bfloat16),
    (1, 17, 512, 70, torch.float32, torch.float32, torch.float32),     # GEMV split-K
    (3, 33, 512, 16, torch.bfloat16, torch.bfloat16, torch.bfloat16),  # split-K: added once
    (17, 17, 97, 40, torch.float16, torch.float32, torch.float16),     # odd K
    (70, 33, 128, 100, torch.bfloat16, torch.float32, torch.bfloat16), # tiled GEMM, 4 r steps
    (130, 17, 96, 8, torch.float32, torch.float32, torch.float32),
]


@pytest.mark.parametrize("M,N,K,r,dtype,s_dtype,b_dtype", LORA_CASES)
def test_lora_epilogue(M, N, K, r, dtype, s_dtype, b_dtype, rng):
    """y = x W_hat^T + bias + scale * S B^T, the LoRA term added before the single store."""
    w = Weight(N, K, 64, "nf4", True, rng)
    x = torch.randn(M, K, generator=rng).to(dtype)
    bias = torch.randn(N, generator=rng).to(dtype)
    S = torch.randn(M, r, generator=rng).to(s_dtype)
    B = (torch.randn(N, r, generator=rng) * 0.3).to(b_dtype)
    scale = 0.75
    y = nf4_matmul(x, bias=bias, out=_poisoned((M, N), dtype), lora_s=S, lora_b=B,
                   lora_scale=scale, **w.args())
    # As one product: [x, scale * S] @ [W_hat, B]^T.
    a = torch.cat([x.double(), scale * S.double()], dim=1)
    b = torch.cat([w.w_hat.double(), B.double()], dim=1)
    assert_matmul_close(y, a, b.T, bias, dtype=dtype, what="y + LoRA")


def test_lora_arguments(rng):
    w = Weight(5, 64, 64, "nf4", False, rng)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError):
        nf4_matmul(x, lora_s=torch.zeros(2, 4), **w.args())
    with pytest.raises(ValueError):
        nf4_matmul(x, lora_s=torch.zeros(2, 4), lora_b=torch.zeros(5, 3), **w.args())
    with pytest.raises(ValueError):
        nf4_matmul(x, lora_s=torch.zeros(3, 4), lora_b=torch.zeros(5, 4), **w.args())
    # r = 0 and K = 0 are handled.
    y = nf4_matmul(x, lora_s=torch.zeros(2, 0), lora_b=torch.zeros(5, 0), **w.args())
    assert_matmul_close(y, x, w.w_hat.T, what="r = 0")
    kzero = dict(w.args(), K=0, packed=torch.zeros(0, dtype=torch.uint8), absmax=torch.zeros(0))
    S, B = torch.randn(2, 3, generator=rng), torch.randn(5, 3, generator=rng)
    y = nf4_matmul(torch.ones(2, 0), lora_s=S, lora_b=B, lora_scale=2.0, **kzero)
    torch.testing.assert_close(y, 2.0 * S @ B.T)


# Autotuning. Timing needs a GPU; here a scripted clock stands in for do_bench, so the choice,
# the cache and every candidate's output are checked under the interpreter.
# (kind, M, N, K, dtype, nested, bias, LoRA rank)
TUNE_CASES = [
    ("fwd", 1, 17, 1024, torch.bfloat16, True, True, 0),    # GEMV, split-K sizes
    ("fwd", 17, 33, 1024, torch.float16, False, False, 8),  # split-K GEMM with LoRA
    ("fwd", 70, 33, 128, torch.bfloat16, True, True, 0),    # large M: table GEMM and alternates
    ("dx", 3, 1040, 64, torch.bfloat16, True, False, 0),    # split over N
    ("dx", 130, 17, 128, torch.float16, False, False, 0),   # large M
]


def _tuning_call(kind, M, N, K, dtype, nested, bias, r, w, rng):
    """A call of the case's kernel writing into a returned NaN-poisoned `out`, and the float64
    operands its result must match."""
    if kind == "dx":
        dy = torch.randn(M, N, generator=rng).to(dtype)
        out = _poisoned((M, K), dtype)
        return (lambda: nf4_matmul_dx(dy, out=out, **w.args())), out, (dy, w.w_hat, None)
    x = torch.randn(M, K, generator=rng).to(dtype)
    b = torch.randn(N, generator=rng).to(dtype) if bias else None
    S, B = torch.randn(M, r, generator=rng), torch.randn(N, r, generator=rng) * 0.3
    lora = dict(lora_s=S, lora_b=B, lora_scale=0.5) if r else {}
    out = _poisoned((M, N), dtype)
    a = torch.cat([x.double(), 0.5 * S.double()], dim=1)
    full = torch.cat([w.w_hat.double(), B.double()], dim=1)
    return (lambda: nf4_matmul(x, bias=b, out=out, **lora, **w.args())), out, (a, full.T, b)


@pytest.mark.parametrize("kind,M,N,K,dtype,nested,bias,r", TUNE_CASES)
def test_autotune_times_every_candidate_and_keeps_the_fastest(kind, M, N, K, dtype, nested, bias,
                                                               r, monkeypatch, rng):
    monkeypatch.setattr(mm, "_tuning_wanted", lambda device: True)
    monkeypatch.setattr(mm, "_TUNED", {})
    kernel = "_nf4_gemm_dx_kernel" if kind == "dx" else "_nf4_gemv_kernel" if M == 1 else "_nf4_gemm_kernel"
    spy = _LaunchSpy(getattr(mm, kernel))
    monkeypatch.setattr(mm, kernel, spy)
    w = Weight(N, K, 64, "nf4", nested, rng)
    call, out, (a, b, bias_t) = _tuning_call(kind, M, N, K, dtype, nested, bias, r, w, rng)
    candidates = mm._candidates(kind, M, N, K, dtype, 64, out.device, dense=dtype != torch.float32 and not r)
    assert (mm._DENSE in candidates) == (M > 64)
    assert len(candidates) >= 3 and len(set(candidates)) == len(candidates)
    # The clock makes the second candidate the fastest, so the choice is not the default.
    clock = iter([3.0, 1.0] + [2.0] * (len(candidates) - 2))
    outputs = []

    def time_ms(run):
        out.fill_(float("nan"))
        run()
        outputs.append(out.clone())
        return next(clock)

    monkeypatch.setattr(mm, "_time_ms", time_ms)
    call()
    assert len(outputs) == len(candidates)
    for c, got in zip(candidates, outputs):
        assert_matmul_close(got, a, b, bias_t, dtype=dtype, what=f"{kind} M={M} {c}")
    (key, best), = mm._TUNED.items()
    assert best == candidates[1]
    final = spy.launches[-1]
    assert final["SPLIT_K"] == mm._per_split(*((N, best.cfg.block_n) if kind == "dx" else
                                               (K, mm._block_k_for(best.cfg.block_k, 64, K))),
                                             best.split)[0]
    assert (final["BLOCK_N"], final["num_warps"], final["num_stages"]) == \
        (best.cfg.block_n, best.cfg.num_warps, best.cfg.num_stages)
    assert_matmul_close(out, a, b, bias_t, dtype=dtype, what="tuned call")
    # Cached: the next call of the same bucket runs the winner untimed.
    monkeypatch.setattr(mm, "_time_ms", lambda run: pytest.fail("timed twice"))
    n_launches = len(spy.launches)
    call()
    assert len(spy.launches) == n_launches + 1 and spy.launches[-1] == final


def test_autotune_cache_keys_and_single_candidates(monkeypatch, rng):
    """M shares a tuning result within a power-of-two bucket; a shape with one candidate (fp32
    large M has no alternates) is never timed."""
    monkeypatch.setattr(mm, "_tuning_wanted", lambda device: True)
    monkeypatch.setattr(mm, "_TUNED", {})
    timed = []
    monkeypatch.setattr(mm, "_time_ms", lambda run: timed.append(run) or float(len(timed)))
    w = Weight(33, 1024, 64, "nf4", True, rng)
    for M in (17, 20, 32):
        nf4_matmul(torch.randn(M, 1024, generator=rng, dtype=torch.bfloat16), **w.args())
    expected = mm._candidates("fwd", 17, 33, 1024, torch.bfloat16, 64, torch.device("cpu"))
    assert len(mm._TUNED) == 1 and len(timed) == len(expected) > 1
    nf4_matmul(torch.randn(33, 1024, generator=rng, dtype=torch.bfloat16), **w.args())
    assert len(mm._TUNED) == 2
    n = len(timed)
    nf4_matmul(torch.randn(70, 1024, generator=rng), **w.args())  # fp32, M > 64
    assert len(timed) == n and len(mm._TUNED) == 2


def test_autotune_off_switches(monkeypatch):
    """Tuning runs on CUDA only, never under the interpreter, with NF4KERN_AUTOTUNE=0 or under
    torch.use_deterministic_algorithms(True)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not mm._tuning_wanted(cuda)  # the interpreter
    monkeypatch.setattr(mm, "_interpreting", lambda: False)
    monkeypatch.delenv("NF4KERN_AUTOTUNE", raising=False)
    assert mm._tuning_wanted(cuda) and not mm._tuning_wanted(cpu)
    monkeypatch.setenv("NF4KERN_AUTOTUNE", "0")
    assert not mm._tuning_wanted(cuda)
    monkeypatch.setenv("NF4KERN_AUTOTUNE", "1")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not mm._tuning_wanted(cuda)
    finally:
        torch.use_deterministic_algorithms(was)


def test_split_candidates():
    """The heuristic split first, then each power of two that leaves every split >= 4 steps."""
    cpu = torch.device("cpu")
    assert mm._split_sizes(tiles=1, red=1024, step=64, device=cpu) == [4, 1, 2]
    assert mm._split_sizes(tiles=10_000, red=4096, step=64, device=cpu) == [1, 2, 4, 8, 16]
    assert mm._split_sizes(tiles=1, red=128, step=64, device=cpu) == [1]
    for red, step, split in ((1000, 64, 3), (4096, 64, 16), (64, 64, 2), (0, 64, 1)):
        n, per = mm._per_split(red, step, split)
        assert per % step == 0 and n <= split and (n - 1) * per < max(red, 1) and red <= n * per


def test_autotune_skips_a_candidate_the_gpu_cannot_launch(monkeypatch, rng):
    """A candidate over a smaller GPU's shared-memory limit is passed over, not fatal."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(mm, "_tuning_wanted", lambda device: True)
    monkeypatch.setattr(mm, "_TUNED", {})
    calls = []

    def time_ms(run):
        calls.append(run)
        if len(calls) == 1:  # the fastest on paper, but too large for this GPU
            raise OutOfResources(200_000, 101_376, "shared memory")
        run()
        return float(len(calls))

    monkeypatch.setattr(mm, "_time_ms", time_ms)
    w = Weight(33, 1024, 64, "nf4", True, rng)
    x = torch.randn(17, 1024, generator=rng, dtype=torch.bfloat16)
    y = nf4_matmul(x, **w.args())
    candidates = mm._candidates("fwd", 17, 33, 1024, torch.bfloat16, 64, x.device)
    assert len(calls) == len(candidates) and list(mm._TUNED.values()) == [candidates[1]]
    assert_matmul_close(y, x, w.w_hat.T, what="after a failed candidate")


@pytest.mark.parametrize("kind,bias", [("fwd", True), ("fwd", False), ("dx", False)])
def test_autotune_may_keep_dequantize_then_gemm(kind, bias, monkeypatch, rng):
    """At large M the unfused dequantize + torch GEMM is a candidate (fp16/bf16, no LoRA); kept,
    it gives the product without any fused-kernel launch."""
    monkeypatch.setattr(mm, "_tuning_wanted", lambda device: True)
    monkeypatch.setattr(mm, "_TUNED", {})
    kernel = "_nf4_gemm_dx_kernel" if kind == "dx" else "_nf4_gemm_kernel"
    spy = _LaunchSpy(getattr(mm, kernel))
    monkeypatch.setattr(mm, kernel, spy)
    w = Weight(40, 130, 64, "fp4", True, rng)  # K straddles blocks: dense is the only alternative
    M, dtype = 70, torch.bfloat16
    if kind == "fwd":
        x = torch.randn(M, 130, generator=rng).to(dtype)
        b = torch.randn(40, generator=rng).to(dtype) if bias else None
        candidates = mm._candidates("fwd", M, 40, 130, dtype, 64, x.device, dense=True)
        times = iter([2.0, 1.0])
        monkeypatch.setattr(mm, "_time_ms", lambda run: run() or next(times))
        y = nf4_matmul(x, bias=b, out=_poisoned((M, 40), dtype), **w.args())
        assert_matmul_close(y, x, w.w_hat.T, b, what="dense forward")
    else:
        dy = torch.randn(M, 40, generator=rng).to(dtype)
        candidates = mm._candidates("dx", M, 40, 130, dtype, 64, dy.device, dense=True)
        times = iter([2.0, 1.0])
        monkeypatch.setattr(mm, "_time_ms", lambda run: run() or next(times))
        y = nf4_matmul_dx(dy, out=_poisoned((M, 130), dtype), **w.args())
        assert_matmul_close(y, dy, w.w_hat, what="dense dx")
    assert candidates == [candidates[0], mm._DENSE] and list(mm._TUNED.values()) == [mm._DENSE]
    assert len(spy.launches) == 1  # timing the fused candidate; the kept call launched none


def test_dequantize_then_gemm_only_where_it_rounds_as_the_fused_kernel(monkeypatch, rng):
    """Not offered with a LoRA epilogue, fp32 operands, an output dtype other than the input's,
    or a bias in another dtype: there the only candidate left is the fused GEMM, never timed."""
    monkeypatch.setattr(mm, "_tuning_wanted", lambda device: True)
    monkeypatch.setattr(mm, "_TUNED", {})
    monkeypatch.setattr(mm, "_time_ms", lambda run: pytest.fail("timed a single candidate"))
    w = Weight(40, 130, 64, "nf4", True, rng)
    x = torch.randn(70, 130, generator=rng, dtype=torch.bfloat16)
    lora = dict(lora_s=torch.randn(70, 4, generator=rng), lora_b=torch.randn(40, 4, generator=rng))
    nf4_matmul(x, **lora, **w.args())
    nf4_matmul(x.float(), **w.args())
    nf4_matmul(x, out_dtype=torch.float32, **w.args())
    nf4_matmul(x, bias=torch.zeros(40), **w.args())
    nf4_matmul_dx(torch.randn(70, 40, generator=rng, dtype=torch.bfloat16), out_dtype=torch.float32,
                  **w.args())
    assert mm._TUNED == {}


def test_tuning_report_names_each_kept_launch(monkeypatch, rng):
    monkeypatch.setattr(mm, "_tuning_wanted", lambda device: True)
    monkeypatch.setattr(mm, "_TUNED", {})
    times = iter([2.0, 1.0, 3.0] + [3.0, 3.0, 3.0, 1.0])
    monkeypatch.setattr(mm, "_time_ms", lambda run: run() or next(times))
    assert mm.tuning_report() == []
    w = Weight(40, 1024, 64, "nf4", True, rng)
    nf4_matmul(torch.randn(3, 1024, generator=rng, dtype=torch.bfloat16), **w.args())  # 3 split sizes
    nf4_matmul(torch.randn(70, 1024, generator=rng, dtype=torch.bfloat16), **w.args())  # 3 GEMMs, dense
    first, second = mm.tuning_report()
    split = mm._candidates("fwd", 3, 40, 1024, torch.bfloat16, 64, w.packed.device)[1].split
    assert first == f"fwd M <= 4, N = 40, K = 1024, blocksize 64, bfloat16: 16x64x64 tiles, 4 warps, 4 stages, split-K {split}"
    assert second == "fwd M <= 128, N = 40, K = 1024, blocksize 64, bfloat16: dequantize + torch GEMM"
