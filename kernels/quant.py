"""Triton kernels for blockwise 4-bit quantization (NF4/FP4), double quantization of the block
absmax, and dequantization, with their launch wrappers.

Semantics are those of nf4kern/reference.py, bit for bit:

* quantize: absmax per flat block (NaN if the block holds a NaN), recip = f32(1 / max(absmax,
  1e-38)) computed once per block with a correctly rounded division, s = f32(x * recip), code by
  a threshold tree held as constants (NF4: the 15 fp32 midpoints, ties to the lower code; FP4: the
  CUDA sign + magnitude tree); a NaN s takes the code of +1. Two codes a byte, first element in
  the high nibble; an odd count pads with the code of 0.0.
* quantize_nested: centred = f32(absmax - offset); per 256-block nested = max |centred|,
  s2 = f32(centred * f32(1 / nested)), code = number of dynamic-map midpoints strictly below s2
  (NaN -> 255); a block with nested == 0 stores code 0.
* dequantize: scale = absmax[b], or f32(f32(dyn[q] * nested[b // 256]) + offset) for nested
  scales (both levels in the same launch); w = f32(code_value * scale), then one RNE cast.

Kernels are launched with enable_fp_fusion=False: the nested scale's multiply and add must stay
two rounded operations (no fma contraction). Divisions use tl.math.div_rn (Triton's `/` on fp32
is the approximate div.full.f32). Index math is int64 throughout.

Layout (for bandwidth on the GPU): each program handles whole blocks, about 4096 elements
(2048 packed bytes; one block for blocksize 4096). Element pairs (2j, 2j+1) travel as one
2x-wide word, little-endian (element 2j in the low half), so pair packing is register arithmetic:
quantize loads one word per output byte in the layout of the [ROWS, BLOCKSIZE // 2] byte tile;
dequantize works on [bytes // VEC, VEC] tiles (VEC = 4 bytes for 16-bit outputs, 2 for fp32) so
that each thread's byte load and its 16-byte word store share one layout: no layout conversion
through shared memory, vectorised loads and stores. Code values are gathered from a 16-entry
table argument (one cache line, L1-resident; one kernel serves NF4 and FP4). Programs entirely
inside the tensor take an unmasked path; the last program masks whole pairs and handles the last
element of an odd count on its own. No autotuning: the configuration is fixed.

The interpreter's float32 -> bfloat16 cast truncates, so under TRITON_INTERPRET the dequantize
kernel rounds to bf16 by integer arithmetic instead (BF16_BITS); compiled kernels use the native
round-to-nearest-even conversion. Wrappers accept optional preallocated outputs.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl

from nf4kern import codebook as cb

__all__ = ["quantize_blocks", "quantize_nested", "dequantize", "dequantize_with_code", "COMPILE_SPECS"]

# ------------------------------------------------------------------------------------------------
# Constants held in the kernels (exact float32 values, written as the float64 that equals them)
# ------------------------------------------------------------------------------------------------

_NF4_T = [float(t) for t in cb.nf4_thresholds()]
_FP4_T = [float(t) for t in cb.FP4_MAGNITUDE_THRESHOLDS]
assert len(_NF4_T) == 15 and len(_FP4_T) == 7
assert list(cb.FP4_CODES_BY_MAGNITUDE) == [0, 1, 6, 7, 4, 5, 2, 3]  # decoded as rank ^ (4 * bit1)

T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14 = (tl.constexpr(t) for t in _NF4_T)
M0, M1, M2, M3, M4, M5, M6 = (tl.constexpr(t) for t in _FP4_T)
TINY_ABSMAX = tl.constexpr(float(np.float32(1e-38)))  # a float32 subnormal, held exactly

ELEMS_PER_PROGRAM = 4096  # elements (whole blocks) per quantize / dequantize program
NESTED_ROWS = 8  # 256-blocks per quantize_nested program
_NUM_WARPS = 4
_LAUNCH_OPTS = {"enable_fp_fusion": False}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _rows(blocksize: int) -> int:
    return max(1, ELEMS_PER_PROGRAM // blocksize)


# ------------------------------------------------------------------------------------------------
# Code selection
# ------------------------------------------------------------------------------------------------


@triton.jit
def _nf4_code(s):
    """Number of NF4 thresholds strictly below s (a binary search over constants); NaN -> 15."""
    b3 = s > T7
    b2 = s > tl.where(b3, T11, T3)
    b1 = s > tl.where(b3, tl.where(b2, T13, T9), tl.where(b2, T5, T1))
    t0 = tl.where(b3,
                  tl.where(b2, tl.where(b1, T14, T12), tl.where(b1, T10, T8)),
                  tl.where(b2, tl.where(b1, T6, T4), tl.where(b1, T2, T0)))
    b0 = s > t0
    code = b3.to(tl.int32) * 8 + b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)
    return tl.where(s != s, 15, code)


@triton.jit
def _fp4_code(s):
    """CUDA's FP4 tree: sign bit 8 for s < 0; magnitude rank = number of thresholds strictly
    below |s|, mapped to the magnitude code rank ^ (4 * bit1(rank)); NaN -> 3."""
    a = tl.abs(s)
    r2 = a > M3
    r1 = a > tl.where(r2, M5, M1)
    r0 = a > tl.where(r2, tl.where(r1, M6, M4), tl.where(r1, M2, M0))
    r2i = r2.to(tl.int32)
    r1i = r1.to(tl.int32)
    mag = (r2i ^ r1i) * 4 + r1i * 2 + r0.to(tl.int32)
    code = tl.where(s < 0, mag + 8, mag)
    return tl.where(s != s, 3, code)


# ------------------------------------------------------------------------------------------------
# Blockwise quantization
# ------------------------------------------------------------------------------------------------


@triton.jit
def _widen16(bits, DT: tl.constexpr):
    """The float32 value of 16-bit float bits. bf16 widens exactly by a shift into the high half
    (the interpreter's bf16 -> fp32 cast mangles subnormals; on the GPU the shift is as cheap)."""
    if DT == tl.bfloat16:
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return bits.to(DT, bitcast=True).to(tl.float32)


@triton.jit
def _load_pairs(x_ptr, byte_off, n, FULL: tl.constexpr):
    """Elements 2j and 2j+1 for each byte index j of the tile, as float32 [ROWS, HALF] tiles.

    Each pair is loaded as one 2x-wide word (little-endian: element 2j is the low half), so the
    loads are contiguous in the layout of the byte tile and vectorise, and the pair split is
    register arithmetic. The tail tile masks whole pairs; the last element of an odd count is
    loaded on its own (element n is zero, the value masked loads give)."""
    if x_ptr.dtype.element_ty == tl.float32:
        words = x_ptr.to(tl.pointer_type(tl.uint64)) + byte_off
        if FULL:
            w = tl.load(words)
        else:
            w = tl.load(words, mask=byte_off * 2 + 1 < n, other=0)
        xe = (w & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        xo = (w >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    else:
        words = x_ptr.to(tl.pointer_type(tl.uint32)) + byte_off
        if FULL:
            w = tl.load(words)
        else:
            w = tl.load(words, mask=byte_off * 2 + 1 < n, other=0)
        xe = _widen16((w & 0xFFFF).to(tl.uint16), x_ptr.dtype.element_ty)
        xo = _widen16((w >> 16).to(tl.uint16), x_ptr.dtype.element_ty)
    if not FULL:
        # The last element, which lands only if n - 1 is even (odd n).
        if x_ptr.dtype.element_ty == tl.float32:
            last = tl.load(x_ptr + (n - 1))
        else:
            last = _widen16(tl.load(x_ptr.to(tl.pointer_type(tl.uint16)) + (n - 1)), x_ptr.dtype.element_ty)
        xe = tl.where(byte_off * 2 == n - 1, last, xe)
    return xe, xo


@triton.jit
def _quantize_tile(x_ptr, packed_ptr, absmax_ptr, n, pid,
                   BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, NF4: tl.constexpr, FULL: tl.constexpr):
    HALF: tl.constexpr = BLOCKSIZE // 2
    rows = pid * ROWS + tl.arange(0, ROWS)  # block indices (int64)
    byte_off = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [ROWS, HALF]
    xe, xo = _load_pairs(x_ptr, byte_off, n, FULL)

    # absmax with torch.amax semantics: a NaN anywhere makes the block's absmax NaN.
    nan_e = xe != xe
    nan_o = xo != xo
    a = tl.maximum(tl.where(nan_e, 0.0, tl.abs(xe)), tl.where(nan_o, 0.0, tl.abs(xo)))
    amax = tl.max(a, axis=1)
    n_nan = tl.sum(nan_e.to(tl.int32) + nan_o.to(tl.int32), axis=1)
    amax = tl.where(n_nan > 0, float("nan"), amax)

    # One correctly rounded reciprocal per block (a NaN absmax stays NaN: the comparison is false).
    denom = tl.where(amax < TINY_ABSMAX, TINY_ABSMAX, amax)
    recip = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), denom)[:, None]
    se = xe * recip  # no clamp: |s| > 1 takes the top code either way
    so = xo * recip

    if NF4:
        ce = _nf4_code(se)
        co = _nf4_code(so)
        ZERO: tl.constexpr = 7
    else:
        ce = _fp4_code(se)
        co = _fp4_code(so)
        ZERO: tl.constexpr = 0
    if FULL:
        tl.store(packed_ptr + byte_off, ((ce << 4) | co).to(tl.uint8))
        tl.store(absmax_ptr + rows, amax)
    else:
        # The padding nibble of an odd count is the code of 0.0, whatever the block's scale.
        co = tl.where(byte_off * 2 + 1 < n, co, ZERO)
        nbytes = (n + 1) // 2
        nblocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
        tl.store(packed_ptr + byte_off, ((ce << 4) | co).to(tl.uint8), mask=byte_off < nbytes)
        tl.store(absmax_ptr + rows, amax, mask=rows < nblocks)


@triton.jit
def _quantize_kernel(x_ptr, packed_ptr, absmax_ptr, n,
                     BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, NF4: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n = n.to(tl.int64)  # the JIT passes n < 2**31 as i32; n + 1 must not wrap
    if (pid + 1) * (ROWS * BLOCKSIZE) <= n:  # unmasked, vectorised
        _quantize_tile(x_ptr, packed_ptr, absmax_ptr, n, pid, BLOCKSIZE, ROWS, NF4, True)
    else:
        _quantize_tile(x_ptr, packed_ptr, absmax_ptr, n, pid, BLOCKSIZE, ROWS, NF4, False)


# ------------------------------------------------------------------------------------------------
# Double quantization of the absmax
# ------------------------------------------------------------------------------------------------


@triton.jit
def _quantize_nested_kernel(absmax_ptr, offset_ptr, mids_ptr, qabsmax_ptr, nested_ptr, nb,
                            ROWS: tl.constexpr):
    NB: tl.constexpr = 256
    pid = tl.program_id(0).to(tl.int64)
    nb = nb.to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * NB + tl.arange(0, NB)[None, :]  # [ROWS, 256]
    valid = offs < nb
    offset = tl.load(offset_ptr)
    a = tl.load(absmax_ptr + offs, mask=valid, other=0.0)
    centred = tl.where(valid, a - offset, 0.0)  # padding is 0 after centring

    is_nan = centred != centred
    nested = tl.max(tl.where(is_nan, 0.0, tl.abs(centred)), axis=1)
    n_nan = tl.sum(is_nan.to(tl.int32), axis=1)
    nested = tl.where(n_nan > 0, float("nan"), nested)

    recip = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), nested)  # inf for 0 / tiny nested
    s = centred * recip[:, None]

    # Number of the 255 midpoints strictly below s: binary lifting over the midpoint table.
    pos = tl.zeros([ROWS, NB], dtype=tl.int32)
    for i in tl.static_range(8):
        probe = tl.load(mids_ptr + (pos + ((128 >> i) - 1)))
        pos = tl.where(probe < s, pos + (128 >> i), pos)
    code = tl.where(s != s, 255, pos)
    code = tl.where(nested[:, None] == 0.0, 0, code)

    tl.store(qabsmax_ptr + offs, code.to(tl.uint8), mask=valid)
    n2 = (nb + NB - 1) // NB
    tl.store(nested_ptr + rows, nested, mask=rows < n2)


