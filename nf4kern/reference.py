"""The float64 reference: the 4-bit format written as its specification.

Slow and plain on purpose. Arithmetic is carried in float64 and rounded to float32 exactly where
the format rounds (`_f32`); a product of two float32 numbers is exact in float64, so rounding it
once gives the correctly rounded float32 product. Every fast path is tested against this module.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import codebook as cb

# The smallest absmax whose reciprocal is taken: an all-zero block scales by 1/1e-38, so its
# elements (and the padding) take the code of 0.0.
_TINY_ABSMAX = np.float32(1e-38)


def _f32(a) -> np.ndarray:
    with np.errstate(over="ignore"):  # float32 overflow to inf is part of the arithmetic
        return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


@dataclass
class Quantized:
    packed: np.ndarray  # uint8 [ceil(n / 2)]
    absmax: np.ndarray  # float32 [B] (plain) or uint8 [B] (nested codes)
    nested_absmax: np.ndarray | None = None  # float32 [ceil(B / 256)]
    offset: np.float32 | None = None


def scale_codes(s: np.ndarray, quant_type: str) -> np.ndarray:
    """4-bit code of each scaled value s (float32 values held in float64, s in [-1, 1] or NaN)."""
    if quant_type == "nf4":
        # Number of thresholds strictly below s: the nearest value, ties to the lower code.
        codes = np.searchsorted(cb.nf4_thresholds().astype(np.float64), s, side="left")
        top = 15
    else:
        sign = np.where(s < 0, 8, 0)
        rank = np.searchsorted(cb.FP4_MAGNITUDE_THRESHOLDS.astype(np.float64), np.abs(s), side="left")
        codes = cb.FP4_CODES_BY_MAGNITUDE[np.minimum(rank, 7)] | sign
        top = 3
    # A NaN (only with allow_nonfinite) takes the code of +1, as bitsandbytes' CPU path does.
    return np.where(np.isnan(s), top, codes).astype(np.uint8)


def quantize(x: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool) -> Quantized:
    flat = x.detach().cpu().reshape(-1).to(torch.float64).numpy()
    n = flat.size
    nblocks = -(-n // blocksize)
    padded = np.zeros(nblocks * blocksize)
    padded[:n] = flat
    blocks = padded.reshape(nblocks, blocksize)

    # A partial last block takes the max over its real elements; the zero padding cannot raise it.
    absmax = np.abs(blocks).max(axis=1)
    recip = _f32(1.0 / _f32(np.maximum(absmax, _TINY_ABSMAX)))
    with np.errstate(invalid="ignore"):  # inf * 0 in a non-finite block (allow_nonfinite)
        s = np.clip(_f32(blocks * recip[:, None]), -1.0, 1.0)
    codes = scale_codes(s, quant_type).reshape(-1)[:n]
    packed = pack_codes(codes, cb.zero_code(quant_type))

    absmax32 = absmax.astype(np.float32)
    if not double_quant:
        return Quantized(packed, absmax32)
    offset = nested_offset(absmax32)
    qabsmax, nested_absmax = quantize_nested(absmax32, offset)
    return Quantized(packed, qabsmax, nested_absmax, offset)


def pack_codes(codes: np.ndarray, pad_code: int) -> np.ndarray:
    """Two codes a byte, the first element in the high nibble; an odd count pads with pad_code."""
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad_code))
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def unpack_codes(packed: np.ndarray, n: int) -> np.ndarray:
    return np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]


def nested_offset(absmax: np.ndarray) -> np.float32:
    """The float32 mean of the absmax as torch.mean computes it on the CPU.

    bitsandbytes stores absmax.mean(); its summation order decides the last bit, so the
    reference reproduces that call rather than an exactly rounded mean.
    """
    return np.float32(torch.from_numpy(absmax).mean().item())


def quantize_nested(absmax: np.ndarray, offset: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Double quantization of the float32 absmax: 8-bit dynamic codes in blocks of 256."""
    centred = _f32(absmax.astype(np.float64) - np.float64(offset))
    nblocks = -(-centred.size // cb.NESTED_BLOCKSIZE)
    padded = np.zeros(nblocks * cb.NESTED_BLOCKSIZE)
    padded[: centred.size] = centred
    blocks = padded.reshape(nblocks, cb.NESTED_BLOCKSIZE)
    nested_absmax = np.abs(blocks).max(axis=1)
    # float32(1 / nested absmax) overflows to inf below ~2**-128: scaled values are then +-inf
    # (codes 255 / 0) or NaN for 0 * inf (code 255, as NaN sorts last), as bitsandbytes stores.
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        recip = _f32(1.0 / nested_absmax)
        s = _f32(blocks * recip[:, None])
    codes = dynamic_codes(s.reshape(-1)).reshape(nblocks, cb.NESTED_BLOCKSIZE)
    # A block whose absmax all equal the offset has nested absmax 0: bitsandbytes' scaled values
    # are NaN there and store code 0. Any code decodes to the offset (code * 0 + offset).
    codes[nested_absmax == 0] = 0
    return codes.reshape(-1)[: centred.size], nested_absmax.astype(np.float32)


def dynamic_codes(s: np.ndarray) -> np.ndarray:
    """Exact nearest entry of the dynamic map (ties to the lower code)."""
    dyn = cb.dynamic_map()
    mids = ((dyn[:-1] + dyn[1:]) / np.float32(2.0)).astype(np.float64)
    return np.searchsorted(mids, s, side="left").astype(np.uint8)


def dequantize_absmax(q: Quantized) -> np.ndarray:
    """The float32 block scales (held in float64), decoding the nested level if present."""
    if q.nested_absmax is None:
        return q.absmax.astype(np.float64)
    dyn = cb.dynamic_map().astype(np.float64)
    nested = np.repeat(q.nested_absmax.astype(np.float64), cb.NESTED_BLOCKSIZE)[: q.absmax.size]
    return _f32(_f32(dyn[q.absmax] * nested) + np.float64(q.offset))


def dequantize(q: Quantized, n: int, blocksize: int, quant_type: str, dtype: torch.dtype) -> torch.Tensor:
    """Flat dequantized values: one float32 product code * absmax, then one rounding to dtype."""
    values = cb.codebook(quant_type).astype(np.float64)[unpack_codes(q.packed, n)]
    scales = np.repeat(dequantize_absmax(q), blocksize)[:n]
    with np.errstate(invalid="ignore"):  # 0 * inf in a non-finite block (allow_nonfinite)
        w32 = _f32(values * scales).astype(np.float32)
    return torch.from_numpy(w32).to(dtype)  # round-to-nearest-even


def dequantized_weight(packed: torch.Tensor, state) -> torch.Tensor:
    """W_hat as float64 (the float32 values code * scale, exactly) in the state's shape."""
    q = Quantized(
        packed.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy(),
        state.absmax.cpu().numpy(),
        None if not state.nested else state.state2.absmax.cpu().numpy(),
        None if not state.nested else np.float32(state.offset.item()),
    )
    return dequantize(q, state.numel, state.blocksize, state.quant_type, torch.float32).double().reshape(state.shape)


def matmul(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W_hat^T + bias in float64."""
    y = x.detach().cpu().double() @ dequantized_weight(packed, state).T
    return y if bias is None else y + bias.detach().cpu().double()


def matmul_dx(dy: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """dx = dy W_hat in float64."""
    return dy.detach().cpu().double() @ dequantized_weight(packed, state)


def lora_forward(x, packed, state, bias, A, B, scale, keep):
    """y = x W_hat^T + b + scale * (drop(x) A^T) B^T in float64, with drop(x) = x * keep / (1 - p)
    given as the float64 multiplier `keep` (0 or 1/(1-p) per element, or None for no dropout)."""
    x64 = x.detach().cpu().double()
    xd = x64 if keep is None else x64 * keep.double()
    S = xd @ A.detach().cpu().double().T
    return matmul(x, packed, state, bias) + scale * S @ B.detach().cpu().double().T, S


def lora_backward(dy, x, packed, state, A, B, scale, keep):
    """(dx, dA, dB, dbias) of lora_forward in float64."""
    dy64, x64 = dy.detach().cpu().double(), x.detach().cpu().double()
    A64, B64 = A.detach().cpu().double(), B.detach().cpu().double()
    xd = x64 if keep is None else x64 * keep.double()
    S = xd @ A64.T
    dS = scale * dy64 @ B64
    dlora_x = dS @ A64 if keep is None else (dS @ A64) * keep.double()
    return matmul_dx(dy, packed, state) + dlora_x, dS.T @ xd, scale * dy64.T @ S, dy64.sum(0)
