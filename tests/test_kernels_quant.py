"""kernels/quant.py under the Triton interpreter against the float64 reference (nf4kern.reference).

Every output buffer is poisoned beforehand (bytes 0xAB, floats with a value no kernel writes), so
an element the kernel leaves unwritten shows as a mismatch. Floats are compared bit for bit, NaN
against NaN (compiled GPU kernels write canonical NaN payloads, torch 0x7FC0).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nf4kern
from nf4kern import codebook as cb
from nf4kern import reference
from nf4kern.kernels import quant
from tests.conftest import DTYPES

# numpy warns about the inf / NaN arithmetic the special-value tests make on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BLOCKSIZES = (32, 64, 256, 4096)
MIDDLE_BLOCKSIZES = (128, 512, 1024, 2048)  # fewer sizes: BLOCKSIZES take the full sweep
SMALL_SIZES = (1, 2, 3, 17, 65, 130, 1000)
POISON_BYTE = 0xAB
POISON_FLOAT = -12345.0  # exact in every float dtype; no absmax or dequantized value equals it


def _sizes(blocksize: int) -> list[int]:
    """Small odd sizes, sizes around one block, and sizes spanning several programs (full,
    unmasked programs plus a masked tail)."""
    per_program = max(blocksize, quant.ELEMS_PER_PROGRAM)
    around = [blocksize - 1, blocksize, blocksize + 1, 2 * blocksize + 3]
    many = [per_program, 2 * per_program + blocksize + 1] if blocksize < 4096 else [2 * per_program + 7]
    return sorted(set(SMALL_SIZES + tuple(around) + tuple(many)))


def _poisoned_bytes(n: int) -> torch.Tensor:
    return torch.full((n,), POISON_BYTE, dtype=torch.uint8)


def _poisoned(n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.full((n,), POISON_FLOAT, dtype=dtype)


def assert_same(got: torch.Tensor, want, what: str) -> None:
    """Bit-identical, except that NaN only has to meet NaN."""
    want = torch.as_tensor(want) if not isinstance(want, torch.Tensor) else want
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    if got.dtype.is_floating_point:
        gn, wn = torch.isnan(got), torch.isnan(want)
        bad = gn != wn
        ints = {2: torch.int16, 4: torch.int32}[got.element_size()]
        bad |= ~gn & ~wn & (got.view(ints) != want.view(ints))
    else:
        bad = got != want
    idx = bad.nonzero().reshape(-1)
    assert idx.numel() == 0, (
        f"{what}: {idx.numel()} of {got.numel()} elements differ, first at {idx[0].item()}: "
        f"got {got[idx[0]].item()!r}, want {want[idx[0]].item()!r}"
    )


def _random_weights(n: int, dtype, rng) -> torch.Tensor:
    """Gaussian values with a per-element scale spread over decades, plus some exact zeros."""
    scale = torch.exp(torch.randn(n, generator=rng) * 2.0)
    x = torch.randn(n, generator=rng) * scale
    x[torch.rand(n, generator=rng) < 0.05] = 0.0
    return x.to(dtype)


def check_quantize(x: torch.Tensor, blocksize: int, quant_type: str) -> reference.Quantized:
    """Quantize with the kernels (poisoned outputs) and compare with the reference; returns it."""
    n = x.numel()
    nblocks = -(-n // blocksize)
    packed_out, absmax_out = _poisoned_bytes((n + 1) // 2), _poisoned(nblocks)
    packed, absmax = quant.quantize_blocks(x, blocksize, quant_type, packed_out=packed_out, absmax_out=absmax_out)
    assert packed is packed_out and absmax is absmax_out
    ref = reference.quantize(x, blocksize, quant_type, double_quant=False)
    what = f"{quant_type} bs={blocksize} n={n} {x.dtype}"
    assert_same(packed, torch.from_numpy(ref.packed), f"packed ({what})")
    assert_same(absmax, torch.from_numpy(ref.absmax), f"absmax ({what})")
    return ref


def check_nested(absmax: torch.Tensor, offset: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    nb = absmax.numel()
    q_out, nested_out = _poisoned_bytes(nb), _poisoned(-(-nb // 256))
    q, nested = quant.quantize_nested(absmax, offset, qabsmax_out=q_out, nested_out=nested_out)
    assert q is q_out and nested is nested_out
    ref_q, ref_nested = reference.quantize_nested(absmax.numpy(), np.float32(offset.item()))
    assert_same(q, torch.from_numpy(ref_q), f"nested codes (B={nb})")
    assert_same(nested, torch.from_numpy(ref_nested), f"nested absmax (B={nb})")
    return ref_q, ref_nested


def check_dequantize(q: reference.Quantized, n: int, blocksize: int, quant_type: str, dtype) -> None:
    out = _poisoned(n, dtype)
    nested = {}
    if q.nested_absmax is not None:
        nested = dict(nested_absmax=torch.from_numpy(q.nested_absmax),
                      offset=torch.tensor(q.offset, dtype=torch.float32))
    got = quant.dequantize(torch.from_numpy(q.packed), torch.from_numpy(q.absmax), n, blocksize, quant_type,
                           dtype, out=out, **nested)
    assert got is out
    want = reference.dequantize(q, n, blocksize, quant_type, dtype)
    assert_same(got, want, f"dequantized ({quant_type} bs={blocksize} n={n} {dtype} nested={bool(nested)})")


# ------------------------------------------------------------------------------------------------
# Random data, every blocksize, dtype and quant type
# ------------------------------------------------------------------------------------------------


def check_round_trip(x: torch.Tensor, blocksize: int, quant_type: str) -> None:
    """quantize_blocks, quantize_nested and dequantize (plain and nested) against the reference."""
    n = x.numel()
    ref = check_quantize(x, blocksize, quant_type)
    absmax = torch.from_numpy(ref.absmax)
    offset = absmax.mean()
    ref_q, ref_nested = check_nested(absmax, offset)
    check_dequantize(ref, n, blocksize, quant_type, x.dtype)
    nested = reference.Quantized(ref.packed, ref_q, ref_nested, np.float32(offset.item()))
    check_dequantize(nested, n, blocksize, quant_type, x.dtype)


@pytest.mark.parametrize("quant_type", cb.QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_round_trip_matches_reference(blocksize, dtype, quant_type, rng):
    """Every size of _sizes(blocksize)."""
    for n in _sizes(blocksize):
        check_round_trip(_random_weights(n, dtype, rng), blocksize, quant_type)


@pytest.mark.parametrize("blocksize", MIDDLE_BLOCKSIZES)
def test_middle_blocksizes_round_trip(blocksize, rng):
    """A short odd count with a partial block, and one full program of ELEMS_PER_PROGRAM plus a
    masked tail of one block and one element; the dtype varies with the blocksize."""
    dtype = DTYPES[MIDDLE_BLOCKSIZES.index(blocksize) % len(DTYPES)]
    for n in (blocksize + 37, quant.ELEMS_PER_PROGRAM + blocksize + 1):
        x = _random_weights(n, dtype, rng)
        for quant_type in cb.QUANT_TYPES:
            check_round_trip(x, blocksize, quant_type)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", cb.QUANT_TYPES)
def test_dequantize_arbitrary_codes_and_scales(quant_type, dtype, rng):
    """Every byte value, every nested code, scales over many decades (products into the
    subnormal and overflow ranges of the output dtype), several nested blocks."""
    blocksize = 32
    for n in (1, 63, 64 * 300 + 31, 2 * quant.ELEMS_PER_PROGRAM + 33):
        nblocks = -(-n // blocksize)
        packed = torch.randint(0, 256, ((n + 1) // 2,), generator=rng, dtype=torch.uint8)
        absmax = torch.exp(torch.randn(nblocks, generator=rng) * 20).to(torch.float32)
        check_dequantize(reference.Quantized(packed.numpy(), absmax.numpy()), n, blocksize, quant_type, dtype)
        q = torch.randint(0, 256, (nblocks,), generator=rng, dtype=torch.uint8)
        nested = torch.exp(torch.randn(-(-nblocks // 256), generator=rng) * 3).to(torch.float32)
        offset = np.float32(torch.rand((), generator=rng).item() * 0.5)
        check_dequantize(reference.Quantized(packed.numpy(), q.numpy(), nested.numpy(), offset), n, blocksize,
                         quant_type, dtype)


def test_dequantize_with_a_code_table(rng):
    """dequantize_with_code decodes with the table it is given (the matmul kernels' form of the
    code): any 16 values, product with the scale rounded once; a bad table is refused."""
    n, blocksize = 64 * 5 + 7, 64
    packed = torch.randint(0, 256, ((n + 1) // 2,), generator=rng, dtype=torch.uint8)
    absmax = torch.rand(-(-n // blocksize), generator=rng) + 0.5
    code = torch.randn(16, generator=rng)
    out = torch.full((n,), float("nan"), dtype=torch.bfloat16)
    got = quant.dequantize_with_code(packed, code, absmax, n, blocksize, torch.bfloat16, out=out)
    nib = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()
    expect = (code[nib] * absmax.repeat_interleave(blocksize)[:n]).to(torch.bfloat16)
    assert got is out and torch.equal(got, expect)
    nf4 = torch.from_numpy(cb.codebook("nf4").copy())
    assert torch.equal(quant.dequantize_with_code(packed, nf4, absmax, n, blocksize, torch.float16),
                       quant.dequantize(packed, absmax, n, blocksize, "nf4", torch.float16))
    for bad in (code[:15], code.double()):
        with pytest.raises(ValueError, match="code must be 16 float32 values"):
            quant.dequantize_with_code(packed, bad, absmax, n, blocksize, torch.float32)


@pytest.mark.parametrize("quant_type", cb.QUANT_TYPES)
def test_public_api_with_double_quant_and_bf16_storage(quant_type, rng):
    """quantize_4bit / dequantize_4bit with backend="triton" give the bytes, state and values of
    the torch and reference backends."""
    x = _random_weights(6 * 130, torch.float16, rng).reshape(6, 130)  # 390 bytes: 195 bf16 words
    before = x.clone()
    packed, state = nf4kern.quantize_4bit(x, 128, quant_type, True, torch.bfloat16, backend="triton")
    assert packed.dtype == torch.bfloat16 and packed.shape == (195, 1) and state.nested
    for backend in ("torch", "reference"):
        other, other_state = nf4kern.quantize_4bit(x, 128, quant_type, True, torch.bfloat16, backend=backend)
        assert_same(packed.view(torch.uint8), other.view(torch.uint8), f"packed ({backend})")
        assert state == other_state, backend
        for dtype in (torch.float16, torch.bfloat16):
            got = nf4kern.dequantize_4bit(packed, state, dtype=dtype, backend="triton")
            want = nf4kern.dequantize_4bit(other, other_state, dtype=dtype, backend=backend)
            assert_same(got.reshape(-1), want.reshape(-1), f"dequantized {dtype} ({backend})")
    assert_same(x.reshape(-1), before.reshape(-1), "input")


# ------------------------------------------------------------------------------------------------
# Special values
# ------------------------------------------------------------------------------------------------


def _blocks(*blocks: list[float], blocksize: int = 32) -> torch.Tensor:
    out = []
    for b in blocks:
        b = list(b)
        assert len(b) <= blocksize
        out += b + [0.0] * (blocksize - len(b))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", cb.QUANT_TYPES)
def test_nonfinite_zero_and_tiny_blocks(quant_type, dtype, rng):
    """NaN blocks (absmax NaN, every code that of +1), +-inf blocks (absmax inf), all-zero and
    all -0.0 blocks, blocks of subnormals, values at +-absmax, then a partial odd block with NaN."""
    nan, inf = float("nan"), float("inf")
    tiny = 1e-7 if dtype == torch.float16 else float(np.float32(1e-40))  # subnormal in the dtype
    x = _blocks(
        [1.0, nan, -2.0, 3.0],
        [nan] * 32,
        [0.5, -inf, 0.25],
        [inf, 1.0, -1.0, 0.0],
        [],
        [-0.0] * 32,
        [tiny, -tiny, 2 * tiny, 0.0, -3 * tiny],
        [1.5, -1.5, 0.75, -0.75, 1.5],
        [-3.0, 3.0, -3.0, 0.1],
    ).to(dtype)
    x = torch.cat([x, torch.tensor([0.25, nan, -1.0], dtype=dtype)])  # partial last block, odd n
    for blocksize in (32, 64):
        ref = check_quantize(x, blocksize, quant_type)
        check_dequantize(ref, x.numel(), blocksize, quant_type, dtype)


@pytest.mark.parametrize("quant_type", cb.QUANT_TYPES)
def test_threshold_ties(quant_type):
    """Each decision threshold itself, its float32 neighbours, and their negatives, in blocks
    whose absmax is 1.0 (so s == x exactly): ties go to the lower code (FP4: smaller magnitude)."""
    t = cb.nf4_thresholds() if quant_type == "nf4" else cb.FP4_MAGNITUDE_THRESHOLDS
    t = t.astype(np.float32)
    vals = np.concatenate([t, np.nextafter(t, np.float32(-2)), np.nextafter(t, np.float32(2))])
    vals = np.concatenate([vals, -vals, [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30]]).astype(np.float32)
    blocksize = 32
    rows = [list(vals[i:i + blocksize - 1]) + [1.0] for i in range(0, vals.size, blocksize - 1)]
    x = _blocks(*rows, blocksize=blocksize).to(torch.float32)
    ref = check_quantize(x, blocksize, quant_type)
    check_dequantize(ref, x.numel(), blocksize, quant_type, torch.float32)
    # Direct check of the rule: a threshold itself takes the lower code.
    if quant_type == "nf4":
        codes = np.stack([ref.packed >> 4, ref.packed & 15], 1).reshape(-1)
        at = np.asarray([codes[list(x.numpy()).index(float(v))] for v in t])
        assert (at == np.arange(15)).all()


def test_nested_special_blocks():
    """Nested quantization with a chosen offset: ties at the dynamic-map midpoints (nested absmax
    1.0, offset 0), a block equal to the offset (nested 0 -> code 0), a NaN, an inf, a nested
    absmax so small its reciprocal overflows, and a partial last block."""
    dyn = cb.dynamic_map()
    mids = ((dyn[:-1] + dyn[1:]) / np.float32(2)).astype(np.float32)
    ties = np.concatenate([mids, np.nextafter(mids, np.float32(-2)), np.nextafter(mids, np.float32(2))])
    ties = np.concatenate([ties, [1.0, -1.0, 0.0]]).astype(np.float32)
    offset = torch.tensor(0.0)
    for chunk in range(0, ties.size, 255):  # one 256-block per chunk, each holding 1.0
        block = np.concatenate([ties[chunk:chunk + 255], [1.0]]).astype(np.float32)
        check_nested(torch.from_numpy(block), offset)

    tiny = np.float32(2.0 ** -140)  # subnormal: 1 / tiny overflows float32
    blocks = [
        np.full(256, 0.375, np.float32),  # == offset: nested 0
        np.r_[np.full(255, 0.5, np.float32), np.float32("nan")],
        np.r_[np.full(255, 0.5, np.float32), np.float32("inf")],
        np.r_[np.full(250, 0.375, np.float32), 0.375 + tiny, 0.375 - tiny, np.full(4, 0.375, np.float32)],
        np.linspace(0.0, 2.0, 100, dtype=np.float32),  # partial last block
    ]
    check_nested(torch.from_numpy(np.concatenate(blocks).astype(np.float32)), torch.tensor(0.375))
    # The tiny block on its own offset: centred values +-tiny and 0.
    check_nested(torch.from_numpy(np.array([tiny, -tiny, 0.0, tiny], np.float32)), torch.tensor(0.0))


@pytest.mark.parametrize("quant_type", cb.QUANT_TYPES)
def test_output_rounding_ties_and_overflow(quant_type):
    """Products exactly halfway between two bf16 values round to even (down and up), one above
    halfway rounds up, and 65520 (halfway to fp16 overflow) becomes inf in fp16: the single RNE
    cast of the reference. Code +1.0 times the scale is the scale itself."""
    j = int(np.argmax(cb.codebook(quant_type)))  # the code of +1.0
    bits = np.array([0x3F808000, 0x3F818000, 0x3F80C000, 0x477FF000, 0xBF808000], np.uint32)
    absmax = bits.view(np.float32)
    blocksize = 32
    packed = np.full(absmax.size * blocksize // 2, (j << 4) | j, np.uint8)
    q = reference.Quantized(packed, absmax)
    for dtype in DTYPES:
        check_dequantize(q, absmax.size * blocksize, blocksize, quant_type, dtype)


# ------------------------------------------------------------------------------------------------
# Layout of inputs and outputs, argument checks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_and_misaligned_inputs(dtype, rng):
    """A transposed matrix is quantized in logical order; a view starting at an odd element
    (not pair-aligned) is handled; both match the reference."""
    w = _random_weights(33 * 65, dtype, rng).reshape(33, 65)
    check_quantize(w.t(), 64, "nf4")
    flat = _random_weights(4097, dtype, rng)
    check_quantize(flat[1:], 64, "nf4")
    check_quantize(flat[1:].reshape(64, 64), 32, "fp4")


def test_dequantize_rejects_misaligned_out_and_bad_arguments(rng):
    x = _random_weights(64, torch.float32, rng)
    packed, absmax = quant.quantize_blocks(x, 64, "nf4")
    buf = torch.empty(65, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="even element offset"):
        quant.dequantize(packed, absmax, 64, 64, "nf4", torch.bfloat16, out=buf[1:])
    with pytest.raises(ValueError):
        quant.dequantize(packed, absmax, 64, 48, "nf4", torch.float32)
    with pytest.raises(ValueError):
        quant.dequantize(packed, absmax, 64, 64, "int4", torch.float32)
    with pytest.raises(ValueError):
        quant.dequantize(packed, absmax, 64, 64, "nf4", torch.float64)
    with pytest.raises(ValueError):
        quant.dequantize(packed, absmax.to(torch.uint8), 64, 64, "nf4", torch.float32)  # codes without nested
    with pytest.raises(ValueError):
        quant.quantize_blocks(x.double(), 64, "nf4")
    with pytest.raises(ValueError):
        quant.quantize_blocks(x, 64, "nf4", packed_out=torch.empty(31, dtype=torch.uint8))
    with pytest.raises(ValueError):
        quant.quantize_nested(absmax, torch.tensor(0.0, dtype=torch.float64))


def test_default_outputs_and_shapes(rng):
    """Without out buffers: fresh tensors of the documented shapes and dtypes; any input shape."""
    x = _random_weights(3 * 5 * 7, torch.bfloat16, rng).reshape(3, 5, 7)
    packed, absmax = quant.quantize_blocks(x, 32, "nf4")
    assert packed.shape == (53,) and packed.dtype == torch.uint8
    assert absmax.shape == (4,) and absmax.dtype == torch.float32
    q, nested = quant.quantize_nested(absmax, absmax.mean())
    assert q.shape == (4,) and q.dtype == torch.uint8 and nested.shape == (1,) and nested.dtype == torch.float32
    w = quant.dequantize(packed, q, 105, 32, "nf4", torch.float16, nested, absmax.mean())
    assert w.shape == (105,) and w.dtype == torch.float16
