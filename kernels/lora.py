"""Fused LoRA on a 4-bit base (QLoRA), forward and backward:

    forward   S = drop(x) A^T  [M, r] fp32;  y = x W_hat^T + b + s S B^T  (y written once)
    backward  dS = s dY B,  dB = s dY^T S,  dbias = sum_m dY     (one pass over dY)
              dX = dY W_hat + (dS A) * keep / (1 - p)            (LoRA term in dX's epilogue)
              dA = dS^T drop(x) = (1 / (1 - p)) dS^T (x * keep)

drop(x) = x * keep / (1 - p), keep(m, k) = u(seed, m, k) >= p with u from Philox
(kernels.matmul._keep_tile). The mask is never stored: every kernel that reads x (S, dA) or
writes dX regenerates it from the seed; keep_mask() materialises it for tests and references.
Saved for backward: x, S and the seed.

Kernels (all fp32 accumulation; an fp32 operand makes the dot 3xTF32; two operands of one
16-bit dtype multiply natively, their products exact in fp32):

* `_lora_s_kernel`: S tiles [BLOCK_M, BLOCK_R], reduction over K; split-K (deterministic
  workspace reduction) when the M x r tiles alone would not fill the GPU. Masked elements of x
  are zeroed in x's dtype (exact) and the 1/(1-p) scale goes on the fp32 result.
* y: kernels.matmul.nf4_matmul with S and B in its LoRA epilogue (bias there too).
* `_lora_dy_kernel`: dS, dB and dbias from one read of dY. Grid (G_M x G_N groups, r tiles):
  a program walks its M tiles and, for each, its N chunks; dS of an M tile is complete in
  registers at the end of its N chunks and is written once per N group (a [G_N, M, r]
  partial); dB and dbias of an N chunk gather over the program's M tiles by read-modify-write
  of a [G_M, N, r] slot that only this program touches. Both partial sets are then summed in a
  fixed order (kernels.matmul._splitk_reduce_kernel): deterministic, no atomics, workspace
  bounded by G_M, G_N <= 16. dY is read once per r tile (once for r <= 64).
* dX: kernels.matmul.nf4_matmul_dx with dS and A in its LoRA epilogue (mask from the seed).
* `_lora_da_kernel`: dA tiles [BLOCK_R, BLOCK_K], reduction over M (split over M with the same
  deterministic reduction), mask regenerated from the seed.
* `_keep_mask_kernel`: the mask as an fp32 multiplier (0 or 1/(1-p)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import matmul as mm
from .matmul import _dot, _keep_tile, _splitk_reduce_kernel

__all__ = ["lora_forward", "lora_backward", "keep_mask", "COMPILE_SPECS"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _dot_mixed(a, b, acc, FP32_PRECISION: tl.constexpr):
    """acc += a @ b: natively when a and b share a dtype, else both widened to fp32 (the narrow
    operand is exact in fp32, the wide one keeps its precision)."""
    if a.dtype == b.dtype:
        acc = _dot(a, b, acc, FP32_PRECISION)
    else:
        acc = _dot(a.to(tl.float32), b.to(tl.float32), acc, FP32_PRECISION)
    return acc


@triton.jit
def _lora_s_kernel(x_ptr, a_ptr, out_ptr, M, K, r, stride_xm, stride_ar, k_per_split,
                   seed, drop_p, keep_scale,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, DROPOUT: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """S[M, r] = keep_scale * (x * keep)[M, K] @ A[r, K]^T in fp32; grid (M tiles, r tiles,
    SPLIT_K). out: S (row stride r), or with SPLIT_K > 1 a [SPLIT_K, M, r] workspace."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < r

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            xv = tl.where(_keep_tile(seed, drop_p, offs_m, k0, BLOCK_M, BLOCK_K), xv, 0.0)
        av = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :],
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc = _dot_mixed(xv, tl.trans(av), acc, FP32_PRECISION)
    if DROPOUT:
        acc = acc * keep_scale
    base = pid_k.to(tl.int64) * M * r
    tl.store(out_ptr + base + offs_m[:, None] * r + offs_r[None, :], acc,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_dy_kernel(dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, dbias_ptr,
                    M, N, r, stride_dm, stride_bn, stride_sm, m_tiles_per, n_chunks_per, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                    NEED_DS: tl.constexpr, NEED_DB: tl.constexpr, NEED_DBIAS: tl.constexpr,
                    FP32_PRECISION: tl.constexpr):
    """One pass over dY[M, N]: dS = scale dY B into ds_ptr[gn] ([G_N, M, r]), dB = scale dY^T S
    into db_ptr[gm] ([G_M, N, r]) and dbias = column sums of dY into dbias_ptr[gm] ([G_M, N]);
    grid (G_M, G_N, r tiles). Program (gm, gn) covers M tiles [gm * m_tiles_per, ...) and N
    chunks [gn * n_chunks_per, ...); every group is non-empty (the launcher sizes them)."""
    gm = tl.program_id(0)
    gn = tl.program_id(1)
    pid_r = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    m_lo = gm * m_tiles_per
    m_hi = tl.minimum(m_lo + m_tiles_per, tl.cdiv(M, BLOCK_M))
    n_lo = gn * n_chunks_per
    n_hi = tl.minimum(n_lo + n_chunks_per, tl.cdiv(N, BLOCK_N))
    ds_base = ds_ptr + gn.to(tl.int64) * M * r
    db_base = db_ptr + gm.to(tl.int64) * N * r
    dbias_base = dbias_ptr + gm.to(tl.int64) * N

    for mt in range(m_lo, m_hi):
        offs_m = (mt * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < M
        # The slots of this program's dB / dbias start at its first M tile: no zero fill.
        accumulate = tl.full((1,), mt, tl.int32) > m_lo
        if NEED_DB:
            sv = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :],
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        ds_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for nc in range(n_lo, n_hi):
            offs_n = (nc * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            mask_n = offs_n < N
            g = tl.load(dy_ptr + offs_m[:, None] * stride_dm + offs_n[None, :],
                        mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            if NEED_DS:
                bv = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :],
                             mask=mask_n[:, None] & mask_r[None, :], other=0.0)
                ds_acc = _dot_mixed(g, bv, ds_acc, FP32_PRECISION)
            if NEED_DB:
                part = _dot(tl.trans(g).to(tl.float32), sv,
                            tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), FP32_PRECISION)
                db_ptrs = db_base + offs_n[:, None] * r + offs_r[None, :]
                db_mask = mask_n[:, None] & mask_r[None, :]
                db_prev = tl.load(db_ptrs, mask=db_mask & accumulate, other=0.0)
                tl.store(db_ptrs, db_prev + scale * part, mask=db_mask)
            if NEED_DBIAS:
                if pid_r == 0:
                    bias_prev = tl.load(dbias_base + offs_n, mask=mask_n & accumulate, other=0.0)
                    tl.store(dbias_base + offs_n, bias_prev + tl.sum(g.to(tl.float32), axis=0),
                             mask=mask_n)
        if NEED_DS:
            tl.store(ds_base + offs_m[:, None] * r + offs_r[None, :], scale * ds_acc,
                     mask=mask_m[:, None] & mask_r[None, :])
        if NEED_DB or NEED_DBIAS:
            # The next M tile rereads these dB / dbias slots, maybe from other threads (the
            # pipeliner's asynchronous copies): a CTA barrier orders the stores before them.
            tl.debug_barrier()


