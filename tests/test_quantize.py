"""quantize_4bit / dequantize_4bit (torch path, the CPU default) against the float64 reference."""
import numpy as np
import pytest
import torch

import nf4kern
from nf4kern import codebook as cb
from nf4kern import reference, torch_ops
from tests.conftest import DTYPES
from tests.helpers import assert_bytes_equal, randn, unpack

SIZES = [1, 3, 17, 65, 130, 1000, 4097, 300_001]


def _check_against_reference(x, blocksize, quant_type, double_quant, backend="torch"):
    packed, state = nf4kern.quantize_4bit(x, blocksize, quant_type, double_quant, backend=backend)
    ref = reference.quantize(x, blocksize, quant_type, double_quant)
    assert_bytes_equal(packed, torch.from_numpy(ref.packed), "packed")
    assert_bytes_equal(state.absmax, torch.from_numpy(ref.absmax), "absmax")
    if double_quant:
        assert_bytes_equal(state.state2.absmax, torch.from_numpy(ref.nested_absmax), "nested absmax")
        assert state.offset.item() == ref.offset
    out = nf4kern.dequantize_4bit(packed, state, backend=backend)
    expected = reference.dequantize(ref, x.numel(), blocksize, quant_type, x.dtype).reshape(x.shape)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_bytes_equal(out, expected, "dequantized")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_torch_path_matches_reference(dtype, n, quant_type, rng):
    blocksize = [32, 64, 128, 256, 512, 1024, 2048, 4096][n % 8]
    x = randn((n,), dtype, rng, scale=0.02)
    _check_against_reference(x, blocksize, quant_type, double_quant=n % 2 == 0)
    _check_against_reference(x, 64, quant_type, double_quant=n % 2 == 1)


@pytest.mark.parametrize("blocksize", cb.BLOCKSIZES)
def test_every_blocksize_with_partial_blocks(blocksize, rng):
    x = randn((3, blocksize + 17), torch.bfloat16, rng)
    for quant_type in ("nf4", "fp4"):
        _check_against_reference(x, blocksize, quant_type, double_quant=True)


