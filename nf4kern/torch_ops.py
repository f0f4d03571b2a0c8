"""The fast vectorised torch path: the default on CPU. Bit-identical to nf4kern.reference.

Work goes in chunks of ~256K elements so that every intermediate stays in cache: the path is a
handful of elementwise passes, and each pass over DRAM would cost as much as the whole chunk.

Code selection avoids a per-element search over the thresholds. s + 3 lies in [2, 4) for
s in [-1, 1], where a float32's top mantissa bits are a uniform grid over s; a table indexed by
those bits gives, per cell, the codes on either side of the one threshold the cell can hold and
that threshold, so a code is one gather and one comparison. Cells are narrower than the closest
pair of thresholds and the tables are built with a margin for the rounding of s + 3 (<= 2**-22),
so the result equals the exact rule for every float32 s.
"""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import numpy as np
import torch

from . import codebook as cb

_CHUNK = 1 << 18  # elements per chunk; a multiple of every blocksize
_GEMM_CHUNK_MAX = 1 << 22
_BF16_GEMM_CHUNK_MIN = 1 << 21
# dx by row chunks of W adds an M x K product into dx per chunk; once that accumulator reaches
# 2M elements, chunks of ~1M weights' columns (no accumulation) are faster. bf16 dy at M = 512:
# 4096x4096 30 -> 26 ms, 4096x14336 187 -> 87 ms; at M = 1024: 75 -> 37 ms and 428 -> 126 ms
# (Intel Xeon with AMX; below 2M the row chunks were as fast or faster).
_DX_COLUMNS_MIN = 1 << 21
_DX_COLUMN_CHUNK = 1 << 20
_TINY_ABSMAX = 1e-38
_ROUNDING_MARGIN = 2.0**-21


@functools.lru_cache(maxsize=None)
def _cell_tables(quant_type: str) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift, lower code, upper code, threshold) per cell of float32(s + 3) >> shift. The
    threshold is stored as its int32 bits: torch.gather from an int32 table is ~3x faster than
    from a float32 one on AVX2 CPUs (measured on an AMD EPYC, where the float path's vector
    gather instruction is slow)."""
    shift = 17 if quant_type == "nf4" else 13  # FP4 thresholds sit closer together near 0
    ncells = 1 << (31 - shift)  # every non-negative int32 >> shift, NaN patterns included
    bits = (np.arange(ncells, dtype=np.int64) << shift).astype(np.uint32)
    with np.errstate(invalid="ignore"):  # the NaN cells; s is never NaN here
        lo = bits.view(np.float32).astype(np.float64) - 3.0
        hi = (bits | np.uint32((1 << shift) - 1)).view(np.float32).astype(np.float64) - 3.0
    lo, hi = lo - _ROUNDING_MARGIN, hi + _ROUNDING_MARGIN

    bounds, codes_between = _decision_rule(quant_type)
    first = np.searchsorted(bounds, lo, side="left")  # first boundary >= lo
    last = np.searchsorted(bounds, hi, side="right")  # boundaries <= hi end here
    finite = np.isfinite(lo) & np.isfinite(hi)
    if np.any((last - first > 1) & finite):
        raise AssertionError("a cell holds two decision boundaries")
    padded = np.append(bounds, np.inf)
    lower = codes_between[first]
    upper = codes_between[np.minimum(first + 1, len(codes_between) - 1)]
    threshold = padded[first].astype(np.float32)
    return (
        shift,
        torch.from_numpy(lower.astype(np.uint8)),
        torch.from_numpy(upper.astype(np.uint8)),
        torch.from_numpy(threshold).view(torch.int32),
    )


def _decision_rule(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Boundaries b_0 < b_1 < ... and the code of each interval: code(s) = codes[#{i: s > b_i}]."""
    if quant_type == "nf4":
        return cb.nf4_thresholds().astype(np.float64), np.arange(16)
    # FP4: |s| > T picks the larger magnitude (ties to the smaller); s < 0 sets the sign bit.
    # On the negative side `s > b` must mean `|s| <= T`, so b is the float32 just below -T.
    t = cb.FP4_MAGNITUDE_THRESHOLDS
    neg = np.nextafter(-t[::-1], np.float32(-np.inf)).astype(np.float64)
    zero = np.float64(np.nextafter(np.float32(0), np.float32(-1)))  # s < 0 <=> s <= zero
    bounds = np.concatenate([neg, [zero], t.astype(np.float64)])
    mags = cb.FP4_CODES_BY_MAGNITUDE
    codes = np.concatenate([mags[::-1] | 8, mags])
    return bounds, codes


