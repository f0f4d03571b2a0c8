"""Fused 4-bit (NF4/FP4) matmuls: y = x @ W_hat^T + bias and dx = dy @ W_hat.

The fused kernels never materialise W_hat [N, K]: each loads the packed bytes of one weight tile,
splits the nibbles, looks the codes up in the 16-entry fp32 code table, decodes the block scale
of each element from its flat block index (plain fp32 absmax, or nested: 8-bit code -> dynamic
map * nested absmax + offset), multiplies in fp32, and feeds the tile to the tensor cores.

Paths (default configs in _TABLES, chosen by _pick from M, the activation dtype, K and the
blocksize; on a GPU the first call of a shape times the candidates of _candidates and keeps the
fastest, see "Autotuning"; the interpreter takes the defaults):

* M == 1 (decode), forward: `_nf4_gemv_kernel`. No tl.dot (it needs >= 16 rows): each program
  dequantizes [64, 64] weight tiles and accumulates w * x in fp32 (explicit tl.fma), one tl.sum
  at the end. Grid (N tiles, SPLIT_K); with SPLIT_K > 1 the fp32 partials go to a workspace and
  `_splitk_reduce_kernel` sums them in a fixed order (deterministic), adds the bias and casts.
* 2 <= M <= 64: `_nf4_gemm_kernel` / `_nf4_gemm_dx_kernel` with BLOCK_M >= M (one M tile, so
  every packed byte is read once) and split-K sized to ~2 programs per SM.
* M > 64: the same kernels as a tiled GEMM (128 x 128 x 32 forward, 128 x 64 output x 32 for dx,
  8 warps, grouped program order so weight tiles are reused from L2); on sm_90 with
  K % blocksize == 0, 256-row tiles. On sm_90 the tl.dot lowers to wgmma.
* M > 64, tuned: `_DENSE`, the dequantize kernel (kernels.quant) writing W_hat, then torch's
  GEMM, where the autotuner finds it faster (fp16/bf16, no LoRA epilogue).
* dx = dy @ W_hat reads the weight tile in its natural [n, k] orientation (reduction over N);
  the forward transposes the dequantized [n, k] tile in-kernel (tl.trans).
* LoRA epilogue (forward, optional): y += lora_scale * lora_s @ lora_b^T on the fp32
  accumulator of the base GEMM / GEMV, so y is written once (split 0 adds it under split-K).
  dx has its own (optional): dx += (lora_ds @ lora_a) * keep / (1 - p), the dropout mask
  regenerated from the seed per output tile (_keep_tile, shared with kernels.lora).

Format facts the kernels rely on: element (n, k) has flat index f = n*K + k (int64 in-kernel),
byte f // 2, high nibble when f is even; block f // blocksize (blocks may straddle rows).
When K is even (PAIRED) a byte holds two elements of one row and one block, so bytes are loaded
once, both nibbles decoded, one scale is decoded per byte, and tl.interleave restores the k
order. When K % blocksize == 0 and a tile's K extent lies inside one block (ROW_SCALE), the
scale is decoded once per row of the tile.

The nested scale is fp32(fp32(dmap[q] * nested) + offset), as the format defines it: kernels are
launched with enable_fp_fusion=False so the compiler cannot contract it into an fma (the
matmul's own accumulation uses tl.dot or an explicit tl.fma). fp32 activations use 3xTF32 dots.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from . import quant

__all__ = ["nf4_matmul", "nf4_matmul_dx", "tuning_report", "COMPILE_SPECS"]

_NESTED_BLOCKSIZE = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Two gaps of Triton's interpreter (3.9) with bfloat16, which numpy lacks: tl.dot runs np.matmul
# on the raw uint16 storage, and an fp32 -> bf16 cast truncates where compiled code rounds to
# nearest even. Under the interpreter, bf16 dot operands are widened to fp32 (exact: products of
# bf16 values are exact in fp32) and fp32 -> bf16 casts round explicitly. Compiled kernels never
# take these branches.
_INTERPRETER_BF16 = tl.constexpr(_interpreting())


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _block_scale(block, mask, absmax_ptr, qabsmax_ptr, nested_ptr, offset, dmap_ptr, NESTED: tl.constexpr):
    """fp32 scale of flat block index `block` (int64 tensor); masked lanes get a finite value."""
    if NESTED:
        q = tl.load(qabsmax_ptr + block, mask=mask, other=0).to(tl.int32)
        d = tl.load(dmap_ptr + q)
        na = tl.load(nested_ptr + block // 256, mask=mask, other=0.0)
        s = d * na + offset
    else:
        s = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return s


@triton.jit
def _dequant_tile(packed_ptr, code_ptr, absmax_ptr, qabsmax_ptr, nested_ptr, offset, dmap_ptr,
                  rows, row_mask, c0, K,
                  BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, PAIRED: tl.constexpr,
                  ROW_SCALE: tl.constexpr, NESTED: tl.constexpr):
    """fp32 W_hat[rows, c0:c0+BLOCK_C] ([R, BLOCK_C]); out-of-range elements are finite (0 * x).

    rows: int64 [R]. c0 is a multiple of BLOCK_C (even when PAIRED).
    """
    if PAIRED:
        half = c0 // 2 + tl.arange(0, BLOCK_C // 2)
        m = row_mask[:, None] & (half[None, :] < K // 2)
        byte = rows[:, None] * (K // 2) + half[None, :]
        b = tl.load(packed_ptr + byte, mask=m, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (b >> 4))
        lo = tl.load(code_ptr + (b & 15))
        if ROW_SCALE:
            s = _block_scale((rows * K + c0) // BLOCKSIZE, row_mask, absmax_ptr, qabsmax_ptr,
                             nested_ptr, offset, dmap_ptr, NESTED)[:, None]
        else:
            # Both elements of a byte share a block: f = 2 * byte is even and blocksize is even.
            s = _block_scale((byte * 2) // BLOCKSIZE, m, absmax_ptr, qabsmax_ptr, nested_ptr,
                             offset, dmap_ptr, NESTED)
        w = tl.interleave(hi * s, lo * s)
    else:
        cols = c0 + tl.arange(0, BLOCK_C)
        m = row_mask[:, None] & (cols[None, :] < K)
        f = rows[:, None] * K + cols[None, :]
        b = tl.load(packed_ptr + (f >> 1), mask=m, other=0).to(tl.int32)
        shift = (4 - 4 * (f & 1)).to(tl.int32)
        v = tl.load(code_ptr + ((b >> shift) & 15))
        if ROW_SCALE:
            s = _block_scale((rows * K + c0) // BLOCKSIZE, row_mask, absmax_ptr, qabsmax_ptr,
                             nested_ptr, offset, dmap_ptr, NESTED)[:, None]
        else:
            s = _block_scale(f // BLOCKSIZE, m, absmax_ptr, qabsmax_ptr, nested_ptr, offset,
                             dmap_ptr, NESTED)
        w = v * s
    return w


@triton.jit
def _store_tile(acc, offs_m, offs_n, mask_m, mask_n, M, N, bias_ptr, out_ptr, stride_om,
                ws_ptr, pid_k, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write an fp32 [BM, BN] accumulator: the final output (bias, cast) or a split-K partial."""
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, _cast(acc, out_ptr.dtype.element_ty), mask=mask)
    else:
        base = pid_k.to(tl.int64) * M * N
        tl.store(ws_ptr + base + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _cast(v, dtype: tl.constexpr):
    """v.to(dtype), rounding fp32 -> bf16 to nearest even under the interpreter too."""
    if _INTERPRETER_BF16 and dtype == tl.bfloat16 and v.dtype == tl.float32:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _dot(a, b, acc, FP32_PRECISION: tl.constexpr):
    """acc += a @ b with fp32 accumulation; a and b share one dtype."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=FP32_PRECISION)
    elif _INTERPRETER_BF16 and a.dtype == tl.bfloat16:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _lora_epilogue(acc, s_ptr, b_ptr, scale, r, stride_sm, stride_bn, offs_m, offs_n, mask_m,
                   mask_n, dot_dtype: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """acc + scale * (S[offs_m, :r] @ B[offs_n, :r]^T): S and B rounded to dot_dtype (the
    activation dtype), fp32 accumulation. Not software-pipelined: it runs once per tile."""
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.range(0, r, BLOCK_R, num_stages=1):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < r
        sv = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :],
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        bv = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :],
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        lora = _dot(_cast(sv, dot_dtype), tl.trans(_cast(bv, dot_dtype)), lora, FP32_PRECISION)
    return acc + scale * lora


@triton.jit
def _keep_tile(seed, p, rows, c0, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The LoRA dropout mask (True = keep) of x[rows, c0:c0+BLOCK_C] ([BLOCK_R, BLOCK_C]).

    keep(m, k) = u >= p with u uniform in [0, 1) from output k % 4 of Philox4x32-10 keyed by the
    seed at counter (k // 4, m, 0, 0): the row and the column are separate 32-bit counters (no
    flat index to overflow at M * K >= 2^31) and one Philox call serves four columns. A pure
    function of (seed, m, k), whatever the tiling: c0 must be a multiple of 4.
    """
    quad = (c0 // 4 + tl.arange(0, BLOCK_C // 4)).to(tl.uint32)
    zero = tl.zeros((BLOCK_R, BLOCK_C // 4), dtype=tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, quad[None, :] + zero, rows.to(tl.uint32)[:, None] + zero,
                               zero, zero)
    # Column 4j + i takes output i of counter j.
    bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return tl.uint_to_uniform_float(bits) >= p


@triton.jit
def _lora_dx_epilogue(acc, ds_ptr, a_ptr, r, stride_dsm, stride_ar, offs_m, offs_k, mask_m,
                      mask_k, k0, seed, p, keep_scale, dot_dtype: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      DROPOUT: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """acc + (dS[offs_m, :r] @ A[:r, offs_k]) * keep / (1 - p): dS and A rounded to dot_dtype
    (the activation dtype), fp32 accumulation; the mask regenerated from the seed."""
    lora = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in tl.range(0, r, BLOCK_R, num_stages=1):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < r
        dsv = tl.load(ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :],
                      mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        av = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :],
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        lora = _dot(_cast(dsv, dot_dtype), _cast(av, dot_dtype), lora, FP32_PRECISION)
    if DROPOUT:
        keep = _keep_tile(seed, p, offs_m, k0, BLOCK_M, BLOCK_K)
        lora = tl.where(keep, lora, 0.0) * keep_scale
    return acc + lora


@triton.jit
def _grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program order that walks GROUP_M row tiles per column tile so weight tiles stay in L2."""
    in_group = GROUP_M * num_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _nf4_gemm_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, qabsmax_ptr, nested_ptr, offset_ptr,
                     dmap_ptr, bias_ptr, out_ptr, ws_ptr, lora_s_ptr, lora_b_ptr,
                     M, N, K, stride_xm, stride_om, k_per_split,
                     lora_scale, lora_r, stride_sm, stride_bn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                     PAIRED: tl.constexpr, ROW_SCALE: tl.constexpr, NESTED: tl.constexpr,
                     HAS_BIAS: tl.constexpr, FP32_PRECISION: tl.constexpr,
                     HAS_LORA: tl.constexpr, LORA_BLOCK_R: tl.constexpr):
    """y[M, N] = x[M, K] @ W_hat[N, K]^T (+ bias) (+ lora_scale * lora_s[M, r] @ lora_b[N, r]^T);
    grid (tiles of M x N, SPLIT_K). The LoRA term rides in the epilogue (split 0 only)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_pid(pid, num_m, num_n, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)

    x_rows = x_ptr + offs_m[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(packed_ptr, code_ptr, absmax_ptr, qabsmax_ptr, nested_ptr, offset,
                          dmap_ptr, offs_n, mask_n, k0, K, BLOCK_K, BLOCKSIZE, PAIRED, ROW_SCALE,
                          NESTED)
        acc = _dot(a, tl.trans(_cast(w, a.dtype)), acc, FP32_PRECISION)

    if HAS_LORA:
        if pid_k == 0:
            acc = _lora_epilogue(acc, lora_s_ptr, lora_b_ptr, lora_scale, lora_r, stride_sm,
                                 stride_bn, offs_m, offs_n, mask_m, mask_n, x_ptr.dtype.element_ty,
                                 BLOCK_M, BLOCK_N, LORA_BLOCK_R, FP32_PRECISION)
    _store_tile(acc, offs_m, offs_n, mask_m, mask_n, M, N, bias_ptr, out_ptr, stride_om,
                ws_ptr, pid_k, SPLIT_K, HAS_BIAS)


@triton.jit
def _nf4_gemm_dx_kernel(dy_ptr, packed_ptr, code_ptr, absmax_ptr, qabsmax_ptr, nested_ptr,
                        offset_ptr, dmap_ptr, out_ptr, ws_ptr, lora_ds_ptr, lora_a_ptr,
                        M, N, K, stride_dm, stride_om, n_per_split,
                        lora_r, stride_dsm, stride_ar, seed, drop_p, keep_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                        PAIRED: tl.constexpr, ROW_SCALE: tl.constexpr, NESTED: tl.constexpr,
                        FP32_PRECISION: tl.constexpr, HAS_LORA: tl.constexpr,
                        LORA_BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr):
    """dx[M, K] = dy[M, N] @ W_hat[N, K] (+ (lora_ds[M, r] @ lora_a[r, K]) * keep / (1 - p));
    output tiles BLOCK_M x BLOCK_K, reduction over N in BLOCK_N steps; grid (tiles of M x K,
    SPLIT_K over N). The LoRA term rides in the epilogue (split 0 only), its dropout mask
    regenerated from the seed."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = _grouped_pid(pid, num_m, num_k, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)

    dy_rows = dy_ptr + offs_m[:, None] * stride_dm
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.load(dy_rows + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                    other=0.0)
        w = _dequant_tile(packed_ptr, code_ptr, absmax_ptr, qabsmax_ptr, nested_ptr, offset,
                          dmap_ptr, offs_n.to(tl.int64), mask_n, k0, K, BLOCK_K, BLOCKSIZE, PAIRED,
                          ROW_SCALE, NESTED)
        acc = _dot(g, _cast(w, g.dtype), acc, FP32_PRECISION)

    if HAS_LORA:
        if pid_s == 0:
            acc = _lora_dx_epilogue(acc, lora_ds_ptr, lora_a_ptr, lora_r, stride_dsm, stride_ar,
                                    offs_m, offs_k, mask_m, mask_k, k0, seed, drop_p, keep_scale,
                                    dy_ptr.dtype.element_ty, BLOCK_M, BLOCK_K, LORA_BLOCK_R,
                                    DROPOUT, FP32_PRECISION)
    _store_tile(acc, offs_m, offs_k, mask_m, mask_k, M, K, out_ptr, out_ptr, stride_om,
                ws_ptr, pid_s, SPLIT_K, False)


@triton.jit
def _nf4_gemv_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, qabsmax_ptr, nested_ptr, offset_ptr,
                     dmap_ptr, bias_ptr, out_ptr, ws_ptr, lora_s_ptr, lora_b_ptr,
                     N, K, k_per_split, lora_scale, lora_r, stride_bn,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     BLOCKSIZE: tl.constexpr, PAIRED: tl.constexpr, ROW_SCALE: tl.constexpr,
                     NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                     LORA_BLOCK_R: tl.constexpr):
    """y[1, N] = x[1, K] @ W_hat^T without tl.dot: fp32 multiply-accumulate and one tl.sum."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)

    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if PAIRED:
        # Keep the nibbles apart (no interleave): even and odd elements of x meet the high and
        # low nibbles of the same bytes.
        acc = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            hmask = half < K // 2
            m = mask_n[:, None] & hmask[None, :]
            byte = offs_n[:, None] * (K // 2) + half[None, :]
            b = tl.load(packed_ptr + byte, mask=m, other=0).to(tl.int32)
            hi = tl.load(code_ptr + (b >> 4))
            lo = tl.load(code_ptr + (b & 15))
            if ROW_SCALE:
                s = _block_scale((offs_n * K + k0) // BLOCKSIZE, mask_n, absmax_ptr, qabsmax_ptr,
                                 nested_ptr, offset, dmap_ptr, NESTED)[:, None]
            else:
                s = _block_scale((byte * 2) // BLOCKSIZE, m, absmax_ptr, qabsmax_ptr, nested_ptr,
                                 offset, dmap_ptr, NESTED)
            xe = tl.load(x_ptr + 2 * half, mask=hmask, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + 2 * half + 1, mask=hmask, other=0.0).to(tl.float32)
            acc = tl.fma(hi * s, xe[None, :], acc)
            acc = tl.fma(lo * s, xo[None, :], acc)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = _dequant_tile(packed_ptr, code_ptr, absmax_ptr, qabsmax_ptr, nested_ptr, offset,
                              dmap_ptr, offs_n, mask_n, k0, K, BLOCK_K, BLOCKSIZE, PAIRED,
                              ROW_SCALE, NESTED)
            xk = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            acc = tl.fma(w, xk[None, :], acc)
    y = tl.sum(acc, axis=1)
    if HAS_LORA:
        if pid_k == 0:
            lora = tl.zeros((BLOCK_N, LORA_BLOCK_R), dtype=tl.float32)
            for r0 in tl.range(0, lora_r, LORA_BLOCK_R, num_stages=1):
                offs_r = r0 + tl.arange(0, LORA_BLOCK_R)
                mask_r = offs_r < lora_r
                sv = tl.load(lora_s_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
                bv = tl.load(lora_b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :],
                             mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
                lora = tl.fma(bv, sv[None, :], lora)
            y = y + lora_scale * tl.sum(lora, axis=1)

    if SPLIT_K == 1:
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, _cast(y, out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.store(ws_ptr + pid_k.to(tl.int64) * N + offs_n, y, mask=mask_n)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, M, N, stride_om,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, n] = sum_s ws[s, m, n] (+ bias[n]), summed in split order; grid (N tiles, M)."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs_n < N
    mn = M.to(tl.int64) * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * mn + m * N + offs_n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, _cast(acc, out_ptr.dtype.element_ty),
             mask=mask)


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    """Tiles of one launch. Forward: BLOCK_M x BLOCK_N output, BLOCK_K reduction step (a cap:
    narrowed to the blocksize when rows hold whole blocks). dx: BLOCK_M x BLOCK_K output,
    BLOCK_N reduction step over N."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# Every config below compiles for sm_80 and sm_90 with 0 spilled bytes under Triton 3.6 (the GPU
# machine's) and the newest Triton (CI's): `make test` gates both (COMPILE_SPECS). The first
# entry of each list is the generic one: the one used under the interpreter and on GPUs other
# than sm_90. Triton 3.6's ptxas (CUDA 12.8, no --regAllocOptLevel=2) is the tighter of the two.
# GEMV, 8 warps: 16 weight elements a thread per [64, 64] tile (4 warps spill on sm_90 with 3.6).
_GEMV = _Config(1, 64, 64, 1, 8, 3)
_GEMV_ODD_K = _Config(1, 32, 64, 1, 4, 3)


@dataclass(frozen=True)
class _Table:
    """Configs of one GEMM kind: (largest M, config) buckets for M <= 64 (split-K, a single M
    tile so each packed byte is read once), the large-M GEMM, and its sm_90 variant (aligned K
    only: 256 rows amortise each dequantized weight tile) or None."""
    buckets: tuple
    large: _Config
    large_sm90: _Config | None = None


_TABLES = {
    # bf16 / fp16 activations, even K.
    ("fwd", "half"): _Table(((16, _Config(16, 64, 64, 1, 4, 4)),
                             # 8 warps: half the dequant registers (4 spill on sm_80, 3.6);
                             # 2 stages: 3 spill on sm_90 with 3.6 when split-K is 1.
                             (32, _Config(32, 64, 64, 1, 8, 2)),
                             (64, _Config(64, 64, 64, 1, 4, 4))),
                            _Config(128, 128, 32, 8, 8, 4), _Config(256, 64, 32, 8, 8, 3)),
    ("dx", "half"): _Table(((16, _Config(16, 64, 64, 1, 4, 4)),
                            (64, _Config(64, 64, 64, 1, 4, 3))),
                           _Config(128, 32, 64, 8, 8, 4), _Config(256, 32, 64, 8, 8, 3)),
    # fp32 activations, even K: 3xTF32 dots and fp32 weight tiles in shared memory.
    ("fwd", "fp32"): _Table(((16, _Config(16, 64, 32, 1, 4, 4)),
                             (64, _Config(64, 64, 32, 1, 4, 4))),
                            _Config(128, 64, 32, 8, 8, 3)),
    ("dx", "fp32"): _Table(((16, _Config(16, 64, 64, 1, 4, 4)),
                            (64, _Config(64, 32, 64, 1, 4, 3))),
                           _Config(128, 32, 64, 8, 8, 3)),
    # Odd K, any dtype: per-element nibbles and scales (about 5 gathers an element, staged in
    # shared memory by the pipeliner): smaller tiles, two stages.
    ("fwd", "odd"): _Table(((16, _Config(16, 64, 32, 1, 4, 2)),
                            (64, _Config(64, 32, 32, 1, 4, 2))),
                           _Config(128, 64, 32, 8, 8, 2)),
    # dx, M <= 16: 16 x 32 output tiles (16 x 64 spills on sm_80 with 3.6) and a 32-row N step
    # (64 spills fp32 at split-K 1 on sm_80 with 3.6).
    ("dx", "odd"): _Table(((16, _Config(16, 32, 32, 1, 4, 2)),
                           (64, _Config(64, 32, 64, 1, 4, 2))),
                          _Config(128, 32, 64, 8, 8, 2)),
}
_SPLIT_REDUCE_BLOCK = 256
_MAX_SPLIT = 16
_LARGE_M = 64  # M above this: the tiled GEMM without split-K


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int) -> tuple[int, int]:
    """(SM count, major compute capability) of one CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.major


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())[0]
    return 132  # H100/H200-class default when no GPU is queried (interpreter, CPU)


def _is_sm90(device: torch.device) -> bool:
    if _interpreting() or device.type != "cuda":
        return False
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())[1] == 9


def _block_k_for(block_k: int, blocksize: int, K: int) -> int:
    """The K step: inside one quantization block when rows hold whole blocks (one scale per
    row of the tile), and never wider than a tiny K needs."""
    if K % blocksize == 0 and blocksize < block_k:
        block_k = blocksize
    return max(32, min(block_k, triton.next_power_of_2(max(K, 1))))


def _split_for(tiles: int, red: int, step: int, device: torch.device, min_steps: int = 4):
    """(split, per_split): split a reduction of length `red` so about 2 programs per SM run,
    each over at least `min_steps` steps; per_split is a multiple of `step`, no split is empty."""
    want = max(1, (2 * _sm_count(device)) // max(tiles, 1))
    split = max(1, min(want, triton.cdiv(red, step) // min_steps, _MAX_SPLIT))
    return _per_split(red, step, split)


def _variant(dtype: torch.dtype, K: int) -> str:
    return "odd" if K % 2 else ("fp32" if dtype == torch.float32 else "half")


def _pick(kind: str, M: int, dtype: torch.dtype, K: int, blocksize: int,
          device: torch.device) -> _Config:
    """The config of the forward ("fwd") or dx GEMM for M > 1 rows of `dtype` activations."""
    table = _TABLES[(kind, _variant(dtype, K))]
    for bound, cfg in table.buckets:
        if M <= bound:
            return cfg
    if table.large_sm90 is not None and K % blocksize == 0 and _is_sm90(device):
        return table.large_sm90
    return table.large


# Autotuning
# ------------------------------------------------------------------------------------------------
# On a GPU, the first call of each (pass, M bucket, N, K, blocksize, dtypes, epilogues) times its
# candidate launches and keeps the fastest for the rest of the process: for M <= 64 the table's
# config at every split-K size from 1 to _MAX_SPLIT, for larger M the table's GEMM, the
# alternates below (K % blocksize == 0) and, for fp16/bf16 without a LoRA epilogue, the
# unfused "dequantize kernel, then torch's GEMM (cuBLAS)" (_DENSE: it writes the whole W_hat,
# N*K elements, for the call). The table's own choice comes first and is what runs
# untimed: under the interpreter, with NF4KERN_AUTOTUNE=0, under
# torch.use_deterministic_algorithms(True) (a tuned split-K size changes the fp32 summation
# order, so two processes could differ in the last bits), and while a CUDA graph is captured
# before its shape was tuned. Every alternate is in the compile gate.
_LARGE_ALTERNATES = {
    ("fwd", "half"): (_Config(128, 64, 32, 8, 4, 4), _Config(128, 128, 64, 8, 8, 3)),
    ("dx", "half"): (_Config(128, 64, 64, 8, 8, 3), _Config(64, 32, 64, 8, 4, 4)),
}
_TUNED: dict = {}


@dataclass(frozen=True)
class _Launch:
    """One candidate launch: a config and how many ways the reduction is split; cfg None is
    _DENSE."""
    cfg: _Config | None
    split: int


_DENSE = _Launch(None, 1)


def _split_sizes(tiles: int, red: int, step: int, device: torch.device) -> list[int]:
    """The heuristic split of _split_for first, then every other power of two that leaves each
    split at least 4 steps (1 always)."""
    first = _split_for(tiles, red, step, device)[0]
    most = min(triton.cdiv(red, step) // 4, _MAX_SPLIT)
    return [first] + [s for s in (1, 2, 4, 8, 16) if s <= max(most, 1) and s != first]


def _per_split(red: int, step: int, split: int) -> tuple[int, int]:
    """(splits actually launched, reduction length per split, a multiple of step): none is
    empty; an empty reduction (N == 0 in dx) is one split of length 0."""
    per_split = triton.cdiv(triton.cdiv(red, step), split) * step
    return (triton.cdiv(red, per_split) if red else 1), per_split


def _candidates(kind: str, M: int, N: int, K: int, dtype: torch.dtype, blocksize: int,
                device: torch.device, dense: bool = False) -> list[_Launch]:
    """The launches worth timing for a forward ("fwd") or dx call, the table's choice first;
    dense: whether the call may take _DENSE at large M."""
    if M == 1 and kind == "fwd":
        cfgs = [_GEMV if K % 2 == 0 else _GEMV_ODD_K]
    else:
        cfgs = [_pick(kind, M, dtype, K, blocksize, device)]
    if M > _LARGE_M:
        if _variant(dtype, K) == "half" and K % blocksize == 0:
            table = _TABLES[(kind, "half")]
            cfgs += [c for c in (table.large, *_LARGE_ALTERNATES[(kind, "half")]) if c != cfgs[0]]
        return [_Launch(c, 1) for c in cfgs] + ([_DENSE] if dense else [])
    cfg = cfgs[0]
    block_k = _block_k_for(cfg.block_k, blocksize, K)
    if kind == "fwd":  # output tiles over N, reduction over K in block_k steps
        tiles, red, step = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), K, block_k
    else:  # output tiles over K, reduction over N in block_n steps
        tiles, red, step = triton.cdiv(M, cfg.block_m) * triton.cdiv(K, block_k), N, cfg.block_n
    return [_Launch(cfg, s) for s in _split_sizes(tiles, red, step, device)]


@functools.lru_cache(maxsize=4096)
def _launches(kind: str, bucket: int, N: int, K: int, dtype: torch.dtype, blocksize: int,
              device: torch.device, dense: bool) -> tuple[_Launch, ...]:
    """_candidates of a call, cached by M bucket (every M of an _m_bucket has the same ones: the
    bucket bounds are the table's): off the per-call path."""
    return tuple(_candidates(kind, bucket, N, K, dtype, blocksize, device, dense))


def _tuning_wanted(device: torch.device) -> bool:
    return (device.type == "cuda" and not _interpreting()
            and os.environ.get("NF4KERN_AUTOTUNE", "1") != "0"
            and not torch.are_deterministic_algorithms_enabled())


def _time_ms(run) -> float:
    from triton.testing import do_bench

    return do_bench(run, warmup=2, rep=10)  # ms of each; a shape tunes once per process


def _timed(run, launch: _Launch) -> float:
    """run(launch)'s time, or inf where the GPU cannot launch it (shared memory or registers
    beyond a smaller GPU's limits): the tuner then keeps another candidate."""
    try:
        return _time_ms(lambda: run(launch))
    except OutOfResources:
        return float("inf")


def _choose(key: tuple, candidates: tuple[_Launch, ...], run, device: torch.device) -> _Launch:
    """The launch for `key`: the cached winner, else the fastest candidate (each timed through
    run(launch), which writes the call's output), else the first."""
    if len(candidates) == 1 or not _tuning_wanted(device):
        return candidates[0]
    best = _TUNED.get(key)
    if best is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return candidates[0]
        times = [_timed(run, c) for c in candidates]
        # None launches: the first runs, and raises the GPU's error.
        best = _TUNED[key] = candidates[times.index(min(times))]
    return best


def tuning_report() -> list[str]:
    """One line per shape the autotuner has timed in this process: the pass, the M bucket, the
    weight, the activation dtype, and the launch it kept."""
    lines = []
    for key, launch in _TUNED.items():
        kind, bucket, N, K, blocksize, dtype = key[:6]
        what = "dequantize + torch GEMM" if launch is _DENSE else (
            f"{launch.cfg.block_m}x{launch.cfg.block_n}x{launch.cfg.block_k} tiles, "
            f"{launch.cfg.num_warps} warps, {launch.cfg.num_stages} stages, split-K {launch.split}")
        lines.append(f"{kind} M <= {bucket}, N = {N}, K = {K}, blocksize {blocksize}, "
                     f"{str(dtype).removeprefix('torch.')}: {what}")
    return lines


def _m_bucket(M: int) -> int:
    """Calls whose M shares a bucket share a tuning result (and, for M <= 64, a table config)."""
    return min(triton.next_power_of_2(M), 16384)


# fp32 operands go through 3xTF32 dots: about fp32 accuracy on the tensor cores. (Plain "tf32"
# is not offered: Triton 3.9 fails to compile the dx kernel with it on sm_90.)
_FP32_PRECISION = "tf32x3"


# ------------------------------------------------------------------------------------------------
# Launch wrappers
# ------------------------------------------------------------------------------------------------


def _weight_args(packed, code, absmax, N, K, blocksize, nested, device):
    """The kernels' weight arguments: (packed, code, absmax, qabsmax, nested_absmax, offset,
    dynamic_map, is_nested); unused pointers repeat a used tensor of the same dtype."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 \
            or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 2, got {blocksize!r}")
    n_el = N * K
    nblocks = triton.cdiv(n_el, blocksize)
    if packed.dtype != torch.uint8 or packed.numel() != triton.cdiv(n_el, 2):
        raise ValueError(f"packed must be uint8 with {triton.cdiv(n_el, 2)} bytes for [{N}, {K}]")
    if code.numel() != 16:
        raise ValueError("code must be a 16-entry table")
    for name, t in (("packed", packed), ("code", code)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the activations on {device}")
    packed = packed.reshape(-1).contiguous()
    code = code.reshape(-1).to(torch.float32).contiguous()
    if nested is None:
        if absmax is None or absmax.numel() != nblocks:
            raise ValueError(f"absmax must hold {nblocks} float32 scales")
        if absmax.device != device:
            raise ValueError(f"absmax is on {absmax.device}, the activations on {device}")
        absmax = absmax.reshape(-1).to(torch.float32).contiguous()
        return packed, code, absmax, packed, absmax, absmax, absmax, False
    if absmax is not None:
        raise ValueError("pass absmax=None with nested scales")
    qabsmax, nested_absmax, offset, dmap = nested
    if qabsmax.dtype != torch.uint8 or qabsmax.numel() != nblocks:
        raise ValueError(f"nested qabsmax must be uint8 with {nblocks} codes")
    if nested_absmax.numel() != triton.cdiv(nblocks, _NESTED_BLOCKSIZE) or dmap.numel() != 256:
        raise ValueError("nested_absmax must hold ceil(B / 256) scales and dynamic_map 256 values")
    if not torch.is_tensor(offset) or offset.numel() != 1:
        raise ValueError("offset must be a one-element float32 tensor")
    for name, t in (("qabsmax", qabsmax), ("nested_absmax", nested_absmax), ("offset", offset),
                    ("dynamic_map", dmap)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the activations on {device}")
    qabsmax = qabsmax.reshape(-1).contiguous()
    nested_absmax = nested_absmax.reshape(-1).to(torch.float32).contiguous()
    offset = offset.reshape(1).to(torch.float32)
    dmap = dmap.reshape(-1).to(torch.float32).contiguous()
    return packed, code, nested_absmax, qabsmax, nested_absmax, offset, dmap, True


def _dense_weight(weight: tuple, is_nested: bool, N: int, K: int, blocksize: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """W_hat, all N*K of it, in dtype (flat): the dequantize kernel on the kernels' weight
    arguments, for the _DENSE launch."""
    pk, code, absmax, qabsmax, nested_absmax, offset, _ = weight
    if is_nested:
        return quant.dequantize_with_code(pk, code, qabsmax, N * K, blocksize, dtype, nested_absmax, offset)
    return quant.dequantize_with_code(pk, code, absmax, N * K, blocksize, dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels take row-major operands with unit column stride."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _output(out, shape, dtype, device):
    """(buffer the kernel writes, user's out or None): a user buffer without unit column stride
    is written through a temporary."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device), None
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be {tuple(shape)} {dtype} on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if out.stride(-1) == 1 or shape[-1] <= 1:
        return out, None
    return torch.empty(shape, dtype=dtype, device=device), out


def _finish(buf, user_out):
    if user_out is None:
        return buf
    user_out.copy_(buf)
    return user_out


def _check_act(t, name, width, dim_name):
    if t.dim() != 2 or t.shape[1] != width:
        raise ValueError(f"{name} must be [M, {dim_name}={width}], got {tuple(t.shape)}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


_LAUNCH_OPTS = {"enable_fp_fusion": False}


def _lora_block_r(r, act, *lora_dtypes) -> int:
    """The r step of the LoRA epilogue: 16..64; at most 32 when a LoRA operand is fp32 and 16
    when the activations are (registers: a 3xTF32 dot splits both operands in two; 32 spills
    the odd-K fp32 dx GEMM on sm_80 with Triton 3.6)."""
    fp32 = (torch.float32, "fp32")
    cap = 16 if act in fp32 else 32 if any(d in fp32 for d in lora_dtypes) else 64
    return max(16, min(cap, triton.next_power_of_2(r)))


def _lora_given(a, b, names, device) -> bool:
    """Whether a LoRA operand pair is passed (both or neither), each a float tensor on device."""
    if a is None and b is None:
        return False
    if a is None or b is None:
        raise ValueError(f"pass both {names[0]} and {names[1]}, or neither")
    for name, t in zip(names, (a, b)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32) or t.device != device:
            raise ValueError(f"{name} must be a float16/bfloat16/float32 tensor on {device}")
    return True


def _check_lora(lora_s, lora_b, M, N, device) -> bool:
    if not _lora_given(lora_s, lora_b, ("lora_s", "lora_b"), device):
        return False
    if lora_s.dim() != 2 or lora_b.dim() != 2 or lora_s.shape[0] != M or lora_b.shape[0] != N \
            or lora_s.shape[1] != lora_b.shape[1]:
        raise ValueError(f"lora_s must be [M={M}, r] and lora_b [N={N}, r], got "
                         f"{tuple(lora_s.shape)} and {tuple(lora_b.shape)}")
    return lora_s.shape[1] > 0


def _check_lora_dx(lora_ds, lora_a, p, M, K, device) -> bool:
    if not _lora_given(lora_ds, lora_a, ("lora_ds", "lora_a"), device):
        return False
    if lora_ds.dim() != 2 or lora_a.dim() != 2 or lora_ds.shape[0] != M or lora_a.shape[1] != K \
            or lora_ds.shape[1] != lora_a.shape[0]:
        raise ValueError(f"lora_ds must be [M={M}, r] and lora_a [r, K={K}], got "
                         f"{tuple(lora_ds.shape)} and {tuple(lora_a.shape)}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"the LoRA dropout probability must be in [0, 1), got {p}")
    return lora_ds.shape[1] > 0


def nf4_matmul(x, packed, code, absmax, N, K, blocksize, bias=None, nested=None, out_dtype=None,
               out=None, lora_s=None, lora_b=None, lora_scale=1.0) -> torch.Tensor:
    """y = x @ W_hat^T (+ bias): x [M, K] fp16/bf16/fp32 -> [M, N] in out_dtype (default x.dtype).

    W_hat [N, K] is given by `packed` (uint8 [ceil(N*K/2)]), `code` (the 16 fp32 code values)
    and either `absmax` (fp32 [B]) or `nested` = (qabsmax uint8 [B], nested_absmax fp32
    [ceil(B/256)], offset fp32 one-element tensor, dynamic_map fp32 [256]) with absmax=None.
    `out`: an optional preallocated [M, N] out_dtype result, returned.

    LoRA epilogue: with lora_s [M, r] and lora_b [N, r] (any float dtypes), y += lora_scale *
    lora_s @ lora_b^T is added to the fp32 accumulator before the single rounding and store of
    y. The product runs on x's dtype (S and B rounded to it; fp32 accumulation); for M == 1 in
    fp32.
    """
    _check_act(x, "x", K, "K")
    M, device = x.shape[0], x.device
    out_dtype = out_dtype or x.dtype
    buf, user_out = _output(out, (M, N), out_dtype, device)
    if bias is not None and (bias.numel() != N or bias.device != device):
        raise ValueError(f"bias must hold {N} values on {device}")
    has_lora = _check_lora(lora_s, lora_b, M, N, device)
    pk, code, absmax, qabsmax, nested_absmax, offset, dmap, is_nested = _weight_args(
        packed, code, absmax, N, K, blocksize, nested, device)
    if M == 0 or N == 0:
        return _finish(buf, user_out)
    if K == 0:
        y0 = torch.zeros((M, N), dtype=torch.float32, device=device)
        if bias is not None:
            y0 += bias.float()
        if has_lora:
            y0 += lora_scale * (lora_s.double() @ lora_b.double().T).float()
        buf.copy_(y0)
        return _finish(buf, user_out)
    x = _rows(x)
    has_bias = bias is not None
    bias_arg = bias.reshape(-1).contiguous() if has_bias else absmax
    paired = K % 2 == 0
    weight = (pk, code, absmax, qabsmax, nested_absmax, offset, dmap)
    if has_lora:
        lora_s, lora_b = _rows(lora_s), _rows(lora_b)
        r = lora_s.shape[1]
        lora = dict(HAS_LORA=True, LORA_BLOCK_R=_lora_block_r(r, x.dtype, lora_s.dtype, lora_b.dtype))
    else:
        lora_s = lora_b = absmax
        r = 0
        lora = dict(HAS_LORA=False, LORA_BLOCK_R=16)
    lora_scale = float(lora_scale)

    row_scale = K % blocksize == 0

    def run(launch: _Launch) -> None:
        if launch is _DENSE:
            w = _dense_weight(weight, is_nested, N, K, blocksize, x.dtype).view(N, K)
            if has_bias:
                torch.addmm(bias_arg, x, w.t(), out=buf)
            else:
                torch.mm(x, w.t(), out=buf)
            return
        cfg = launch.cfg
        block_k = _block_k_for(cfg.block_k, blocksize, K)
        split, per_split = _per_split(K, block_k, launch.split)
        ws = torch.empty((split, M, N), dtype=torch.float32, device=device) if split > 1 else buf
        common = dict(BLOCK_N=cfg.block_n, BLOCK_K=block_k, SPLIT_K=split, BLOCKSIZE=blocksize,
                      PAIRED=paired, ROW_SCALE=row_scale and blocksize % block_k == 0,
                      NESTED=is_nested, HAS_BIAS=has_bias, **lora, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages, **_LAUNCH_OPTS)
        if M == 1:
            _nf4_gemv_kernel[(triton.cdiv(N, cfg.block_n), split)](
                x, *weight, bias_arg, buf, ws, lora_s, lora_b, N, K, per_split, lora_scale, r,
                lora_b.stride(0) if has_lora else 0, **common)
        else:
            tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
            _nf4_gemm_kernel[(tiles, split)](
                x, *weight, bias_arg, buf, ws, lora_s, lora_b, M, N, K, x.stride(0),
                buf.stride(0), per_split, lora_scale, r, lora_s.stride(0) if has_lora else 0,
                lora_b.stride(0) if has_lora else 0, BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m,
                FP32_PRECISION=_FP32_PRECISION, **common)
        if split > 1:
            _splitk_reduce_kernel[(triton.cdiv(N, _SPLIT_REDUCE_BLOCK), M)](
                ws, bias_arg, buf, M, N, buf.stride(0),
                SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=_SPLIT_REDUCE_BLOCK, num_warps=4)

    # _DENSE rounds once only where the result, the bias and the GEMM share x's dtype.
    dense = x.dtype != torch.float32 and out_dtype == x.dtype and not has_lora and \
        (bias is None or bias.dtype == x.dtype)
    bucket = _m_bucket(M)
    candidates = _launches("fwd", bucket, N, K, x.dtype, blocksize, device, dense)
    key = ("fwd", bucket, N, K, blocksize, x.dtype, out_dtype, is_nested, has_bias,
           has_lora and (lora["LORA_BLOCK_R"], lora_s.dtype, lora_b.dtype), device)
    run(_choose(key, candidates, run, device))
    return _finish(buf, user_out)


def nf4_matmul_dx(dy, packed, code, absmax, N, K, blocksize, nested=None, out_dtype=None,
                  out=None, lora_ds=None, lora_a=None, lora_p=0.0, lora_seed=0) -> torch.Tensor:
    """dx = dy @ W_hat: dy [M, N] fp16/bf16/fp32 -> [M, K] in out_dtype (default dy.dtype).

    The weight arguments are those of nf4_matmul; `out`: an optional preallocated [M, K] result.

    LoRA epilogue: with lora_ds [M, r] and lora_a [r, K] (any float dtypes), dx += (lora_ds @
    lora_a) * keep / (1 - p) on the fp32 accumulator before the single store, keep being the
    dropout mask of (lora_seed, lora_p) (kernels.lora.keep_mask; none when lora_p == 0). The
    product runs on dy's dtype (lora_ds and lora_a rounded to it; fp32 accumulation).
    """
    _check_act(dy, "dy", N, "N")
    M, device = dy.shape[0], dy.device
    out_dtype = out_dtype or dy.dtype
    buf, user_out = _output(out, (M, K), out_dtype, device)
    pk, code, absmax, qabsmax, nested_absmax, offset, dmap, is_nested = _weight_args(
        packed, code, absmax, N, K, blocksize, nested, device)
    has_lora = _check_lora_dx(lora_ds, lora_a, lora_p, M, K, device)
    if M == 0 or K == 0:
        return _finish(buf, user_out)
    if N == 0 and not has_lora:
        buf.zero_()
        return _finish(buf, user_out)
    dy = _rows(dy)
    paired = K % 2 == 0
    if has_lora:
        lora_ds, lora_a = _rows(lora_ds), _rows(lora_a)
        r = lora_ds.shape[1]
        dropout = lora_p > 0.0
        lora = dict(HAS_LORA=True, DROPOUT=dropout,
                    LORA_BLOCK_R=_lora_block_r(r, dy.dtype, lora_ds.dtype, lora_a.dtype))
        lora_args = (r, lora_ds.stride(0), lora_a.stride(0), int(lora_seed) if dropout else 0,
                     float(lora_p), 1.0 / (1.0 - lora_p))
    else:
        lora_ds = lora_a = absmax
        lora = dict(HAS_LORA=False, DROPOUT=False, LORA_BLOCK_R=16)
        lora_args = (0, 0, 0, 0, 0.0, 1.0)
    row_scale = K % blocksize == 0
    weight = (pk, code, absmax, qabsmax, nested_absmax, offset, dmap)

    def run(launch: _Launch) -> None:
        if launch is _DENSE:
            torch.mm(dy, _dense_weight(weight, is_nested, N, K, blocksize, dy.dtype).view(N, K), out=buf)
            return
        cfg = launch.cfg
        block_k = _block_k_for(cfg.block_k, blocksize, K)
        split, per_split = _per_split(N, cfg.block_n, launch.split)
        tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(K, block_k)
        ws = torch.empty((split, M, K), dtype=torch.float32, device=device) if split > 1 else buf
        _nf4_gemm_dx_kernel[(tiles, split)](
            dy, *weight, buf, ws, lora_ds, lora_a,
            M, N, K, dy.stride(0), buf.stride(0), per_split, *lora_args,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
            SPLIT_K=split, BLOCKSIZE=blocksize, PAIRED=paired,
            ROW_SCALE=row_scale and blocksize % block_k == 0, NESTED=is_nested,
            FP32_PRECISION=_FP32_PRECISION, **lora, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **_LAUNCH_OPTS)
        if split > 1:
            _splitk_reduce_kernel[(triton.cdiv(K, _SPLIT_REDUCE_BLOCK), M)](
                ws, ws, buf, M, K, buf.stride(0),
                SPLIT_K=split, HAS_BIAS=False, BLOCK=_SPLIT_REDUCE_BLOCK, num_warps=4)

    dense = dy.dtype != torch.float32 and out_dtype == dy.dtype and not has_lora
    bucket = _m_bucket(M)
    candidates = _launches("dx", bucket, N, K, dy.dtype, blocksize, device, dense)
    key = ("dx", bucket, N, K, blocksize, dy.dtype, out_dtype, is_nested,
           has_lora and (lora["LORA_BLOCK_R"], lora["DROPOUT"], lora_ds.dtype, lora_a.dtype),
           device)
    run(_choose(key, candidates, run, device))
    return _finish(buf, user_out)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (nf4kern.compile_gate)
# ------------------------------------------------------------------------------------------------

_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Integer arguments that are multiples of 16 for aligned shapes (K % 32 == 0, N % 16 == 0,
# contiguous rows); the JIT specialises them (and every 16-byte-aligned pointer) the same way.
_DIV16_INTS = ("N", "K", "stride_xm", "stride_dm", "stride_om", "k_per_split", "n_per_split",
               "lora_r", "stride_sm", "stride_bn", "stride_dsm", "stride_ar")


def _signature(kernel, act: str, constexprs: dict, lora_s: str = "fp32", lora_b: str = "fp32") -> dict:
    types = {"packed_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*fp32", "qabsmax_ptr": "*u8",
             "nested_ptr": "*fp32", "offset_ptr": "*fp32", "dmap_ptr": "*fp32", "ws_ptr": "*fp32",
             "out_ptr": f"*{act}", "bias_ptr": f"*{act}", "x_ptr": f"*{act}", "dy_ptr": f"*{act}",
             "lora_s_ptr": f"*{lora_s}", "lora_b_ptr": f"*{lora_b}", "lora_scale": "fp32",
             "lora_ds_ptr": f"*{lora_s}", "lora_a_ptr": f"*{lora_b}", "seed": "i64",
             "drop_p": "fp32", "keep_scale": "fp32"}
    return {name: "constexpr" if name in constexprs else types.get(name, "i32")
            for name in kernel.arg_names}


def _div16_attrs(kernel, signature: dict, odd_k: bool) -> dict:
    """ASTSource attrs: tt.divisibility=16 on pointers and on the aligned integer arguments."""
    attrs = {}
    for i, name in enumerate(kernel.arg_names):
        t = signature[name]
        # Odd K: K and the row stride of the [*, K] operands (x, A, or dx's output) are odd.
        odd = odd_k and (name in ("K", "stride_xm", "stride_ar") or
                         (name == "stride_om" and kernel is _nf4_gemm_dx_kernel))
        if t.startswith("*") or (name in _DIV16_INTS and not odd):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


try:
    from nf4kern.compile_gate import KernelSpec as _KernelSpec
except ImportError:  # compile_gate not written yet: plain dicts with the agreed keys
    _KernelSpec = None


def _spec(name, kernel, act, cfg_warps, cfg_stages, constexprs, wgmma=False, odd_k=False,
          lora=("fp32", "fp32")):
    signature = _signature(kernel, act, constexprs, *lora)
    fields = dict(name=name, fn=kernel, signature=signature, constexprs=dict(constexprs),
                  num_warps=cfg_warps, num_stages=cfg_stages,
                  require_wgmma_on=(90,) if wgmma else (),
                  attrs=_div16_attrs(kernel, signature, odd_k))
    return _KernelSpec(**fields) if _KernelSpec is not None else fields


def _gemm_spec(name, act, cfg, nested, split, paired=True, row_scale=True, bias=True, lora=None):
    """lora: None, or (dtype of lora_s, dtype of lora_b) for the LoRA epilogue with r = 64."""
    c = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
             SPLIT_K=split, BLOCKSIZE=64, PAIRED=paired, ROW_SCALE=row_scale, NESTED=nested,
             HAS_BIAS=bias, FP32_PRECISION=_FP32_PRECISION, HAS_LORA=lora is not None,
             LORA_BLOCK_R=_lora_block_r(64, act, *lora) if lora else 16)
    return _spec(name, _nf4_gemm_kernel, act, cfg.num_warps, cfg.num_stages, c,
                 wgmma=cfg.block_m >= 64 and act != "fp32", odd_k=not paired,
                 lora=lora or ("fp32", "fp32"))


def _dx_spec(name, act, cfg, nested, split, paired=True, row_scale=True, lora=None):
    """lora: None, or (dtype of lora_ds, dtype of lora_a) for the LoRA epilogue with dropout,
    r = 64."""
    c = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
             SPLIT_K=split, BLOCKSIZE=64, PAIRED=paired, ROW_SCALE=row_scale, NESTED=nested,
             FP32_PRECISION=_FP32_PRECISION, HAS_LORA=lora is not None,
             LORA_BLOCK_R=_lora_block_r(64, act, *lora) if lora else 16, DROPOUT=lora is not None)
    return _spec(name, _nf4_gemm_dx_kernel, act, cfg.num_warps, cfg.num_stages, c,
                 wgmma=cfg.block_m >= 64 and act != "fp32", odd_k=not paired,
                 lora=lora or ("fp32", "fp32"))


def _gemv_spec(name, act, cfg, nested, paired=True, row_scale=True, lora=None, split=4):
    c = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, BLOCKSIZE=64, PAIRED=paired,
             ROW_SCALE=row_scale, NESTED=nested, HAS_BIAS=True, HAS_LORA=lora is not None,
             LORA_BLOCK_R=_lora_block_r(64, act, *lora) if lora else 16)
    return _spec(name, _nf4_gemv_kernel, act, cfg.num_warps, cfg.num_stages, c, odd_k=not paired,
                 lora=lora or ("fp32", "fp32"))


def _table_specs(kind, variant, act, nested, row_scale=True, buckets=None):
    """Specs of every config of one table: the split-K buckets and the large-M GEMMs."""
    table = _TABLES[(kind, variant)]
    make = _gemm_spec if kind == "fwd" else _dx_spec
    paired = variant != "odd"
    row_scale = row_scale and paired
    tag = f"{act}_{'nested' if nested else 'plain'}"
    if variant == "odd" or not row_scale:
        tag += "_odd_k" if variant == "odd" else "_straddle"
    out = []
    for bound, cfg in table.buckets[:buckets]:
        out.append(make(f"{kind}_m{bound}_splitk_{tag}", act, cfg, nested, 4, paired, row_scale))
    out.append(make(f"{kind}_large_{tag}", act, table.large, nested, 1, paired, row_scale))
    if table.large_sm90 is not None and row_scale:  # sm_90 tiles run for K % blocksize == 0 only
        out.append(make(f"{kind}_large_sm90_{tag}", act, table.large_sm90, nested, 1, paired,
                        row_scale))
    if row_scale:  # the autotuner's alternates, K % blocksize == 0 only as well
        out += [make(f"{kind}_large_alt{i}_{tag}", act, cfg, nested, 1, paired, row_scale)
                for i, cfg in enumerate(_LARGE_ALTERNATES.get((kind, variant), ()))]
    return out


def _compile_specs() -> list:
    """One spec per kernel and config of _TABLES: blocksize 64 with K % 64 == 0 (PAIRED and
    ROW_SCALE) for bf16 and fp16, nested on and off; fp32 (nested); the general paths (blocks
    straddling rows: one scale per byte; odd K: per-element nibbles and scales); the GEMV and
    the split-K reduction."""
    specs = []
    for act in ("bf16", "fp16"):
        for nested in (False, True):
            tag = f"{act}_{'nested' if nested else 'plain'}"
            specs += _table_specs("fwd", "half", act, nested)
            specs += _table_specs("dx", "half", act, nested)
            specs.append(_gemv_spec(f"gemv_splitk_{tag}", act, _GEMV, nested))
        specs.append(_spec(f"splitk_reduce_{act}", _splitk_reduce_kernel, act, 4, 1,
                           dict(SPLIT_K=4, HAS_BIAS=True, BLOCK=_SPLIT_REDUCE_BLOCK)))
    # Split-K sizes are tuned at run time, and 1 stores the output from the GEMM itself: every
    # bucket of every variant, and the GEMVs, at split-K 1 too.
    specs += [_gemv_spec("gemv_nosplit_bf16_nested", "bf16", _GEMV, True, split=1),
              _gemv_spec("gemv_nosplit_bf16_nested_odd_k", "bf16", _GEMV_ODD_K, True, paired=False,
                         row_scale=False, split=1)]
    for kind, make in (("fwd", _gemm_spec), ("dx", _dx_spec)):
        for variant, act in (("half", "bf16"), ("fp32", "fp32"), ("odd", "bf16"), ("odd", "fp32")):
            paired = variant != "odd"
            tag = f"{act}_nested" + ("" if paired else "_odd_k")
            specs += [make(f"{kind}_m{bound}_nosplit_{tag}", act, cfg, True, 1, paired, paired)
                      for bound, cfg in _TABLES[(kind, variant)].buckets]
    for kind in ("fwd", "dx"):
        specs += _table_specs(kind, "fp32", "fp32", True)
        specs += _table_specs(kind, "odd", "bf16", True)
        specs += _table_specs(kind, "odd", "fp32", True)
        specs += _table_specs(kind, "half", "bf16", True, row_scale=False, buckets=1)
    # The LoRA epilogue (r = 64): S in fp32 or bf16, B in bf16.
    half = _TABLES[("fwd", "half")]
    for s_dtype in ("fp32", "bf16"):
        tag = f"bf16_nested_lora_s{s_dtype}"
        lora = (s_dtype, "bf16")
        specs += [_gemm_spec(f"fwd_large_{tag}", "bf16", half.large, True, 1, lora=lora),
                  _gemm_spec(f"fwd_large_sm90_{tag}", "bf16", half.large_sm90, True, 1, lora=lora),
                  _gemv_spec(f"gemv_splitk_{tag}", "bf16", _GEMV, True, lora=lora)]
        specs += [_gemm_spec(f"fwd_m{bound}_{'splitk' if split > 1 else 'nosplit'}_{tag}", "bf16",
                             cfg, True, split, lora=lora)
                  for bound, cfg in half.buckets for split in (4, 1)]
        specs += [_gemm_spec(f"fwd_large_alt{i}_{tag}", "bf16", cfg, True, 1, lora=lora)
                  for i, cfg in enumerate(_LARGE_ALTERNATES[("fwd", "half")])]
    specs += [_gemm_spec("fwd_large_fp32_nested_lora_sfp32", "fp32", _TABLES[("fwd", "fp32")].large,
                         True, 1, lora=("fp32", "fp32"))]
    # The dx LoRA epilogue with dropout (r = 64): dS in fp32, A in fp32 (or bf16).
    for act, a_dtype in (("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32")):
        tag = f"{act}_nested_lora_a{a_dtype}"
        table, lora = _TABLES[("dx", "half")], ("fp32", a_dtype)
        specs += [_dx_spec(f"dx_large_{tag}", act, table.large, True, 1, lora=lora),
                  _dx_spec(f"dx_large_sm90_{tag}", act, table.large_sm90, True, 1, lora=lora)]
        specs += [_dx_spec(f"dx_large_alt{i}_{tag}", act, cfg, True, 1, lora=lora)
                  for i, cfg in enumerate(_LARGE_ALTERNATES[("dx", "half")])]
        specs += [_dx_spec(f"dx_m{bound}_{'splitk' if split > 1 else 'nosplit'}_{tag}", act, cfg,
                           True, split, lora=lora)
                  for bound, cfg in table.buckets for split in ((4, 1) if act == "bf16" else (4,))]
    for variant, act in (("fp32", "fp32"), ("odd", "bf16"), ("odd", "fp32")):
        table, paired = _TABLES[("dx", variant)], variant != "odd"
        tag = f"{act}_nested{'_odd_k' if not paired else ''}_lora_afp32"
        specs += [_dx_spec(f"dx_large_{tag}", act, table.large, True, 1, paired, paired,
                           lora=("fp32", "fp32")),
                  _dx_spec(f"dx_m16_splitk_{tag}", act, table.buckets[0][1], True, 4, paired,
                           paired, lora=("fp32", "fp32"))]
    specs += [_gemv_spec("gemv_splitk_bf16_nested_straddle", "bf16", _GEMV, True, row_scale=False),
              _gemv_spec("gemv_splitk_bf16_nested_odd_k", "bf16", _GEMV_ODD_K, True, paired=False,
                         row_scale=False)]
    return specs


COMPILE_SPECS = _compile_specs()