@triton.jit
def _lora_da_kernel(ds_ptr, x_ptr, out_ptr, M, K, r, stride_dsm, stride_xm, m_per_split,
                    seed, drop_p, keep_scale,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_M: tl.constexpr, DROPOUT: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """dA[r, K] = keep_scale * dS[M, r]^T @ (x * keep)[M, K] in fp32; grid (K tiles, r tiles,
    SPLIT_M). out: dA (row stride K), or with SPLIT_M > 1 a [SPLIT_M, r, K] workspace."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < r

    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    m_lo = pid_s * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < M
        dsv = tl.load(ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :],
                      mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            xv = tl.where(_keep_tile(seed, drop_p, offs_m, k0, BLOCK_M, BLOCK_K), xv, 0.0)
        acc = _dot(tl.trans(dsv), xv.to(tl.float32), acc, FP32_PRECISION)
    if DROPOUT:
        acc = acc * keep_scale
    base = pid_s.to(tl.int64) * r * K
    tl.store(out_ptr + base + offs_r[:, None] * K + offs_k[None, :], acc,
             mask=mask_r[:, None] & mask_k[None, :])


@triton.jit
def _keep_mask_kernel(out_ptr, M, K, seed, drop_p, keep_scale,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M, K] = keep_scale where kept, 0 where dropped; grid (M tiles, K tiles)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    keep = _keep_tile(seed, drop_p, offs_m, k0, BLOCK_M, BLOCK_K)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], tl.where(keep, keep_scale, 0.0),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------

# Tiles, chosen so that every kernel compiles without spills on sm_80 and sm_90 (COMPILE_SPECS).
# A dot with fp32 operands runs as 3xTF32, which splits both operands into two parts: those
# kernels take narrower tiles.
_MAX_GROUPS = 16  # dY pass: at most 16 M groups and 16 N groups (bounded workspaces)
_BLOCK_K = 64  # K tile of the S (16-bit dot) and dA kernels
_BLOCK_K_FP32 = 32  # K tile of the S kernel when its dot is fp32
_DY_BLOCK_N = 32  # N step of the dY pass
_DY_WARPS = 8
_MASK_TILE = (32, 128)


def _block_r(r: int) -> int:
    """The r tile: r rounded up to a power of two, 16 (tl.dot's minimum) to 64."""
    return max(16, min(64, triton.next_power_of_2(r)))


def _block_rows(M: int, cap: int) -> int:
    """Rows of a tile over M: one tile of 16 (or 32) rows for small M, else `cap`."""
    return 16 if M <= 16 else min(cap, 32 if M <= 32 else 64)


def _groups(tiles: int, cap: int) -> tuple[int, int]:
    """(groups, tiles per group): at most `cap` non-empty groups of consecutive tiles."""
    per = triton.cdiv(tiles, max(1, min(cap, tiles)))
    return triton.cdiv(tiles, per), per


def _keep_args(p: float, seed) -> tuple:
    """(seed, p, 1 / (1 - p)) kernel arguments; the seed is unused without dropout."""
    return (int(seed) if p > 0.0 else 0, float(p), 1.0 / (1.0 - p))


# ------------------------------------------------------------------------------------------------
# Launch wrappers
# ------------------------------------------------------------------------------------------------


def _check_seed_p(p, seed) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"the LoRA dropout probability must be in [0, 1), got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64:
        raise ValueError(f"the dropout seed must be a 64-bit integer, got {seed!r}")


def _check_float(t, name: str, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float16, bfloat16 or float32 tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the activations on {device}")


def _check_adapter(A, B, N, K, device) -> int:
    _check_float(A, "lora_A", device)
    _check_float(B, "lora_B", device)
    if A.dim() != 2 or A.shape[1] != K:
        raise ValueError(f"lora_A must be [r, K={K}], got {tuple(A.shape)}")
    if B.dim() != 2 or tuple(B.shape) != (N, A.shape[0]):
        raise ValueError(f"lora_B must be [N={N}, r={A.shape[0]}], got {tuple(B.shape)}")
    return A.shape[0]


def keep_mask(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """fp32 [M, K]: 1/(1-p) where the LoRA kernels keep element (m, k) of x under (seed, p), 0
    where they drop it (all ones for p == 0): the same mask, from the same Philox function."""
    _check_seed_p(p, seed)
    out = torch.empty((M, K), dtype=torch.float32, device=device)
    if out.numel():
        bm, bk = _MASK_TILE
        _keep_mask_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
            out, M, K, *_keep_args(p, seed), BLOCK_M=bm, BLOCK_K=bk, num_warps=4)
    return out


def _lora_s(x, A, p, seed) -> torch.Tensor:
    """S = drop(x) A^T, fp32 [M, r]."""
    M, K = x.shape
    r = A.shape[0]
    S = torch.empty((M, r), dtype=torch.float32, device=x.device)
    if M == 0 or r == 0:
        return S
    if K == 0:
        return S.zero_()
    # S is memory-bound on x: 32-row tiles give more programs.
    bm, br = _block_rows(M, 32), _block_r(r)
    bk = _BLOCK_K if x.dtype == A.dtype != torch.float32 else _BLOCK_K_FP32
    tiles = triton.cdiv(M, bm) * triton.cdiv(r, br)
    split, per_split = mm._split_for(tiles, K, bk, x.device)
    ws = torch.empty((split, M, r), dtype=torch.float32, device=x.device) if split > 1 else S
    _lora_s_kernel[(triton.cdiv(M, bm), triton.cdiv(r, br), split)](
        x, A, ws, M, K, r, x.stride(0), A.stride(0), per_split, *_keep_args(p, seed),
        BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, SPLIT_K=split, DROPOUT=p > 0.0,
        FP32_PRECISION=mm._FP32_PRECISION, num_warps=4, num_stages=3, **mm._LAUNCH_OPTS)
    if split > 1:
        _reduce(ws, S)
    return S


def _reduce(ws, out) -> None:
    """out[i, j] = sum_s ws[s, i, j] in split order (out fp32, contiguous)."""
    split, rows, cols = ws.shape
    _splitk_reduce_kernel[(triton.cdiv(cols, mm._SPLIT_REDUCE_BLOCK), rows)](
        ws, ws, out, rows, cols, cols,
        SPLIT_K=split, HAS_BIAS=False, BLOCK=mm._SPLIT_REDUCE_BLOCK, num_warps=4)


def _dy_pass(dy, B, S, scale, need_ds, need_db, need_dbias):
    """(dS [M, r], dB [N, r], dbias [N]) in fp32 from one read of dY; None where not needed."""
    M, N = dy.shape
    r = B.shape[1]
    device = dy.device
    f32 = dict(dtype=torch.float32, device=device)
    dS = torch.empty((M, r), **f32) if need_ds else None
    dB = torch.empty((N, r), **f32) if need_db else None
    dbias = torch.empty((N,), **f32) if need_dbias else None
    if M == 0 or N == 0:
        for t in (dS, dB, dbias):
            if t is not None:
                t.zero_()
        return dS, dB, dbias
    if r == 0:
        need_ds = need_db = False
        if not need_dbias:
            return dS, dB, dbias
    bm, br = _block_rows(M, 32), _block_r(max(r, 1))
    r_tiles = triton.cdiv(r, br) if r else 1
    m_tiles, n_chunks = triton.cdiv(M, bm), triton.cdiv(N, _DY_BLOCK_N)
    # ~2 programs per SM, split between M groups (dB / dbias partials) and N groups (dS).
    want = max(1, 2 * mm._sm_count(device) // r_tiles)
    g_n, n_per = _groups(n_chunks, min(_MAX_GROUPS, max(1, want // min(m_tiles, _MAX_GROUPS))))
    g_m, m_per = _groups(m_tiles, min(_MAX_GROUPS, max(1, want // g_n)))
    ws_ds = (torch.empty((g_n, M, r), **f32) if g_n > 1 else dS) if need_ds else None
    ws_db = (torch.empty((g_m, N, r), **f32) if g_m > 1 else dB) if need_db else None
    ws_dbias = (torch.empty((g_m, N), **f32) if g_m > 1 else dbias) if need_dbias else None
    unused = S  # any fp32 tensor for pointers the kernel does not touch
    _lora_dy_kernel[(g_m, g_n, r_tiles)](
        dy, B, S, ws_ds if need_ds else unused, ws_db if need_db else unused,
        ws_dbias if need_dbias else unused, M, N, r, dy.stride(0), B.stride(0), S.stride(0),
        m_per, n_per, float(scale),
        BLOCK_M=bm, BLOCK_N=_DY_BLOCK_N, BLOCK_R=br, NEED_DS=need_ds, NEED_DB=need_db,
        NEED_DBIAS=need_dbias, FP32_PRECISION=mm._FP32_PRECISION, num_warps=_DY_WARPS, num_stages=3,
        **mm._LAUNCH_OPTS)
    if need_ds and g_n > 1:
        _reduce(ws_ds, dS)
    if need_db and g_m > 1:
        _reduce(ws_db, dB)
    if need_dbias and g_m > 1:
        _reduce(ws_dbias.reshape(g_m, 1, N), dbias.reshape(1, N))
    return dS, dB, dbias


def _lora_da(dS, x, p, seed) -> torch.Tensor:
    """dA = dS^T drop(x), fp32 [r, K]."""
    M, K = x.shape
    r = dS.shape[1]
    dA = torch.empty((r, K), dtype=torch.float32, device=x.device)
    if r == 0 or K == 0:
        return dA
    if M == 0:
        return dA.zero_()
    bm, br = _block_rows(M, 64), _block_r(r)
    tiles = triton.cdiv(K, _BLOCK_K) * triton.cdiv(r, br)
    split, per_split = mm._split_for(tiles, M, bm, x.device)
    ws = torch.empty((split, r, K), dtype=torch.float32, device=x.device) if split > 1 else dA
    _lora_da_kernel[(triton.cdiv(K, _BLOCK_K), triton.cdiv(r, br), split)](
        dS, x, ws, M, K, r, dS.stride(0), x.stride(0), per_split, *_keep_args(p, seed),
        BLOCK_M=bm, BLOCK_R=br, BLOCK_K=_BLOCK_K, SPLIT_M=split, DROPOUT=p > 0.0,
        FP32_PRECISION=mm._FP32_PRECISION, num_warps=4, num_stages=3, **mm._LAUNCH_OPTS)
    if split > 1:
        _reduce(ws, dA)
    return dA


def lora_forward(x, packed, code, absmax, N, K, blocksize, A, B, scale, p, seed, bias=None,
                 nested=None):
    """(y [M, N] in x.dtype, S [M, r] fp32) for x [M, K] fp16/bf16/fp32:
    y = x W_hat^T + bias + scale * S B^T with S = drop(x) A^T.

    The weight arguments are those of kernels.matmul.nf4_matmul; A [r, K] and B [N, r] in any
    float dtype; p in [0, 1) and seed (an integer) define the dropout mask (keep_mask).
    """
    mm._check_act(x, "x", K, "K")
    _check_seed_p(p, seed)
    _check_adapter(A, B, N, K, x.device)
    x, A, B = mm._rows(x), mm._rows(A), mm._rows(B)
    S = _lora_s(x, A, p, seed)
    y = mm.nf4_matmul(x, packed, code, absmax, N, K, blocksize, bias=bias, nested=nested,
                      lora_s=S, lora_b=B, lora_scale=scale)
    return y, S


def lora_backward(dy, x, S, packed, code, absmax, N, K, blocksize, A, B, scale, p, seed, needs,
                  nested=None):
    """(dx [M, K] in x.dtype, dA [r, K], dB [N, r], dbias [N], the last three fp32) of
    lora_forward for dy [M, N], x [M, K] and its S [M, r]; an entry whose flag in `needs`
    (need_dx, need_dA, need_dB, need_dbias) is false comes back None."""
    need_dx, need_dA, need_dB, need_dbias = (bool(n) for n in needs)
    mm._check_act(dy, "dy", N, "N")
    mm._check_act(x, "x", K, "K")
    _check_seed_p(p, seed)
    r = _check_adapter(A, B, N, K, dy.device)
    M = dy.shape[0]
    _check_float(x, "x", dy.device)
    if x.shape[0] != M:
        raise ValueError(f"x has {x.shape[0]} rows, dy {M}")
    if not isinstance(S, torch.Tensor) or S.dtype != torch.float32 or tuple(S.shape) != (M, r) \
            or S.device != dy.device:
        raise ValueError(f"S must be the forward's float32 [M={M}, r={r}] on {dy.device}, got "
                         f"{getattr(S, 'dtype', None)} {tuple(getattr(S, 'shape', ()))}")
    dy, x, S, A, B = (mm._rows(t) for t in (dy, x, S, A, B))
    dS, dB, dbias = _dy_pass(dy, B, S, scale, need_dx or need_dA, need_dB, need_dbias)
    dx = dA = None
    if need_dx:
        dx = mm.nf4_matmul_dx(dy, packed, code, absmax, N, K, blocksize, nested=nested,
                              out_dtype=x.dtype, lora_ds=dS, lora_a=A, lora_p=p, lora_seed=seed)
    if need_dA:
        dA = _lora_da(dS, x, p, seed)
    return dx, dA, dB, dbias


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (nf4kern.compile_gate)
# ------------------------------------------------------------------------------------------------

# Integer arguments that are multiples of 16 for aligned shapes (K, N and r = 64 multiples of 16,
# contiguous rows); the JIT specialises them (and every 16-byte-aligned pointer) the same way.
_DIV16_INTS = ("K", "N", "r", "stride_xm", "stride_ar", "stride_dm", "stride_bn", "stride_sm",
               "stride_dsm", "k_per_split", "m_per_split")


def _spec(name, kernel, act, adapter, constexprs, num_warps=4, num_stages=3):
    """act: the activation dtype (x, dy); adapter: the dtype of A and B ("fp32" for PEFT's
    float32 adapters, or the activation dtype)."""
    types = {"x_ptr": f"*{act}", "dy_ptr": f"*{act}", "a_ptr": f"*{adapter}",
             "b_ptr": f"*{adapter}", "seed": "i64", "drop_p": "fp32", "keep_scale": "fp32",
             "scale": "fp32"}
    signature = {n: "constexpr" if n in constexprs else
                 types.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if signature[n].startswith("*") or n in _DIV16_INTS}
    fields = dict(name=name, fn=kernel, signature=signature, constexprs=dict(constexprs),
                  num_warps=num_warps, num_stages=num_stages, attrs=attrs)
    return mm._KernelSpec(**fields) if mm._KernelSpec is not None else fields


def _compile_specs() -> list:
    """Each LoRA kernel for fp16, bf16 and fp32 activations with float32 adapters (and bf16
    adapters with bf16 activations: the native 16-bit dots), r = 64 (r tile 64), dropout on:
    the large and the small-M (16 rows) tiles, S and dA each split and not; the dY pass with
    every output and with dS only."""
    specs = []
    fp32 = mm._FP32_PRECISION
    for act, adapter in (("fp16", "fp32"), ("bf16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")):
        tag = f"{act}_a{adapter}"
        bk = _BLOCK_K if act == adapter != "fp32" else _BLOCK_K_FP32
        # Each row tile with and without a split (split 1 stores S directly), as _split_for may
        # pick either.
        for bm, split in ((32, 1), (32, 4), (16, 1), (16, 4)):
            specs.append(_spec(f"lora_s_m{bm}_split{split}_{tag}", _lora_s_kernel, act, adapter,
                               dict(BLOCK_M=bm, BLOCK_R=64, BLOCK_K=bk, SPLIT_K=split,
                                    DROPOUT=True, FP32_PRECISION=fp32)))
        dy = dict(BLOCK_N=_DY_BLOCK_N, BLOCK_R=64, FP32_PRECISION=fp32)
        for bm in (32, 16):
            specs.append(_spec(f"lora_dy_m{bm}_{tag}", _lora_dy_kernel, act, adapter,
                               dict(dy, BLOCK_M=bm, NEED_DS=True, NEED_DB=True, NEED_DBIAS=True),
                               num_warps=_DY_WARPS))
        specs.append(_spec(f"lora_dy_m32_ds_only_{tag}", _lora_dy_kernel, act, adapter,
                           dict(dy, BLOCK_M=32, NEED_DS=True, NEED_DB=False, NEED_DBIAS=False),
                           num_warps=_DY_WARPS))
        for bm, split in ((64, 1), (64, 4), (16, 1), (16, 16)):
            specs.append(_spec(f"lora_da_m{bm}_split{split}_{tag}", _lora_da_kernel, act, adapter,
                               dict(BLOCK_M=bm, BLOCK_R=64, BLOCK_K=_BLOCK_K, SPLIT_M=split,
                                    DROPOUT=True, FP32_PRECISION=fp32)))
    specs.append(_spec("keep_mask", _keep_mask_kernel, "fp32", "fp32",
                       dict(BLOCK_M=_MASK_TILE[0], BLOCK_K=_MASK_TILE[1])))
    return specs


COMPILE_SPECS = _compile_specs()