LOOKUPS = ("gather", "index_select")


@functools.lru_cache(maxsize=None)
def _lookup() -> str:
    """The faster of two equivalent table lookups on this CPU, timed once on a chunk of codes.
    Which wins depends on the CPU: gather (int64 index) was several times faster than
    index_select on an AMD EPYC, while index_select (int32 index, no conversion pass) is ~1.4x
    faster on an Intel Xeon with AMX (each measured in a session on that machine)."""
    s = torch.linspace(-1.0, 1.0, _CHUNK)
    scratch, out = torch.empty_like(s), torch.empty(_CHUNK, dtype=torch.uint8)
    timings = {}
    for lookup in LOOKUPS:
        _codes(s, "nf4", scratch, out, lookup)  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            _codes(s, "nf4", scratch, out, lookup)
        timings[lookup] = time.perf_counter() - start
    return min(timings, key=timings.get)


def _codes(s: torch.Tensor, quant_type: str, scratch: torch.Tensor, out: torch.Tensor, lookup: str | None = None) -> None:
    """Write the uint8 code of each scaled value into out (s finite, in [-1, 1] up to rounding)."""
    shift, lower, upper, threshold = _cell_tables(quant_type)
    cell = torch.add(s, 3.0, out=scratch).view(torch.int32).bitwise_right_shift_(shift)
    if (lookup or _lookup()) == "gather":
        cell = cell.long()
        table = functools.partial(torch.gather, dim=0, index=cell)
    else:
        table = functools.partial(torch.index_select, dim=0, index=cell)
    # The comparison into uint8, not bool: adding a bool to uint8 codes costs a promotion pass.
    above = torch.gt(s, table(threshold).view(torch.float32), out=torch.empty_like(out))
    if quant_type == "nf4":  # adjacent codes: upper == lower + 1
        torch.add(table(lower), above, out=out)
    else:
        torch.where(above.bool(), table(upper), table(lower), out=out)


