"""The codebooks, computed from their definitions, equal bitsandbytes' tables bit for bit, and
the FP4 decision thresholds equal its CUDA kernel's literals."""
import numpy as np
import pytest
import torch

from nf4kern import codebook as cb

# The thresholds of bitsandbytes' CUDA dQuantizeFP4 (csrc/kernels.cu), as written there, in
# ascending order. GPU-made checkpoints hold the codes this tree chooses.
CUDA_FP4_LITERALS = ("0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333")
# The codes dQuantizeFP4 returns for |s| at or below each threshold in turn, then above the last.
CUDA_FP4_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)


@pytest.fixture(scope="module")
def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


def test_nf4_codebook_equals_bitsandbytes(bnb_functional):
    ours = cb.nf4_codebook()
    theirs = bnb_functional.get_4bit_type("nf4", device="cpu").numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_nf4_codebook_is_normal_quantiles():
    ours = cb.nf4_codebook()
    assert ours[0] == -1.0 and ours[7] == 0.0 and ours[15] == 1.0
    assert np.all(np.diff(ours) > 0)
    assert (ours < 0).sum() == 7 and (ours > 0).sum() == 8


def test_fp4_codebook_equals_bitsandbytes(bnb_functional):
    ours = cb.fp4_codebook()
    theirs = bnb_functional.get_4bit_type("fp4", device="cpu").numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_dynamic_map_equals_bitsandbytes(bnb_functional):
    ours = cb.dynamic_map()
    theirs = bnb_functional.create_dynamic_map(signed=True).numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    assert ours[127] == 0.0 and ours[255] == 1.0 and len(np.unique(ours)) == 256


def test_nf4_thresholds_are_float32_midpoints():
    c = cb.nf4_codebook().astype(np.float64)
    t = cb.nf4_thresholds()
    assert t.dtype == np.float32
    np.testing.assert_allclose(t, (c[:-1] + c[1:]) / 2, rtol=1e-7)


def test_fp4_thresholds_are_the_cuda_kernel_literals():
    # A C float literal is the decimal rounded once to float32.
    cuda = np.array([np.float32(v) for v in CUDA_FP4_LITERALS])
    np.testing.assert_array_equal(cb.FP4_MAGNITUDE_THRESHOLDS.view(np.uint32), cuda.view(np.uint32))
    assert tuple(cb.FP4_CODES_BY_MAGNITUDE) == CUDA_FP4_CODES


def test_fp4_decision_tree_picks_a_nearest_value():
    # The CUDA tree's literals are near-midpoints: every |s| maps to a value at most a few ulp
    # farther than the exact nearest one.
    mags = np.abs(cb.fp4_codebook()[:8]).astype(np.float64)
    s = np.linspace(0, 1, 100001)
    rank = np.searchsorted(cb.FP4_MAGNITUDE_THRESHOLDS.astype(np.float64), s, side="left")
    chosen = mags[cb.FP4_CODES_BY_MAGNITUDE[rank]]
    best = np.abs(s[:, None] - mags[None, :]).min(axis=1)
    assert np.all(np.abs(s - chosen) - best <= 1e-6)


@pytest.mark.parametrize("blocksize", [16, 8192, 64.0, True, "64"])
def test_invalid_blocksize_rejected(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        cb.check_blocksize(blocksize)


def test_codebooks_are_read_only():
    with pytest.raises(ValueError):
        cb.nf4_codebook()[0] = 0.5
    assert torch.from_numpy(cb.codebook("fp4").copy()).shape == (16,)