# ------------------------------------------------------------------------------------------------
# Dequantization
# ------------------------------------------------------------------------------------------------


@triton.jit
def _to_out(w, OUT_TY: tl.constexpr, BF16_BITS: tl.constexpr):
    """float32 -> the output dtype, rounding to nearest even.

    BF16_BITS (set only under the interpreter, whose fp32 -> bf16 cast truncates) rounds by
    integer arithmetic, NaN -> 0x7FC0 as torch does; compiled kernels use the native
    cvt.rn.bf16.f32, which rounds the same (NaN payloads aside)."""
    if BF16_BITS:
        u = w.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(w != w, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return w.to(OUT_TY)


@triton.jit
def _scale(absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, blk, valid, NESTED: tl.constexpr, FULL: tl.constexpr):
    """The float32 scale of block(s) blk; nested: f32(f32(dyn[q] * nested[blk // 256]) + offset)."""
    if FULL:
        q = tl.load(absmax_ptr + blk)
    else:
        q = tl.load(absmax_ptr + blk, mask=valid, other=0)
    if NESTED:
        dyn = tl.load(dmap_ptr + q.to(tl.int32))
        if FULL:
            nested = tl.load(nested_ptr + blk // 256)
        else:
            nested = tl.load(nested_ptr + blk // 256, mask=valid, other=0.0)
        return dyn * nested + tl.load(offset_ptr)  # two roundings: launched without fp fusion
    else:
        return q


@triton.jit
def _dequantize_tile(packed_ptr, code_ptr, absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, out_ptr, n, pid,
                     BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, NESTED: tl.constexpr,
                     BF16_BITS: tl.constexpr, FULL: tl.constexpr):
    """The tile is [BYTES // VEC, VEC] bytes, VEC bytes giving 16 output bytes per row: the byte
    loads and the word stores (two elements a word) then share one layout, with no conversion
    through shared memory."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    OUT_TY: tl.constexpr = out_ptr.dtype.element_ty
    VEC: tl.constexpr = 16 // (OUT_TY.primitive_bitwidth // 4)  # 4 bytes for 16-bit outputs, 2 for fp32
    BYTES: tl.constexpr = ROWS * HALF
    row_start = pid * BYTES + tl.arange(0, BYTES // VEC) * VEC  # int64
    byte_off = row_start[:, None] + tl.arange(0, VEC)[None, :]
    blk = row_start // HALF  # a row lies inside one block
    nblocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    if FULL:
        byte = tl.load(packed_ptr + byte_off)
    else:
        byte = tl.load(packed_ptr + byte_off, mask=byte_off < (n + 1) // 2, other=0)
    scale = _scale(absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, blk, blk < nblocks, NESTED, FULL)[:, None]

    b = byte.to(tl.int32)
    w_hi = tl.load(code_ptr + (b >> 4)) * scale  # element 2j
    w_lo = tl.load(code_ptr + (b & 15)) * scale  # element 2j + 1

    # One 2x-wide word per byte, element 2j in the low half.
    if OUT_TY == tl.float32:
        word = w_hi.to(tl.uint32, bitcast=True).to(tl.uint64) | (w_lo.to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
        words = out_ptr.to(tl.pointer_type(tl.uint64)) + byte_off
    else:
        h = _to_out(w_hi, OUT_TY, BF16_BITS).to(tl.uint16, bitcast=True).to(tl.uint32)
        lo = _to_out(w_lo, OUT_TY, BF16_BITS).to(tl.uint16, bitcast=True).to(tl.uint32)
        word = h | (lo << 16)
        words = out_ptr.to(tl.pointer_type(tl.uint32)) + byte_off
    if FULL:
        tl.store(words, word)
    else:
        tl.store(words, word, mask=byte_off * 2 + 1 < n)
        if n % 2 == 1:  # the last element of an odd count: its own store
            last = n - 1
            c = (tl.load(packed_ptr + last // 2) >> 4).to(tl.int32)
            s = _scale(absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, last // BLOCKSIZE, True, NESTED, True)
            tl.store(out_ptr + last, _to_out(tl.load(code_ptr + c) * s, OUT_TY, BF16_BITS))


@triton.jit
def _dequantize_kernel(packed_ptr, code_ptr, absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, out_ptr,
                       n, BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, NESTED: tl.constexpr,
                       BF16_BITS: tl.constexpr = False):
    pid = tl.program_id(0).to(tl.int64)
    n = n.to(tl.int64)  # the JIT passes n < 2**31 as i32; n + 1 must not wrap
    if (pid + 1) * (ROWS * BLOCKSIZE) <= n:  # unmasked, vectorised
        _dequantize_tile(packed_ptr, code_ptr, absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, out_ptr, n, pid,
                         BLOCKSIZE, ROWS, NESTED, BF16_BITS, True)
    else:
        _dequantize_tile(packed_ptr, code_ptr, absmax_ptr, nested_ptr, offset_ptr, dmap_ptr, out_ptr, n, pid,
                         BLOCKSIZE, ROWS, NESTED, BF16_BITS, False)


# ------------------------------------------------------------------------------------------------
# Launch wrappers
# ------------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _host_tables() -> dict[str, np.ndarray]:
    dyn = cb.dynamic_map()
    return {
        "nf4": np.ascontiguousarray(cb.nf4_codebook(), dtype=np.float32),
        "fp4": np.ascontiguousarray(cb.fp4_codebook(), dtype=np.float32),
        "dyn": np.ascontiguousarray(dyn, dtype=np.float32),
        # float32 midpoints, computed in float32 as the format defines them
        "mids": np.ascontiguousarray((dyn[:-1] + dyn[1:]) / np.float32(2.0), dtype=np.float32),
    }


_device_tables: dict[tuple[str, str], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    key = (name, str(device))
    t = _device_tables.get(key)
    if t is None:
        t = torch.from_numpy(_host_tables()[name].copy()).to(device)
        _device_tables[key] = t
    return t


def _check_out(out, shape, dtype, device, name):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if out.shape != torch.Size(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def quantize_blocks(x: torch.Tensor, blocksize: int, quant_type: str, *,
                    packed_out: torch.Tensor | None = None,
                    absmax_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: contiguous fp32/fp16/bf16 tensor (any shape; treated flat, n = numel). Returns
    (packed uint8 [ceil(n/2)], absmax fp32 [ceil(n/blocksize)]). packed_out / absmax_out:
    optional preallocated outputs."""
    cb.check_blocksize(blocksize)
    cb.check_quant_type(quant_type)
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    flat = x.reshape(-1)
    if not flat.is_contiguous() or flat.data_ptr() % (2 * flat.element_size()):
        flat = flat.clone()  # element pairs are loaded as one word: needs a pair-aligned start
    n = flat.numel()
    nblocks = -(-n // blocksize)
    packed = _check_out(packed_out, ((n + 1) // 2,), torch.uint8, x.device, "packed_out")
    absmax = _check_out(absmax_out, (nblocks,), torch.float32, x.device, "absmax_out")
    if n == 0:
        return packed, absmax
    rows = _rows(blocksize)
    grid = (triton.cdiv(nblocks, rows),)
    _quantize_kernel[grid](flat, packed, absmax, n, BLOCKSIZE=blocksize, ROWS=rows,
                           NF4=quant_type == "nf4", num_warps=_NUM_WARPS, **_LAUNCH_OPTS)
    return packed, absmax


def quantize_nested(absmax: torch.Tensor, offset: torch.Tensor, *,
                    qabsmax_out: torch.Tensor | None = None,
                    nested_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax fp32 [B], offset fp32 0-dim (computed by the caller as absmax.mean()). Returns
    (qabsmax uint8 [B], nested_absmax fp32 [ceil(B/256)])."""
    if absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise ValueError(f"absmax must be a 1-D float32 tensor, got {absmax.dtype} {tuple(absmax.shape)}")
    if offset.dtype != torch.float32 or offset.numel() != 1:
        raise ValueError(f"offset must be a float32 scalar tensor, got {offset.dtype} {tuple(offset.shape)}")
    absmax = absmax.contiguous()
    offset = offset.reshape(()).to(absmax.device)
    nb = absmax.numel()
    n2 = -(-nb // cb.NESTED_BLOCKSIZE)
    qabsmax = _check_out(qabsmax_out, (nb,), torch.uint8, absmax.device, "qabsmax_out")
    nested = _check_out(nested_out, (n2,), torch.float32, absmax.device, "nested_out")
    if nb == 0:
        return qabsmax, nested
    grid = (triton.cdiv(n2, NESTED_ROWS),)
    _quantize_nested_kernel[grid](absmax, offset, _table("mids", absmax.device), qabsmax, nested, nb,
                                  ROWS=NESTED_ROWS, num_warps=_NUM_WARPS, **_LAUNCH_OPTS)
    return qabsmax, nested


def dequantize(packed, absmax, n, blocksize, quant_type, out_dtype, nested_absmax=None, offset=None,
               *, out: torch.Tensor | None = None) -> torch.Tensor:
    """packed uint8 [ceil(n/2)]; absmax fp32 [B] (plain) or uint8 [B] (nested codes, then
    nested_absmax fp32 [ceil(B/256)] and offset fp32 0-dim are given). Returns flat [n] in
    out_dtype (or writes `out`). Both scale levels are decoded in one launch."""
    cb.check_quant_type(quant_type)
    return dequantize_with_code(packed, _table(quant_type, packed.device), absmax, n, blocksize, out_dtype,
                                nested_absmax, offset, out=out)


def dequantize_with_code(packed, code, absmax, n, blocksize, out_dtype, nested_absmax=None, offset=None,
                         *, out: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize with the 16 code values given as a float32 tensor on packed's device (as the
    matmul kernels take them) instead of a quant_type."""
    cb.check_blocksize(blocksize)
    if code.dtype != torch.float32 or code.numel() != 16 or code.device != packed.device:
        raise ValueError(f"code must be 16 float32 values on {packed.device}")
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    n = int(n)
    nblocks = -(-n // blocksize)
    device = packed.device
    packed = packed.reshape(-1).contiguous()
    if packed.dtype != torch.uint8 or packed.numel() < (n + 1) // 2:
        raise ValueError(f"packed must be uint8 with at least {(n + 1) // 2} bytes, got {packed.dtype} [{packed.numel()}]")
    nested = nested_absmax is not None
    if nested:
        if offset is None:
            raise ValueError("nested_absmax needs offset")
        if absmax.dtype != torch.uint8:
            raise ValueError(f"nested absmax codes must be uint8, got {absmax.dtype}")
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() < -(-nblocks // cb.NESTED_BLOCKSIZE):
            raise ValueError("nested_absmax must be float32 [ceil(B / 256)]")
        nested_absmax = nested_absmax.reshape(-1).contiguous()
        offset = offset.reshape(()).to(device=device, dtype=torch.float32)
    elif absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be float32 without nested_absmax, got {absmax.dtype}")
    absmax = absmax.reshape(-1).contiguous()
    if absmax.numel() < nblocks:
        raise ValueError(f"absmax has {absmax.numel()} blocks, {nblocks} needed")
    result = _check_out(out, (n,), out_dtype, device, "out")
    if result.data_ptr() % (2 * result.element_size()):
        raise ValueError("out must start at an even element offset (pairs are stored as one word)")
    if n == 0:
        return result
    dmap = _table("dyn", device)
    rows = _rows(blocksize)
    grid = (triton.cdiv(nblocks, rows),)
    _dequantize_kernel[grid](
        packed, code.reshape(-1).contiguous(), absmax,
        nested_absmax if nested else dmap, offset if nested else dmap, dmap, result, n,
        BLOCKSIZE=blocksize, ROWS=rows, NESTED=nested,
        BF16_BITS=out_dtype == torch.bfloat16 and _interpreted(), num_warps=_NUM_WARPS, **_LAUNCH_OPTS)
    return result


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (nf4kern.compile_gate)
# ------------------------------------------------------------------------------------------------

_TL = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
# Bit-exactness in the PTX: no approximate division, no flush-to-zero, no contracted multiply-add.
EXACT_PTX_FORBIDDEN = (r"div\.(?:full|approx)", r"\.ftz\b", r"\bfma\.")


def _pointer_attrs(fn, signature: dict) -> dict:
    """tt.divisibility=16 on every pointer, as the JIT specialises 16-byte-aligned tensors."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if signature[name].startswith("*")}


def _compile_specs() -> list:
    try:
        from nf4kern.compile_gate import KernelSpec
    except ImportError:  # pragma: no cover - the gate is part of the package
        KernelSpec = None

    def spec(name, fn, types, constexprs, num_warps=_NUM_WARPS):
        signature = {a: ("constexpr" if a in constexprs else types[a]) for a in fn.arg_names}
        fields = dict(name=name, fn=fn, signature=signature, constexprs=dict(constexprs),
                      num_warps=num_warps, num_stages=1, require_wgmma_on=(),
                      attrs=_pointer_attrs(fn, signature))
        if KernelSpec is None:
            return fields
        return KernelSpec(**fields, enable_fp_fusion=False, forbid_ptx=EXACT_PTX_FORBIDDEN)

    specs = []
    # Every input dtype at the default blocksize; bf16 (QLoRA's) at every other blocksize.
    per_blocksize = [(64, ("fp32", "fp16", "bf16"))] + [(bs, ("bf16",)) for bs in cb.BLOCKSIZES if bs != 64]
    for bs, dtypes in per_blocksize:
        for dt in dtypes:
            for qt in ("nf4", "fp4"):
                types = {"x_ptr": _TL[dt], "packed_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i64"}
                specs.append(spec(f"quantize_{qt}_{dt}_bs{bs}", _quantize_kernel, types,
                                  dict(BLOCKSIZE=bs, ROWS=_rows(bs), NF4=qt == "nf4")))
            for nested in (False, True):
                types = {"packed_ptr": "*u8", "code_ptr": "*fp32",
                         "absmax_ptr": "*u8" if nested else "*fp32", "nested_ptr": "*fp32",
                         "offset_ptr": "*fp32", "dmap_ptr": "*fp32", "out_ptr": _TL[dt], "n": "i64"}
                tag = "nested" if nested else "plain"
                specs.append(spec(f"dequantize_{dt}_{tag}_bs{bs}", _dequantize_kernel, types,
                                  dict(BLOCKSIZE=bs, ROWS=_rows(bs), NESTED=nested, BF16_BITS=False)))
    types = {"absmax_ptr": "*fp32", "offset_ptr": "*fp32", "mids_ptr": "*fp32", "qabsmax_ptr": "*u8",
             "nested_ptr": "*fp32", "nb": "i64"}
    specs.append(spec("quantize_nested", _quantize_nested_kernel, types, dict(ROWS=NESTED_ROWS)))
    return specs


COMPILE_SPECS = _compile_specs()
