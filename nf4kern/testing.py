"""Property testing of 4-bit quantization: hypothesis strategies, a rigorous error bound, and
assertions for the invariants of the format.

Every helper takes the packed data and QuantState that a quantizer returned, so it can test
nf4kern or any implementation with the same calling convention::

    quantize(A, blocksize=..., quant_type=..., double_quant=...) -> (packed, state)
    dequantize(packed, state, dtype=...) -> tensor

Helpers that quantize accept `quantize=` / `dequantize=` callables (default: nf4kern's).
The derivation of the bound is in `error_bound` and in docs/format.md, section 9.

This module needs hypothesis, a test dependency of nf4kern (``pip install nf4kern[test]``).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

try:
    from hypothesis import strategies as st
except ImportError as _e:  # pragma: no cover - exercised by a test that hides hypothesis
    raise ImportError(
        "nf4kern.testing needs the 'hypothesis' package, a test dependency of nf4kern: "
        "pip install hypothesis (or nf4kern[test])"
    ) from _e

from . import codebook as cb
from .functional import dequantize_4bit, quantize_4bit

__all__ = [
    "FLOAT_DTYPES",
    "KINDS",
    "assert_monotone_codes",
    "assert_roundtrip_exact",
    "assert_scale_equivariance",
    "assert_within_bound",
    "blocksizes",
    "error_bound",
    "float_dtypes",
    "max_code_error",
    "max_nested_code_error",
    "quant_types",
    "reconstructed_absmax",
    "roundtrip_exact_applies",
    "scale_equivariance_applies",
    "shapes",
    "sqnr_db",
    "unpack_codes",
    "weights",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("normal", "heavy_tailed", "outlier", "constant_blocks", "mixed")

# float32(1e-38): a block absmax below it is replaced by it before the reciprocal is taken.
TINY_ABSMAX = float(np.float32(1e-38))
# |s - w/absmax| for the rounded, clamped scaled value s; covers the two float32 roundings of
# the reciprocal and of the product, including a subnormal reciprocal for absmax near 2**128.
_SCALED_SLACK = 2.0**-20
_U32 = 2.0**-24  # unit roundoff of float32
_SUB32 = 2.0**-149  # smallest float32 subnormal
# Relative slack on the final float64 sum, which is itself rounded.
_SUM_SLACK = 2.0**-40


# =============================================================================================
# Strategies
# =============================================================================================


def blocksizes() -> st.SearchStrategy[int]:
    """One of nf4kern.BLOCKSIZES (32 ... 4096); shrinks towards 32."""
    return st.sampled_from(cb.BLOCKSIZES)


def quant_types() -> st.SearchStrategy[str]:
    """"nf4" or "fp4"; shrinks towards "nf4"."""
    return st.sampled_from(cb.QUANT_TYPES)


def float_dtypes() -> st.SearchStrategy[torch.dtype]:
    """float32, float16 or bfloat16; shrinks towards float32."""
    return st.sampled_from(FLOAT_DTYPES)


# Sizes around block and byte boundaries, mixed into every dimension's draw.
_EDGE_SIZES = (1, 2, 3, 5, 7, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 127, 128, 129, 255, 257)


@st.composite
def shapes(draw, max_numel: int = 4096, min_dims: int = 1, max_dims: int = 3) -> tuple[int, ...]:
    """Tensor shapes of min_dims..max_dims dimensions, numel in [1, max_numel], with odd sizes
    and sizes next to block boundaries likely. Shrinks towards (1,)."""
    if not 1 <= min_dims <= max_dims:
        raise ValueError(f"need 1 <= min_dims <= max_dims, got {min_dims}, {max_dims}")
    if max_numel < 1:
        raise ValueError(f"max_numel must be >= 1, got {max_numel}")
    ndim = draw(st.integers(min_dims, max_dims))
    dims, budget = [], max_numel
    for _ in range(ndim):
        edges = [s for s in _EDGE_SIZES if s <= budget]
        size = draw(st.one_of(st.integers(1, budget), st.sampled_from(edges)))
        dims.append(size)
        budget //= size
    return tuple(dims)


@st.composite
def weights(
    draw,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
    kind: str | None = None,
    blocksize: int | None = None,
    max_numel: int = 4096,
    log2_scale: int | st.SearchStrategy[int] | None = None,
) -> torch.Tensor:
    """Finite float tensors to quantize.

    shape, dtype, kind: fixed when given, drawn otherwise (shapes(max_numel), float_dtypes(),
    one of KINDS). kind:

    * "normal": N(0, 1).
    * "heavy_tailed": Student-t with 1 (Cauchy), 2, 3 or 5 degrees of freedom.
    * "outlier": N(0, 1) with 1-4 elements replaced by +-10**2 .. +-10**5.
    * "constant_blocks": blocks (runs of `blocksize` elements) that are all zero, one constant,
      one magnitude with random signs, or N(0, 1); at least one zero and one constant block
      when there are two blocks or more.
    * "mixed": every block of a different kind (normal, Student-t, outlier, constant, zero),
      each kind present when there are five blocks or more.

    blocksize sets the runs of the block-structured kinds (drawn from blocksizes() if None);
    pass the blocksize you quantize with to make the runs coincide with the blocks.
    Everything is scaled by 2**log2_scale (an int, a strategy of ints, or None: then usually in
    [-10, 10] and sometimes across the dtype's whole exponent range, reaching subnormals, blocks
    below the tiny-absmax threshold 1e-38 and values that flush to zero) and clamped to a
    quarter of the dtype's largest finite value, so every value is finite.

    All randomness comes from hypothesis (a drawn seed feeds a torch.Generator), so examples
    shrink and replay: towards kind "normal", seed 0, scale 1 and small shapes.
    """
    shape = draw(shapes(max_numel)) if shape is None else tuple(int(d) for d in shape)
    dtype = draw(float_dtypes()) if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    kind = draw(st.sampled_from(KINDS)) if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    blocksize = draw(blocksizes()) if blocksize is None else blocksize
    seed = draw(st.integers(0, 2**32 - 1))
    if log2_scale is None:
        lo, hi = _EXTREME_LOG2_SCALES[dtype]
        log2_scale = draw(st.one_of(st.integers(-10, 10), st.integers(lo, hi)))
    elif isinstance(log2_scale, st.SearchStrategy):
        log2_scale = draw(log2_scale)
    n = math.prod(shape)
    gen = torch.Generator().manual_seed(seed)
    x = _generate(kind, n, blocksize, gen) * 2.0**log2_scale
    limit = torch.finfo(dtype).max / 4
    return x.clamp(-limit, limit).to(dtype).reshape(shape)


# Scales reaching below the smallest subnormal and up to (clamped) overflow, per dtype.
_EXTREME_LOG2_SCALES = {torch.float32: (-150, 124), torch.bfloat16: (-140, 124), torch.float16: (-28, 14)}


def _randn(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, generator=gen, dtype=torch.float64)


def _student_t(n: int, gen: torch.Generator) -> torch.Tensor:
    df = (1, 2, 3, 5)[int(torch.randint(0, 4, (), generator=gen))]
    chi2 = torch.randn(df, n, generator=gen, dtype=torch.float64).square().sum(0)
    return _randn(n, gen) / (chi2 / df).sqrt()


def _outliers(n: int, gen: torch.Generator) -> torch.Tensor:
    x = _randn(n, gen)
    count = min(n, int(torch.randint(1, 5, (), generator=gen)))
    where = torch.randperm(n, generator=gen)[:count]
    magnitude = 10.0 ** torch.randint(2, 6, (count,), generator=gen, dtype=torch.float64)
    sign = torch.randint(0, 2, (count,), generator=gen, dtype=torch.float64) * 2 - 1
    x[where] = sign * magnitude
    return x


def _constant(n: int, gen: torch.Generator, random_signs: bool) -> torch.Tensor:
    value = _randn(1, gen).abs() + 0.01
    if random_signs:
        return value * (torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1)
    return value.expand(n).clone() * (1 if bool(torch.randint(0, 2, (), generator=gen)) else -1)


# Per-block generators of the block-structured kinds.
_BLOCK_KINDS = {
    "normal": _randn,
    "heavy_tailed": _student_t,
    "outlier": _outliers,
    "constant": lambda n, gen: _constant(n, gen, random_signs=False),
    "constant_magnitude": lambda n, gen: _constant(n, gen, random_signs=True),
    "zero": lambda n, gen: torch.zeros(n, dtype=torch.float64),
}


def _generate(kind: str, n: int, blocksize: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return _randn(n, gen)
    if kind == "heavy_tailed":
        return _student_t(n, gen)
    if kind == "outlier":
        return _outliers(n, gen)
    nblocks = -(-n // blocksize)
    if kind == "constant_blocks":
        names = ("zero", "constant", "constant_magnitude", "normal")
        forced = ["zero", "constant"] if nblocks >= 2 else []
    else:  # mixed
        names = ("normal", "heavy_tailed", "outlier", "constant", "zero")
        forced = list(names) if nblocks >= len(names) else []
    picks = [names[int(i)] for i in torch.randint(0, len(names), (nblocks,), generator=gen)]
    if forced:  # the forced kinds go to random, distinct blocks
        for name, b in zip(forced, torch.randperm(nblocks, generator=gen)[: len(forced)].tolist()):
            picks[b] = name
    parts = [_BLOCK_KINDS[name](min(blocksize, n - b * blocksize), gen) for b, name in enumerate(picks)]
    return torch.cat(parts)


# =============================================================================================
# Decoding what a quantizer returned
# =============================================================================================


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes (int64) of packed data in any storage dtype; element 2j is the high
    nibble of byte j."""
    data = packed.detach().cpu().contiguous().view(torch.uint8).reshape(-1).long()
    if data.numel() != -(-n // 2):
        raise ValueError(f"packed data holds {data.numel()} bytes, {n} elements need {-(-n // 2)}")
    return torch.stack([data >> 4, data & 15], dim=1).reshape(-1)[:n]


def _code_values(packed: torch.Tensor, state) -> torch.Tensor:
    table = torch.from_numpy(cb.codebook(state.quant_type).astype(np.float64))
    return table[unpack_codes(packed, state.numel)]


def reconstructed_absmax(state) -> torch.Tensor:
    """The float32 block scales that dequantization multiplies by: state.absmax, or with
    double quantization float32(float32(dynamic_map[code] * nested_absmax) + offset)."""
    if not state.nested:
        return state.absmax.detach().cpu().float()
    dyn = torch.from_numpy(cb.dynamic_map().copy())
    nblocks = state.absmax.numel()
    nested = state.state2.absmax.detach().cpu().float().repeat_interleave(cb.NESTED_BLOCKSIZE)[:nblocks]
    offset = state.offset.detach().cpu().float().reshape(())
    return dyn[state.absmax.detach().cpu().long()] * nested + offset  # two float32 roundings


def _block_absmax(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Exact block absmax of w (float64 holding float32 values), [ceil(n / blocksize)]."""
    flat = w.detach().cpu().reshape(-1).double()
    nblocks = -(-flat.numel() // blocksize)
    padded = torch.zeros(nblocks * blocksize, dtype=torch.float64)
    padded[: flat.numel()] = flat
    return padded.view(nblocks, blocksize).abs().amax(dim=1)


def _check_pair(w: torch.Tensor, state) -> None:
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"w must be a float32/float16/bfloat16 tensor, got {getattr(w, 'dtype', type(w))}")
    if w.numel() != state.numel:
        raise ValueError(f"w has {w.numel()} elements, the quantization state describes {state.numel}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w has NaN or inf: the error bound covers finite inputs only")


# =============================================================================================
# The error bound
# =============================================================================================


def _decision_intervals(quant_type: str) -> list[tuple[float, float, float]]:
    """(lo, hi, value): every s in [lo, hi] (ends as closure of the half-open intervals) with
    s in [0, 1] for FP4 magnitudes or [-1, 1] for NF4, decodes to value."""
    if quant_type == "nf4":
        values = cb.nf4_codebook().astype(np.float64)
        edges = np.concatenate([[-1.0], cb.nf4_thresholds().astype(np.float64), [1.0]])
    else:  # magnitudes; the sign bit mirrors them exactly
        values = np.abs(cb.fp4_codebook()[cb.FP4_CODES_BY_MAGNITUDE].astype(np.float64))
        edges = np.concatenate([[0.0], cb.FP4_MAGNITUDE_THRESHOLDS.astype(np.float64), [1.0]])
    return [(edges[i], edges[i + 1], values[i]) for i in range(len(values))]


@functools.lru_cache(maxsize=None)
def max_code_error(quant_type: str) -> float:
    """sup over s in [-1, 1] of |s - value(code(s))| for the decision rule nf4kern implements.

    NF4: the thresholds are float32-rounded midpoints, so the answer is the larger side of the
    widest gap (codes 0/1: 0.15190...), not exactly half of it. FP4: the CUDA tree tests
    |s| > T with decimal literals that are not midpoints (0.00260417 is 14 ulp above 1/384,
    0.8333333 is 1 ulp below the float32 midpoint of 2/3 and 1), so each interval is measured at
    both of its ends; the worst is |s| just above 0.8333333, decoding to 1:
    1 - float32(0.8333333) = 0.16666669.
    """
    cb.check_quant_type(quant_type)
    return float(max(max(abs(lo - v), abs(hi - v)) for lo, hi, v in _decision_intervals(quant_type)))


@functools.lru_cache(maxsize=None)
def max_nested_code_error() -> float:
    """sup over s in [-1, 1] of |s - nearest dynamic-map entry| (float32 midpoints, exact
    nearest): 0.0070312..., reached at s = -1 (the map stops at -0.99296875) and in the widest
    gaps of the top decade."""
    dyn = cb.dynamic_map().astype(np.float64)
    mids = ((cb.dynamic_map()[:-1] + cb.dynamic_map()[1:]) / np.float32(2.0)).astype(np.float64)
    edges = np.concatenate([[-1.0], mids, [1.0]])
    return float(np.max(np.maximum(np.abs(edges[:-1] - dyn), np.abs(edges[1:] - dyn))))


def _half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of `dtype` at magnitude x (float64, >= 0): the largest error of a
    round-to-nearest cast to dtype whose result has magnitude <= x; inf once x passes the
    largest finite value of dtype, where the cast may overflow to inf."""
    fi = torch.finfo(dtype)
    _, exponent = torch.frexp(x)  # x = m * 2**exponent, m in [0.5, 1)
    binade = torch.ldexp(torch.ones_like(x), exponent - 1)
    spacing = fi.eps * torch.clamp(binade, min=fi.tiny)
    half = torch.where(x > 0, spacing, torch.full_like(x, fi.eps * fi.tiny)) / 2
    return torch.where(x > fi.max, torch.full_like(x, math.inf), half)


def error_bound(w: torch.Tensor, packed: torch.Tensor, state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-element upper bound (float64, shape of w) on |w - dequantize(packed, state, dtype)|
    for a correct quantization of w.

    The bound uses the true block absmax A (recomputed from w), the scale S that dequantization
    uses (A, or the double-quantized reconstruction; see reconstructed_absmax), and the code
    value c of each element. With s = clamp(f32(w * f32(1/A)), -1, 1) and p = f32(c * S):

        |w - w_hat| <= |w - c*A| + |c|*|A - S| + |c*S - p| + |p - w_hat|

    1. |w - c*A| = A * |w/A - c| <= A * (|w/A - s| + |s - c|) <= A * (E + 2**-20), where
       E = max_code_error(quant_type) is the largest distance from any s in [-1, 1] to the value
       its code decodes to (derived from the actual thresholds, not from half the widest gap),
       and 2**-20 covers the roundings of the reciprocal and of the product in s.
       A block with 0 < A < float32(1e-38) is scaled by 1/1e-38 instead: s keeps the sign of
       w and |s| < 1, so c has the sign of w (or is 0) and |w - c*A| <= A.
    2. Double quantization: |c| * |A - S| (|c| <= 1). Without it S == A and the term is 0.
    3. The float32 product: |c*S - p| <= 2**-24 * |c*S| + 2**-150.
    4. The cast to dtype (none for float32): half an ulp of dtype at |w_hat|, taken at
       |c*S| * (1 + 2**-7) >= |w_hat| (half-ulps grow with magnitude).

    The sum is widened by 2**-40 relative for its own float64 rounding. The bound is rigorous
    for the scales in `state`; that those scales are right (S == A without double quant, |A - S|
    within the nested bound with it) is checked by assert_within_bound(check_scales=True).
    Where |c*S| may exceed dtype's largest finite value (w dequantized into a narrower dtype,
    or float16 with double quant and |w| near 65504) the cast may give inf and the bound is inf.
    """
    _check_pair(w, state)
    dtype = dtype or state.dtype
    n, blocksize = state.numel, state.blocksize
    a = _block_absmax(w, blocksize)
    s = reconstructed_absmax(state).double()
    c = _code_values(packed, state).abs()
    block = torch.arange(n) // blocksize

    step = torch.where(a < TINY_ABSMAX, torch.ones_like(a), torch.full_like(a, max_code_error(state.quant_type) + _SCALED_SLACK))
    cs = c * s.abs()[block]
    bound = (a * step)[block] + c * (a - s).abs()[block] + _U32 * cs + 2.0**-150
    if dtype != torch.float32:
        bound = bound + _half_ulp(cs * (1 + 2.0**-7), dtype)
    return (bound * (1 + _SUM_SLACK)).reshape(w.shape)


def _nested_scale_bound(a: torch.Tensor, state) -> torch.Tensor:
    """Per-block bound on |A - S| for a correct double quantization of the true absmax `a`.

    With x = A - offset, x~ = f32(x), N = max |x~| over the nested block (recomputed from the
    true A and the state's offset), s2 = f32(x~ * f32(1/N)), d = nearest dynamic-map entry,
    p = f32(d * N), S = f32(p + offset):
        |S - A| <= |S - (p + offset)| + |p - d*N| + N*|d - x~/N| + |x~ - x|
                <= 2**-23*|S| + (2**-24*N) + N*(E2 + 2**-21) + 2**-24*N*(1 + 2**-23) + 3*2**-150
                <= N * (E2 + 2**-20) + 2**-23 * |S| + 2**-148,   E2 = max_nested_code_error(),
    with 2N in place of N * (E2 + 2**-20) when float32(1/N) overflows (N < ~2**-128).
    """
    a32 = a.float()
    offset = state.offset.detach().cpu().float().reshape(())
    centred = (a32 - offset).double().abs()
    nblocks2 = -(-a.numel() // cb.NESTED_BLOCKSIZE)
    padded = torch.zeros(nblocks2 * cb.NESTED_BLOCKSIZE, dtype=torch.float64)
    padded[: a.numel()] = centred
    nmax = padded.view(nblocks2, -1).amax(dim=1)
    # N below ~2**-128: float32(1/N) overflows and implementations part ways (the reference
    # stores the code of 0.0, the torch path and bitsandbytes saturate at -0.99.. / 1); any
    # code keeps |d*N - x~| <= 2N.
    overflow = torch.isinf(nmax.float().reciprocal())
    step = torch.where(overflow, torch.full_like(nmax, 2.0), torch.full_like(nmax, max_nested_code_error() + _SCALED_SLACK))
    per_block = (nmax * step).repeat_interleave(cb.NESTED_BLOCKSIZE)[: a.numel()]
    s = reconstructed_absmax(state).double()
    return (per_block + 2.0**-23 * s.abs() + 2.0**-148) * (1 + _SUM_SLACK)


def _check_scales(a: torch.Tensor, state) -> None:
    """The scales in `state` are those of a correct quantization of the w with block absmax a."""
    if not state.nested:
        stored = state.absmax.detach().cpu().double()
        bad = (stored != a).nonzero().reshape(-1)
        if bad.numel():
            b = int(bad[0])
            raise AssertionError(
                f"{bad.numel()} block absmax value(s) differ from the true block absmax; first: block {b} "
                f"stores {stored[b].item()!r}, the block's max |w| is {a[b].item()!r}"
            )
        return
    # The offset must be the mean absmax: any float32 summation order of B nonnegative terms
    # (and the division) errs by at most (B + 1) * 2**-24 relative.
    offset = float(state.offset.detach().cpu().float())
    mean = float(a.mean())
    if not abs(offset - mean) <= (a.numel() + 1) * _U32 * mean + _SUB32:
        raise AssertionError(f"nested offset {offset!r} is not the mean block absmax {mean!r}")
    s = reconstructed_absmax(state).double()
    err = (s - a).abs()
    limit = _nested_scale_bound(a, state)
    bad = (~(err <= limit)).nonzero().reshape(-1)
    if bad.numel():
        b = int(bad[0])
        raise AssertionError(
            f"{bad.numel()} reconstructed block scale(s) exceed the double-quantization bound; first: block "
            f"{b}: true absmax {a[b].item()!r}, reconstructed {s[b].item()!r}, |diff| {err[b].item():.6g} > "
            f"bound {limit[b].item():.6g}"
        )


def assert_within_bound(
    w: torch.Tensor,
    packed: torch.Tensor,
    state,
    w_hat: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    dequantize=None,
    check_scales: bool = True,
) -> None:
    """Assert |w - w_hat| <= error_bound(w, packed, state) everywhere.

    w_hat defaults to dequantize(packed, state, dtype=dtype) (nf4kern.dequantize_4bit unless
    another callable is given). With check_scales, also assert that the scales in `state` are
    right: without double quant state.absmax equals the block absmax of w bit for bit; with it
    the offset is the mean absmax and each reconstructed scale is within the nested bound.
    """
    if w_hat is None:
        w_hat = (dequantize or dequantize_4bit)(packed, state, dtype=dtype)
    if tuple(w_hat.shape) != tuple(w.shape):
        raise AssertionError(f"w_hat has shape {tuple(w_hat.shape)}, w has {tuple(w.shape)}")
    bound = error_bound(w, packed, state, dtype=w_hat.dtype)
    err = (w.detach().cpu().double() - w_hat.detach().cpu().double()).abs()
    bad = ~(err <= bound)  # NaN in w_hat fails too
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), w.shape))
        flat = lambda t: t.reshape(-1)[i].item()  # noqa: E731
        raise AssertionError(
            f"{int(bad.sum())} of {w.numel()} element(s) exceed the error bound; first at {list(idx)} "
            f"(block {i // state.blocksize}): w = {flat(w)!r}, w_hat = {flat(w_hat)!r}, "
            f"|w - w_hat| = {flat(err):.6g} > bound {flat(bound):.6g} "
            f"({state.quant_type}, blocksize {state.blocksize}, nested {state.nested}, dtype {w_hat.dtype})"
        )
    if check_scales:
        _check_pair(w, state)
        _check_scales(_block_absmax(w, state.blocksize), state)


# =============================================================================================
# Invariants
# =============================================================================================


def _blocks_with_nonzero_codes(values: torch.Tensor, blocksize: int) -> torch.Tensor:
    """bool [B]: whether block b holds a code whose value is not 0."""
    return _per_block(values != 0, blocksize).any(dim=1)


def _blocks_with_unit_codes(values: torch.Tensor, blocksize: int) -> torch.Tensor:
    """bool [B]: whether block b holds a code of value +-1 (its absmax element)."""
    return _per_block(values.abs() == 1, blocksize).any(dim=1)


def _per_block(flags: torch.Tensor, blocksize: int) -> torch.Tensor:
    nblocks = -(-flags.numel() // blocksize)
    out = torch.zeros(nblocks * blocksize, dtype=torch.bool)
    out[: flags.numel()] = flags
    return out.view(nblocks, blocksize)


def _canonical_bytes(packed: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Packed bytes with FP4 code 8 (the signed zero, value +0.0) read as code 0."""
    data = packed.detach().cpu().contiguous().view(torch.uint8).reshape(-1)
    if quant_type != "fp4":
        return data
    hi, lo = data >> 4, data & 15
    hi = torch.where(hi == 8, torch.zeros_like(hi), hi)
    lo = torch.where(lo == 8, torch.zeros_like(lo), lo)
    return (hi << 4) | lo


def _roundtrip_problem(w_hat: torch.Tensor, packed: torch.Tensor, state) -> str | None:
    if not isinstance(w_hat, torch.Tensor) or w_hat.dtype not in FLOAT_DTYPES or w_hat.numel() != state.numel:
        return f"w_hat must be a float32/float16/bfloat16 tensor of {state.numel} elements"
    if not bool(torch.isfinite(w_hat).all()):
        return "w_hat has NaN or inf"
    values = _code_values(packed, state)
    used = _blocks_with_nonzero_codes(values, state.blocksize)
    if bool((used & ~_blocks_with_unit_codes(values, state.blocksize)).any()):
        return "a block with a nonzero code has no code of value +-1 (its absmax was below float32(1e-38))"
    s = reconstructed_absmax(state).double()[used]
    if bool((s < TINY_ABSMAX).any()):
        return "a block with a nonzero code has a scale below float32(1e-38) (or a negative one)"
    table = np.abs(cb.codebook(state.quant_type).astype(np.float64))
    fi = torch.finfo(w_hat.dtype)
    if bool((s * table[table > 0].min() < 32 * fi.eps * fi.tiny).any()):
        return f"a block's smallest nonzero code value times its scale is within 32 subnormal steps of 0 in {w_hat.dtype}"
    return None


def roundtrip_exact_applies(w_hat: torch.Tensor, packed: torch.Tensor, state) -> bool:
    """Whether assert_roundtrip_exact's preconditions hold (for hypothesis.assume)."""
    return _roundtrip_problem(w_hat, packed, state) is None


def assert_roundtrip_exact(w_hat: torch.Tensor, packed: torch.Tensor, state, *, quantize=None, dequantize=None) -> None:
    """Already-quantized values are a fixed point: w_hat = dequantize(packed, state, dtype=...)
    re-quantizes (same blocksize and quant_type, no double quant) to the same codes and, when
    the scales survive, dequantizes to itself.

    Let S_b be the scale dequantization used for block b (reconstructed_absmax). A block with a
    nonzero code holds its absmax element with code +-1 (s = f32(A * f32(1/A)) is within 2**-23
    of +-1), so max |w_hat| over the block is |round(S_b)|, and every other element is c*S_b up to
    two roundings. Re-quantizing divides them out again; since every code value sits >= 11 %
    (relative) away from its decision thresholds, the same code comes back whenever the
    roundings stay below that. Precisely, asserted:

    * codes: the packed bytes are equal (FP4 code 8, the "negative zero" whose value is +0.0,
      comes back as code 0). Preconditions (ValueError if violated; see
      roundtrip_exact_applies): w_hat finite; for each block with a nonzero code,
      S_b >= float32(1e-38) (so positive and not rescaled by the tiny-absmax rule) and its
      smallest nonzero code value times S_b is >= 32 subnormal steps of w_hat.dtype (so the
      cast to w_hat.dtype errs by <= 2**-6 relative).
    * scales and values, when moreover every S_b is exactly representable in w_hat.dtype
      (always for float32 output; for the input dtype without double quant, because S_b is then
      an element of w): the new absmax equals S_b (0 for a block of zero codes) and
      dequantizing gives w_hat bit for bit.

    Without double quant and w_hat in the quantized dtype or float32, everything holds. With
    double quant, S_b is a float32 not generally representable in bf16/fp16, so only the codes
    (and, for float32 w_hat, the values: w_hat is then a fixed point of single-level
    quantization) survive; re-quantizing *with* double quant is not a fixed point, because the
    nested level re-quantizes the S_b around a new offset.
    """
    problem = _roundtrip_problem(w_hat, packed, state)
    if problem is not None:
        raise ValueError(f"round-trip exactness does not apply: {problem}")
    quantize = quantize or quantize_4bit
    dequantize = dequantize or dequantize_4bit
    packed2, state2 = quantize(w_hat, blocksize=state.blocksize, quant_type=state.quant_type, double_quant=False)
    got, want = _canonical_bytes(packed2, state.quant_type), _canonical_bytes(packed, state.quant_type)
    if got.shape != want.shape or not torch.equal(got, want):
        diff = (got != want).nonzero().reshape(-1) if got.shape == want.shape else torch.tensor([0])
        j = int(diff[0])
        raise AssertionError(
            f"re-quantizing w_hat changed {diff.numel()} byte(s) of the packed codes; first: byte {j} "
            f"(elements {2 * j}, {2 * j + 1}): 0x{int(want[j]):02x} -> 0x{int(got[j]):02x}"
        )
    scales = reconstructed_absmax(state)
    used = _blocks_with_nonzero_codes(_code_values(packed, state), state.blocksize)
    if not torch.equal(scales[used].to(w_hat.dtype).float(), scales[used]):
        return  # some scale does not survive the cast to w_hat.dtype: codes only
    want_absmax = torch.where(used, scales.abs(), torch.zeros_like(scales))
    got_absmax = reconstructed_absmax(state2)
    if not torch.equal(got_absmax, want_absmax):
        b = int((got_absmax != want_absmax).nonzero()[0])
        raise AssertionError(f"re-quantizing w_hat changed block {b}'s absmax: {want_absmax[b].item()!r} -> {got_absmax[b].item()!r}")
    w2 = dequantize(packed2, state2, dtype=w_hat.dtype).reshape(w_hat.shape)
    if not torch.equal(w2, w_hat):
        i = int((w2 != w_hat).reshape(-1).nonzero()[0])
        raise AssertionError(
            f"dequantizing the re-quantized w_hat changed element {i}: {w_hat.reshape(-1)[i].item()!r} -> "
            f"{w2.reshape(-1)[i].item()!r}"
        )


def assert_monotone_codes(w: torch.Tensor, packed: torch.Tensor, state) -> None:
    """Within each block, the decoded code value is a nondecreasing function of w: w_i < w_j
    implies value_i <= value_j, and w_i == w_j implies value_i == value_j.

    For NF4 the code order is the value order, so the codes themselves are monotone; for FP4
    (sign bit + magnitude code) the codebook values are compared. This holds exactly: s is a
    monotone function of w (a multiply by a positive float32 and a clamp, both monotone under
    round-to-nearest), and both decision rules are monotone in s (FP4 ties go to the smaller
    magnitude on both sides of 0, and the two zero codes 0 and 8 both decode to 0.0).
    """
    _check_pair(w, state)
    n, bs = state.numel, state.blocksize
    nblocks = -(-n // bs)
    wf = torch.full((nblocks * bs,), math.inf, dtype=torch.float64)
    vf = torch.full((nblocks * bs,), math.inf, dtype=torch.float64)
    wf[:n] = w.detach().cpu().reshape(-1).double()
    vf[:n] = _code_values(packed, state)
    wb, vb = wf.view(nblocks, bs), vf.view(nblocks, bs)
    order = torch.argsort(wb, dim=1, stable=True)
    ws, vs = wb.gather(1, order), vb.gather(1, order)
    dw, dv = ws[:, 1:] - ws[:, :-1], vs[:, 1:] - vs[:, :-1]  # padding: inf - inf = nan, never bad
    bad = (dv < 0) | ((dw == 0) & (dv != 0))
    if bool(bad.any()):
        b, k = (int(t) for t in bad.nonzero()[0])
        i, j = int(order[b, k]) + b * bs, int(order[b, k + 1]) + b * bs
        codes = unpack_codes(packed, n)
        raise AssertionError(
            f"codes are not monotone in block {b}: w[{i}] = {wf[i].item()!r} (code {int(codes[i])}, value "
            f"{vf[i].item()!r}) <= w[{j}] = {wf[j].item()!r} (code {int(codes[j])}, value {vf[j].item()!r})"
        )


_SCALE_RANGE = 2.0**60  # nonzero block absmax must lie in [2**-60, 2**60] for equivariance
_SCALE_MAX_BLOCKS = 2**20  # with double quant, so the float32 sum of the absmax stays normal


def _scale_problem(w: torch.Tensor, exponent: int, blocksize: int, double_quant: bool = False) -> str | None:
    if not isinstance(exponent, int) or isinstance(exponent, bool):
        return f"exponent must be an int, got {exponent!r}"
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        return "w must be a float32/float16/bfloat16 tensor"
    if not bool(torch.isfinite(w).all()):
        return "w has NaN or inf"
    w2 = w * 2.0**exponent
    if not bool(torch.isfinite(w2).all()) or not torch.equal(w2.double(), w.double() * 2.0**exponent):
        return f"w * 2**{exponent} is not exact in {w.dtype} (overflow or subnormal underflow)"
    for a in (_block_absmax(w, blocksize), _block_absmax(w2, blocksize)):
        nz = a[a > 0]
        if nz.numel() and (float(nz.min()) < 1 / _SCALE_RANGE or float(nz.max()) > _SCALE_RANGE):
            return "a nonzero block absmax outside [2**-60, 2**60]"
    if double_quant and -(-w.numel() // blocksize) > _SCALE_MAX_BLOCKS:
        return "more than 2**20 blocks with double quant"
    return None


def scale_equivariance_applies(w: torch.Tensor, exponent: int, blocksize: int, double_quant: bool = False) -> bool:
    """Whether assert_scale_equivariance's preconditions hold (for hypothesis.assume)."""
    return _scale_problem(w, exponent, blocksize, double_quant) is None


def assert_scale_equivariance(
    w: torch.Tensor,
    exponent: int,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = False,
    quantize=None,
    dequantize=None,
) -> None:
    """Quantizing w * 2**exponent gives the same packed bytes as quantizing w, with every float
    scale multiplied by 2**exponent exactly.

    Why: if w * 2**k is exact, the block absmax scales exactly, f32(1/A) scales by 2**-k exactly
    (while normal), and s = f32(w * f32(1/A)) is the same product, so the same codes.
    Preconditions (ValueError if violated; see scale_equivariance_applies): w finite, w * 2**k
    exact and finite in w.dtype, every nonzero block absmax of w and of w * 2**k in
    [2**-60, 2**60], and with double quant at most 2**20 blocks. The range keeps every float32
    intermediate normal (no tiny-absmax rule, no subnormal reciprocal, and with double quant no
    subnormal mean, centred absmax, nested reciprocal or dynamic-map product: the smallest
    nonzero map entry is ~2**-21), so each rounding commutes with the power of two.

    Asserted: identical packed bytes; without double quant absmax' == absmax * 2**k; with double
    quant the uint8 absmax codes are identical and nested_absmax and offset scale by 2**k (the
    float32 mean, the centring, the nested max and the reciprocal all commute with 2**k in that
    range), so the reconstructed scales do too. The dequantized values scale by 2**k exactly
    wherever both results are normal numbers of the output dtype (or the code is a zero).
    """
    problem = _scale_problem(w, exponent, blocksize, double_quant)
    if problem is not None:
        raise ValueError(f"scale equivariance does not apply: {problem}")
    quantize = quantize or quantize_4bit
    dequantize = dequantize or dequantize_4bit
    factor = 2.0**exponent
    p1, s1 = quantize(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    p2, s2 = quantize(w * factor, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    b1 = p1.detach().cpu().contiguous().view(torch.uint8).reshape(-1)
    b2 = p2.detach().cpu().contiguous().view(torch.uint8).reshape(-1)
    if b1.shape != b2.shape or not torch.equal(b1, b2):
        j = int((b1 != b2).nonzero()[0]) if b1.shape == b2.shape else 0
        raise AssertionError(
            f"scaling w by 2**{exponent} changed the packed bytes; first: byte {j}: 0x{int(b1[j]):02x} -> 0x{int(b2[j]):02x}"
        )

    def _scaled(name, x1, x2):
        x1, x2 = x1.detach().cpu().double(), x2.detach().cpu().double()
        if x1.shape != x2.shape or not torch.equal(x2, x1 * factor):
            raise AssertionError(f"scaling w by 2**{exponent} did not scale {name} by 2**{exponent}: {x1} -> {x2}")

    if double_quant:
        if not torch.equal(s1.absmax, s2.absmax):
            raise AssertionError(f"scaling w by 2**{exponent} changed the nested absmax codes")
        _scaled("the nested absmax", s1.state2.absmax, s2.state2.absmax)
        _scaled("the offset", s1.offset, s2.offset)
    else:
        _scaled("the absmax", s1.absmax, s2.absmax)
    _scaled("the reconstructed scales", reconstructed_absmax(s1), reconstructed_absmax(s2))

    d1 = dequantize(p1, s1, dtype=w.dtype).detach().cpu().double().reshape(-1)
    d2 = dequantize(p2, s2, dtype=w.dtype).detach().cpu().double().reshape(-1)
    tiny = torch.finfo(w.dtype).tiny
    normal = lambda d: torch.isfinite(d) & (d.abs() >= tiny)  # noqa: E731
    zero_code = _code_values(p1, s1) == 0
    check = zero_code | (normal(d1) & normal(d2))
    bad = check & (d2 != d1 * factor)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"scaling w by 2**{exponent} did not scale dequantized element {i}: {d1[i].item()!r} -> {d2[i].item()!r}"
        )


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(sum w**2 / sum (w - w_hat)**2), in float64.
    inf when w_hat == w; -inf when w is all zero and w_hat is not."""
    x = w.detach().cpu().double().reshape(-1)
    noise = (x - w_hat.detach().cpu().double().reshape(-1)).square().sum().item()
    signal = x.square().sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