@pytest.mark.parametrize("lookup", torch_ops.LOOKUPS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_both_table_lookups_give_the_references_bytes(lookup, quant_type, monkeypatch, rng):
    """The torch path looks its code tables up with gather or index_select, whichever a timing
    on first use finds faster on the CPU at hand: each must give the reference's bytes, over
    several chunks, an odd tail and every threshold with its float32 neighbours."""
    monkeypatch.setattr(torch_ops, "_lookup", lambda: lookup)
    edges = np.concatenate([_thresholds_and_neighbours(quant_type), [-1.0, 0.0, -0.0]])
    body = np.zeros(-(-len(edges) // 31) * 31, np.float32)
    body[: len(edges)] = edges
    rows = np.concatenate([np.ones((len(body) // 31, 1), np.float32), body.reshape(-1, 31)], axis=1)
    # every block of 32 (and of 64) holds a 1.0: its absmax is 1, so s == x exactly
    x = torch.cat([torch.from_numpy(rows.reshape(-1)), randn((300_001,), torch.float32, rng)])
    _check_against_reference(x, 64, quant_type, double_quant=True)
    _check_against_reference(x, 32, quant_type, double_quant=False)


def test_the_timed_lookup_is_one_of_the_two():
    assert torch_ops._lookup() in torch_ops.LOOKUPS


def _thresholds_and_neighbours(quant_type: str) -> np.ndarray:
    if quant_type == "nf4":
        t = cb.nf4_thresholds()
    else:
        t = np.concatenate([cb.FP4_MAGNITUDE_THRESHOLDS, -cb.FP4_MAGNITUDE_THRESHOLDS])
    return np.concatenate([t, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-2))]).astype(np.float32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_and_edges_follow_the_rule(quant_type):
    # Values exactly at each decision threshold, one float32 step either side, +-1, signed zeros,
    # subnormals: the block absmax is 1 so s == x.
    extra = np.array([1.0, -1.0, 0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40], dtype=np.float32)
    x = torch.from_numpy(np.concatenate([_thresholds_and_neighbours(quant_type), extra]))
    _check_against_reference(x, 32, quant_type, double_quant=False)
    _check_against_reference(x, 32, quant_type, double_quant=False, backend="reference")


# (s, the code bitsandbytes' CUDA dQuantizeFP4 gives it): sign bit 8 iff s < 0, then `|s| > T`
# against the kernel's literals, ties to the smaller magnitude. Where noted, its CPU path (exact
# midpoints, ties to the lower value, zeros sorted together) picks another code.
FP4_CUDA_CODES = [
    (1.0, 3),
    (-0.41666669, 12),  # |s| is the literal 0.4166667f itself, not above it: -1/3 (CPU: 13, -1/2)
    (0.5833334, 2),  # the midpoint of 1/2 and 2/3, 6 ulp above 0.583333f: 2/3 (CPU: 5, 1/2)
    (0.2916667, 4),  # the midpoint of 1/4 and 1/3, 1 ulp above 0.29166667f: 1/3 (CPU: 7, 1/4)
    (0.002604168, 0),  # above the midpoint of 0 and 1/192, below 0.00260417f: 0 (CPU: 1)
    (0.001, 0),  # (CPU: 8)
    (-0.001, 8),  # negative with magnitude code 0: the sign bit alone (CPU: 0)
    (-0.0, 0),  # -0.0 < 0 is false
]


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_fp4_codes_are_the_cuda_kernels(backend):
    # The block's absmax is the 1.0, so s == x exactly.
    values, codes = zip(*FP4_CUDA_CODES)
    x = torch.tensor(values, dtype=torch.float32)
    packed, state = nf4kern.quantize_4bit(x, 32, "fp4", backend=backend)
    assert state.absmax.tolist() == [1.0]
    assert unpack(packed, x.numel()).tolist() == list(codes)


def test_zero_and_tiny_blocks(rng):
    x = randn((4, 64), torch.float32, rng)
    x[1] = 0.0
    x[2] = -0.0
    x[3] = 1e-40  # an absmax below 1e-38 scales by 1/1e-38: the block collapses to zero codes
    _check_against_reference(x, 64, "nf4", double_quant=True)
    packed, state = nf4kern.quantize_4bit(x, 64)
    out = nf4kern.dequantize_4bit(packed, state)
    assert torch.all(out[1:] == 0)


def test_constant_absmax_double_quant(rng):
    # Every block has the same absmax: absmax - offset is 0, so nested absmax is 0.
    x = torch.ones(4, 64) * torch.tensor([1.0, -1.0] * 32)
    _check_against_reference(x, 64, "nf4", double_quant=True)
    packed, state = nf4kern.quantize_4bit(x, 64, double_quant=True)
    assert torch.equal(nf4kern.dequantize_4bit(packed, state), x)


def test_reference_backend_matches_torch_backend(rng):
    x = randn((5, 130), torch.float16, rng)
    a = nf4kern.quantize_4bit(x, 64, "nf4", True, backend="reference")
    b = nf4kern.quantize_4bit(x, 64, "nf4", True, backend="torch")
    assert_bytes_equal(a[0], b[0])
    assert a[1] == b[1]


def test_non_contiguous_input_quantized_in_logical_order(rng):
    w = randn((65, 33), torch.bfloat16, rng)
    a = nf4kern.quantize_4bit(w.t(), 64, double_quant=True)
    b = nf4kern.quantize_4bit(w.t().contiguous(), 64, double_quant=True)
    assert_bytes_equal(a[0], b[0])
    assert a[1] == b[1] and a[1].shape == (33, 65)


@pytest.mark.parametrize("storage", [torch.uint8, torch.float16, torch.bfloat16, torch.float32])
def test_quant_storage_is_a_view_of_the_same_bytes(storage, rng):
    x = randn((16, 64), torch.bfloat16, rng)
    base, state = nf4kern.quantize_4bit(x, 64)
    packed, state2 = nf4kern.quantize_4bit(x, 64, quant_storage=storage)
    itemsize = torch.empty((), dtype=storage).element_size()
    assert packed.dtype == storage and packed.shape == (16 * 64 // 2 // itemsize, 1)
    assert_bytes_equal(packed, base)
    assert torch.equal(nf4kern.dequantize_4bit(packed, state2), nf4kern.dequantize_4bit(base, state))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_to_another_dtype_rounds_once(dtype, rng):
    x = randn((7, 96), torch.float32, rng)
    packed, state = nf4kern.quantize_4bit(x, 32, double_quant=True)
    as_f32 = nf4kern.dequantize_4bit(packed, state, dtype=torch.float32)
    assert torch.equal(nf4kern.dequantize_4bit(packed, state, dtype=dtype), as_f32.to(dtype))


def test_packed_shape_is_a_column(rng):
    for shape, rows in [((4096, 4096), 8388608), ((33, 65), 1073), ((3,), 2), ((2, 3, 64), 192)]:
        packed, state = nf4kern.quantize_4bit(torch.zeros(shape), 64)
        assert packed.shape == (rows, 1) and state.shape == shape


def test_allow_nonfinite_decodes_bad_blocks_to_nan(rng):
    x = randn((3, 64), torch.float32, rng)
    x[0, 5] = float("nan")
    x[1, 0] = float("inf")
    before = x.clone()
    packed, state = nf4kern.quantize_4bit(x, 64, allow_nonfinite=True)
    ref = reference.quantize(x, 64, "nf4", False)
    assert_bytes_equal(packed, torch.from_numpy(ref.packed))
    assert torch.isnan(state.absmax[0]) and torch.isinf(state.absmax[1])
    out = nf4kern.dequantize_4bit(packed, state)
    assert torch.isnan(out[0]).all() and torch.equal(out[2], reference.dequantize(ref, 192, 64, "nf4", torch.float32)[128:])
    assert_bytes_equal(x, before, "input")


def test_nested_codes_at_every_dynamic_map_midpoint():
    # Offset 0 and a nested absmax of 1 make the scaled value equal the input: put one exactly
    # at every midpoint of the dynamic map and at its float32 neighbours, plus the ends.
    from nf4kern import torch_ops

    dyn = cb.dynamic_map()
    mids = (dyn[:-1] + dyn[1:]) / np.float32(2.0)
    values = np.concatenate([mids, np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2)), dyn, [1.0, -1.0, 0.0]])
    absmax = torch.from_numpy(values.astype(np.float32))
    codes, nested = torch_ops.quantize_nested(absmax, torch.tensor(0.0))
    ref_codes, ref_nested = reference.quantize_nested(absmax.numpy(), np.float32(0.0))
    assert torch.equal(nested, torch.from_numpy(ref_nested)) and float(nested.max()) == 1.0
    assert torch.equal(codes, torch.from_numpy(ref_codes))
