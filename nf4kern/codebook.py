"""The 4-bit codebooks (NF4, FP4), their decision thresholds, and the 8-bit dynamic map.

Every table is computed here from its definition; tests assert the results equal bitsandbytes'
float32 values bit for bit.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy.stats import norm

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256

# QLoRA's NF4: quantiles of N(0, 1) with the outer probability trimmed so both ends stay finite.
_NF4_OFFSET = 0.9677083


@functools.lru_cache(maxsize=None)
def nf4_codebook() -> np.ndarray:
    """16 float32 NF4 values, ascending: 8 positive quantiles, exact 0, 7 negative quantiles.

    The probabilities are float32 points (as bitsandbytes defines them); the quantiles are
    taken in float64, rounded to float32, and normalised in float32 so the ends are exactly +-1.
    """
    positive = norm.ppf(_float32_linspace(_NF4_OFFSET, 0.5, 9)[:-1])
    negative = -norm.ppf(_float32_linspace(_NF4_OFFSET, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]).astype(np.float32))
    values = values / values.max()
    _readonly(values)
    return values


@functools.lru_cache(maxsize=None)
def fp4_codebook() -> np.ndarray:
    """bitsandbytes' FP4 (1 sign bit, 3 magnitude bits), indexed by code; bit 3 is the sign."""
    # Magnitudes in twelfths, by 3-bit magnitude code: 0, 1/16, 8, 12, 4, 6, 2, 3.
    twelfths = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=np.float32)
    magnitude = twelfths / np.float32(12.0)
    values = np.concatenate([magnitude, -magnitude]).astype(np.float32)
    values[8] = 0.0  # code 8 decodes to +0.0, as in bitsandbytes' table
    _readonly(values)
    return values


def codebook(quant_type: str) -> np.ndarray:
    check_quant_type(quant_type)
    return nf4_codebook() if quant_type == "nf4" else fp4_codebook()


@functools.lru_cache(maxsize=None)
def nf4_thresholds() -> np.ndarray:
    """The 15 float32 midpoints between consecutive NF4 values.

    The code of a scaled value s is the number of thresholds strictly below s: the nearest
    value, with a tie going to the lower code.
    """
    c = nf4_codebook()
    mids = (c[:-1] + c[1:]) / np.float32(2.0)
    _readonly(mids)
    return mids


# FP4 follows the CUDA kernel's decision tree: decimal literals that are not all exact midpoints.
# Each magnitude code is chosen by `|s| > T` tests, ties going to the smaller magnitude.
FP4_MAGNITUDE_THRESHOLDS = np.array(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333],
    dtype=np.float32,
)
# The magnitude codes in ascending order of magnitude: 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1.
FP4_CODES_BY_MAGNITUDE = np.array([0, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map (256 float32 values, ascending) used for nested absmax.

    For each decade e = 0..6 it holds the 2**e midpoints of linspace(0.1, 1, 2**e + 1) scaled
    by 10**(e - 6), with both signs, plus 0 and 1. -1 is not representable.
    """
    values: list[np.ndarray] = []
    for e in range(7):
        edges = _float32_linspace(0.1, 1.0, 2**e + 1)
        mids = (edges[:-1] + edges[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (e - 6))
        values += [scale * mids, -scale * mids]
    values.append(np.array([0.0, 1.0], dtype=np.float32))
    table = np.sort(np.concatenate(values))
    assert table.shape == (256,)
    _readonly(table)
    return table


def _float32_linspace(start: float, stop: float, steps: int) -> np.ndarray:
    """torch.linspace in float32, whose rounding the codebook definitions depend on."""
    import torch

    return torch.linspace(start, stop, steps, dtype=torch.float32).numpy()


def check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def zero_code(quant_type: str) -> int:
    """The code of 0.0, used for the padding nibble of an odd element count."""
    return 7 if quant_type == "nf4" else 0


def _readonly(a: np.ndarray) -> None:
    a.setflags(write=False)