def quantize_blocks(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat quantization: (packed uint8 [ceil(n/2)], absmax float32 [ceil(n/blocksize)])."""
    flat = x.reshape(-1)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    absmax = torch.empty(nblocks, dtype=torch.float32)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8)
    top, pad = (15 if quant_type == "nf4" else 3), cb.zero_code(quant_type)
    chunk = min(_CHUNK, nblocks * blocksize)
    scaled, scratch = torch.empty(chunk, dtype=torch.float32), torch.empty(chunk, dtype=torch.float32)
    codes = torch.empty(chunk, dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        xf = _padded_float_chunk(flat, start, stop, blocksize).view(-1, blocksize)
        lo, hi = xf.amin(1), xf.amax(1)  # two reductions: ~5x faster than one aminmax here
        amax = absmax[start // blocksize : start // blocksize + xf.shape[0]]
        torch.maximum(hi, lo.neg_(), out=amax)
        recip = amax.clamp_min(_TINY_ABSMAX).reciprocal_()
        # Into a scratch buffer: xf may be a view of the caller's tensor. No clamp to [-1, 1]:
        # |s| exceeds 1 by at most a rounding, and the cell tables give such s the end codes.
        s = torch.mul(xf, recip[:, None], out=scaled[: xf.numel()].view_as(xf)).view(-1)
        out = codes[: s.numel()]
        if bool(torch.isfinite(amax).all()):
            _codes(s, quant_type, scratch[: s.numel()], out)
        else:  # only with allow_nonfinite: NaN takes the code of +1, as after a clamp
            nan = s.isnan()
            _codes(s.clamp(-1.0, 1.0).masked_fill_(nan, 1.0), quant_type, scratch[: s.numel()], out)
            out.masked_fill_(nan, top)
        _pack(out, stop - start, pad, packed[start // 2 : -(-stop // 2)])
    return packed, absmax


def _padded_float_chunk(flat: torch.Tensor, start: int, stop: int, blocksize: int) -> torch.Tensor:
    """float32 flat[start:stop] zero-padded to whole blocks (a view for float32 input when no
    padding is needed: callers must not write to it)."""
    length = -(-(stop - start) // blocksize) * blocksize
    chunk = flat[start:stop]
    if length == stop - start:
        return chunk.float()
    out = torch.empty(length, dtype=torch.float32)
    out[: stop - start] = chunk
    out[stop - start :] = 0.0
    return out


def _pack(codes: torch.Tensor, n: int, pad_code: int, out: torch.Tensor) -> None:
    """Pack codes[:n] two a byte into out, the first in the high nibble; an odd n is padded
    with pad_code (codes has room for it: chunks are whole blocks of an even size)."""
    if n % 2:
        codes[n] = pad_code
    pairs = codes[: 2 * out.numel()]
    # In the chunk, still in cache; uint8 arithmetic, no overflow: 16 * 15 + 15 = 255.
    torch.add(pairs[1::2], pairs[0::2], alpha=16, out=out)


@functools.lru_cache(maxsize=None)
def _dynamic_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Nested-code tables indexed by the top 16 bits of a float32 s (a bf16-wide cell): the
    code at the bottom of the cell and the one midpoint of the dynamic map the cell can hold.
    The map's midpoints are log-spaced, at least 1.4% apart, wider than any cell (0.8%)."""
    dyn = cb.dynamic_map()
    mids = ((dyn[:-1] + dyn[1:]) / np.float32(2.0)).astype(np.float64)
    prefix = np.arange(1 << 16, dtype=np.uint32) << 16
    with np.errstate(invalid="ignore"):
        ends = np.stack([prefix, prefix | np.uint32(0xFFFF)]).view(np.float32).astype(np.float64)
    lo, hi = np.fmin(ends[0], ends[1]), np.fmax(ends[0], ends[1])  # negative cells run downwards
    first = np.searchsorted(mids, lo, side="left")
    if np.any(np.searchsorted(mids, hi, side="right") - first > 1):
        raise AssertionError("a cell holds two dynamic-map midpoints")
    threshold = np.append(mids, np.inf)[first].astype(np.float32)
    nan = np.isnan(lo)
    first[nan], threshold[nan] = 255, np.inf  # NaN takes the top code, as a bucketize does
    return torch.from_numpy(first.astype(np.uint8)), torch.from_numpy(threshold)


def quantize_nested(absmax: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes [B], nested absmax float32 [ceil(B/256)]) of absmax - offset."""
    centred = absmax - offset
    nblocks = -(-centred.numel() // cb.NESTED_BLOCKSIZE)
    blocks = torch.zeros(nblocks * cb.NESTED_BLOCKSIZE, dtype=torch.float32)
    blocks[: centred.numel()] = centred
    blocks = blocks.view(nblocks, cb.NESTED_BLOCKSIZE)
    nested = blocks.abs().amax(dim=1)
    scaled = (blocks * nested.reciprocal()[:, None]).view(-1)
    lower, threshold = _dynamic_tables()
    cell = scaled.view(torch.int32).bitwise_right_shift(16).bitwise_and_(0xFFFF)
    codes = lower.index_select(0, cell).add_(scaled > threshold.index_select(0, cell))
    codes = codes.view(nblocks, cb.NESTED_BLOCKSIZE)
    # A block of absmax all equal to the offset (nested absmax 0, scaled values NaN) stores
    # code 0, as bitsandbytes does; any code decodes to the offset.
    codes[nested == 0] = 0
    return codes.view(-1)[: centred.numel()], nested


@functools.lru_cache(maxsize=None)
def _pair_table(quant_type: str) -> torch.Tensor:
    """The two float32 code values of every byte, high nibble first, as one int64 per byte:
    a gather of 8-byte elements is twice as fast as one of float32 pairs."""
    c = torch.from_numpy(cb.codebook(quant_type).copy())
    byte = torch.arange(256)
    pairs = torch.stack([c[byte >> 4], c[byte & 15]], dim=1).contiguous()
    return pairs.view(torch.int64).view(256)


def dequantize_absmax(absmax: torch.Tensor, nested_absmax: torch.Tensor | None, offset: torch.Tensor | None) -> torch.Tensor:
    if nested_absmax is None:
        return absmax
    dyn = torch.from_numpy(cb.dynamic_map().copy())
    scale = nested_absmax.repeat_interleave(cb.NESTED_BLOCKSIZE)[: absmax.numel()]
    return (dyn[absmax.long()] * scale).add_(offset)


def dequantize(packed, absmax, n, blocksize, quant_type, out_dtype, nested_absmax=None, offset=None) -> torch.Tensor:
    """Flat [n] values in out_dtype: one float32 product code * scale, one rounding."""
    scales = dequantize_absmax(absmax, nested_absmax, offset)
    out = torch.empty(n, dtype=out_dtype)
    values = torch.empty(min(_CHUNK, -(-n // blocksize) * blocksize), dtype=torch.float32)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        out[start:stop] = dequantize_range(packed, scales, start, stop, blocksize, quant_type, values)
    return out


def dequantize_range(packed, scales, start, stop, blocksize, quant_type, buffer) -> torch.Tensor:
    """float32 values of flat elements [start, stop), start on a block boundary, written into
    buffer (at least stop - start rounded up to whole blocks); returns the [stop - start] view."""
    length = -(-(stop - start) // blocksize) * blocksize  # whole blocks; the tail is padding
    nbytes = -(-(stop - start) // 2)
    v = buffer[:length]
    index = packed[start // 2 : start // 2 + nbytes]
    _decode(index, scales[start // blocksize : (start + length) // blocksize], blocksize, quant_type, v)
    return v[: stop - start]


def _decode(index: torch.Tensor, scales: torch.Tensor, blocksize: int, quant_type: str, v: torch.Tensor) -> None:
    """Write into v (whole blocks) the float32 values of the packed bytes `index`, in order, each
    block times its entry of `scales` (one per block of v; bytes past `index` leave padding)."""
    torch.index_select(_pair_table(quant_type), 0, index.reshape(-1).int(), out=v[: 2 * index.numel()].view(torch.int64))
    v.view(-1, blocksize).mul_(scales.reshape(-1, 1))


def _gemm_chunk(M: int, K: int, compute: torch.dtype) -> int:
    """Weights per row chunk of a matmul with M activation rows. Each chunk is one GEMM with an
    M x rows (forward) or M x K (dx) output: for large M larger chunks, up to 4M weights (still a
    fraction of a large weight), keep those GEMMs wide; a 4096x14336 forward at M = 256 takes
    2/3 of the time it takes with 256K-weight chunks. A bf16 GEMM (oneDNN, native bf16) costs
    more per call, so it takes at least 2M weights: forward + backward at M = 32 / 64 went from
    39 / 44 to 29 / 32 ms on 4096x4096 and from 149 / 126 to 98 / 111 ms on 4096x14336 (Intel
    Xeon with AMX; 1M and 4M were slower)."""
    floor = _BF16_GEMM_CHUNK_MIN if compute == torch.bfloat16 else _CHUNK
    return min(max(floor, M * K), _GEMM_CHUNK_MAX)


def _row_chunks(N: int, K: int, blocksize: int, target: int = _CHUNK) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Row ranges of ~target weights, each starting on a block boundary, and a float32 buffer
    that holds the largest one."""
    step = blocksize // math.gcd(K, blocksize)  # rows between block-aligned row starts
    rows = min(N, max(step, (target // K) // step * step))
    buffer = torch.empty(-(-rows * K // blocksize) * blocksize, dtype=torch.float32)
    return [(r0, min(r0 + rows, N)) for r0 in range(0, N, rows)], buffer


@functools.lru_cache(maxsize=None)
def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). There a bf16 GEMM is
    ~4x faster than float32; without it torch emulates bf16 and its NN-layout GEMM is ~300x
    slower than float32 (bitsandbytes' CPU backward takes ~15 s at 128x4096x4096 there)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


# Up to this many activation rows the float32 product is faster than bf16 even where the CPU
# multiplies bf16 natively: it skips converting each weight chunk to bf16 and oneDNN's setup
# of a bf16 GEMM, which dominate a GEMV (a 64x4096 chunk at M = 1: 12 us in float32, 112 us in
# bf16; at M = 64: 142 us against 90 us; measured on an Intel Xeon with AMX).
_FLOAT32_MAX_M = 16


def _compute_dtype(dtype: torch.dtype, M: int) -> torch.dtype:
    if dtype == torch.bfloat16 and M > _FLOAT32_MAX_M and native_bf16_matmul():
        return torch.bfloat16
    return torch.float32


def matmul(x, packed, N, K, blocksize, quant_type, scales, bias=None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for 2-D x, dequantizing W a cache-sized row chunk at a time (the
    full dequantized weight never exists). bf16 inputs at M > 16 multiply in bf16 where the CPU
    has native bf16 GEMM, everything else in float32. Returns float32 or bf16."""
    compute = _compute_dtype(x.dtype, x.shape[0])
    xc = x.to(compute)
    y = torch.empty(x.shape[0], N, dtype=compute)
    # A bias in the compute dtype joins the GEMM: addmm adds it to the float32 accumulator, so a
    # bf16 result is rounded once (adding it afterwards would round twice).
    fused_bias = bias is not None and bias.dtype == compute
    chunks, buffer = _row_chunks(N, K, blocksize, _gemm_chunk(x.shape[0], K, compute))
    for r0, r1 in chunks:
        w = dequantize_range(packed, scales, r0 * K, r1 * K, blocksize, quant_type, buffer).view(r1 - r0, K)
        if fused_bias:
            y[:, r0:r1] = torch.addmm(bias[r0:r1], xc, w.to(compute).t())
        else:
            y[:, r0:r1] = xc @ w.to(compute).t()
    if bias is not None and not fused_bias:
        y = y.float().add_(bias.float())
    return y


def matmul_dx(dy, packed, N, K, blocksize, quant_type, scales) -> torch.Tensor:
    """dx = dy @ W in float32 (products in bf16 for bf16 dy at M > 16 on CPUs with native bf16
    GEMM, else float32)."""
    compute = _compute_dtype(dy.dtype, dy.shape[0])
    dyc = dy.to(compute)
    if K % blocksize == 0 and dy.shape[0] * K >= _DX_COLUMNS_MIN:
        return _matmul_dx_columns(dyc, packed, N, K, blocksize, quant_type, scales)
    dx = torch.zeros(dy.shape[0], K, dtype=torch.float32)
    # Every chunk adds an M x K product into dx: fewer, larger chunks for large M also keep those
    # additions small next to the GEMMs.
    chunks, buffer = _row_chunks(N, K, blocksize, _gemm_chunk(dy.shape[0], K, compute))
    for r0, r1 in chunks:
        w = dequantize_range(packed, scales, r0 * K, r1 * K, blocksize, quant_type, buffer).view(r1 - r0, K)
        if compute == torch.float32:
            dx.addmm_(dyc[:, r0:r1], w)
        else:
            dx += dyc[:, r0:r1] @ w.to(compute)
    return dx


def _matmul_dx_columns(dyc, packed, N, K, blocksize, quant_type, scales) -> torch.Tensor:
    """dx = dy @ W a column chunk of W at a time: each chunk's GEMM writes its columns of dx
    whole (inner dimension N), so nothing is accumulated. Needs K % blocksize == 0."""
    dx = torch.empty(dyc.shape[0], K, dtype=torch.float32)
    cols = max(blocksize, (_DX_COLUMN_CHUNK // N) // blocksize * blocksize)
    buffer = torch.empty(N * min(cols, K), dtype=torch.float32)
    for k0 in range(0, K, cols):
        k1 = min(k0 + cols, K)
        w = dequantize_columns(packed, scales, N, K, k0, k1, blocksize, quant_type, buffer)
        dx[:, k0:k1] = dyc @ w.to(dyc.dtype)
    return dx


def dequantize_columns(packed, scales, N, K, k0, k1, blocksize, quant_type, buffer) -> torch.Tensor:
    """float32 W[:, k0:k1] as an [N, k1 - k0] view of buffer; K, k0 and k1 multiples of
    blocksize, so that each row's slice is whole blocks."""
    cols = k1 - k0
    v = buffer[: N * cols]
    index = packed[: N * K // 2].view(N, K // 2)[:, k0 // 2 : k1 // 2]
    _decode(index, scales.reshape(N, K // blocksize)[:, k0 // blocksize : k1 // blocksize], blocksize, quant_type, v)
    return v.view(N, cols)
