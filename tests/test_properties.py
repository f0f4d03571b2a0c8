"""Property tests of quantize_4bit / dequantize_4bit with nf4kern.testing's strategies and
bounds, and tests that those helpers are neither vacuous nor blind."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import nf4kern
from nf4kern import codebook as cb
from nf4kern import reference
from nf4kern import testing as T

# NF4KERN_EXAMPLES scales every test's example count (default 40; e.g. 2000 for a long soak).
_EXAMPLES = int(os.environ.get("NF4KERN_EXAMPLES", "40"))
PROPERTY = settings(
    deadline=None,
    max_examples=_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
FEW = settings(PROPERTY, max_examples=max(1, _EXAMPLES * 3 // 8))
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _storage_for(nbytes: int) -> list[torch.dtype]:
    return [d for d in nf4kern.functional.STORAGE_DTYPES if nbytes % torch.empty((), dtype=d).element_size() == 0]


def _offset_overflows(w: torch.Tensor, blocksize: int) -> bool:
    """Whether the float32 sum behind the double-quant offset (mean absmax) overflows: a known
    core bug (see test_double_quant_of_huge_finite_weights_stays_finite), kept out of the
    property tests' domain."""
    nblocks = -(-w.numel() // blocksize)
    padded = torch.nn.functional.pad(w.reshape(-1).double().abs(), (0, nblocks * blocksize - w.numel()))
    return padded.view(nblocks, blocksize).amax(dim=1).sum().item() >= 2.0**127


@st.composite
def quantized(draw, max_numel=2048, kind=None, shape=None, dtype=None, double_quant=None, moderate=False):
    """(w, packed, state) from the torch backend, every parameter drawn; `moderate` keeps the
    scale within 2**+-10 (no subnormals or flushed-to-zero tensors)."""
    blocksize = draw(T.blocksizes())
    quant_type = draw(T.quant_types())
    dq = draw(st.booleans()) if double_quant is None else double_quant
    log2_scale = draw(st.integers(-10, 10)) if moderate else None
    w = draw(T.weights(shape=shape, dtype=dtype, kind=kind, blocksize=blocksize, max_numel=max_numel, log2_scale=log2_scale))
    assume(not (dq and _offset_overflows(w, blocksize)))
    storage = draw(st.sampled_from(_storage_for(-(-w.numel() // 2))))
    packed, state = nf4kern.quantize_4bit(w, blocksize, quant_type, dq, storage)
    return w, packed, state


# ---- the bound ------------------------------------------------------------------------------


@PROPERTY
@given(quantized(), T.float_dtypes())
def test_dequantized_within_bound(q, out_dtype):
    w, packed, state = q
    T.assert_within_bound(w, packed, state, dtype=out_dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # reference.py, 1/tiny
@FEW
@given(st.data())
def test_reference_backend_within_bound(data):
    ref_q = functools.partial(nf4kern.quantize_4bit, backend="reference")
    ref_dq = functools.partial(nf4kern.dequantize_4bit, backend="reference")
    blocksize = data.draw(st.sampled_from((32, 64, 128)))
    quant_type = data.draw(T.quant_types())
    dq = data.draw(st.booleans())
    w = data.draw(T.weights(blocksize=blocksize, max_numel=300))
    assume(not (dq and _offset_overflows(w, blocksize)))
    packed, state = ref_q(w, blocksize=blocksize, quant_type=quant_type, double_quant=dq)
    T.assert_within_bound(w, packed, state, dequantize=ref_dq)
    T.assert_monotone_codes(w, packed, state)


@settings(PROPERTY, max_examples=max(1, _EXAMPLES * 5 // 8))
@given(quantized(kind="normal", shape=(32, 64), moderate=True))
def test_bound_is_tight_on_normal_data(q):
    w, packed, state = q
    w_hat = nf4kern.dequantize_4bit(packed, state)
    ratio = ((w.double() - w_hat.double()).abs() / T.error_bound(w, packed, state)).max().item()
    assert 0.3 < ratio <= 1.0, ratio


@FEW
@given(quantized(), st.booleans())
def test_corrupted_element_fails_the_bound(q, up):
    w, packed, state = q
    w_hat = nf4kern.dequantize_4bit(packed, state)
    bound = T.error_bound(w, packed, state)
    i = int(bound.reshape(-1).argmax())
    bad = w_hat.clone().reshape(-1)
    sign = 1 if up else -1
    bad[i] = (w.reshape(-1)[i].double() + sign * 2 * bound.reshape(-1)[i]).to(w_hat.dtype)
    with pytest.raises(AssertionError, match="exceed the error bound"):
        T.assert_within_bound(w, packed, state, bad.reshape(w.shape))


@FEW
@given(quantized(double_quant=False, moderate=True))
def test_wrong_absmax_fails_the_scale_check(q):
    w, packed, state = q
    b = int(state.absmax.argmax())
    assume(state.absmax[b] > 0)
    state.absmax[b] = torch.nextafter(state.absmax[b], torch.tensor(math.inf))
    with pytest.raises(AssertionError, match="block absmax"):
        T.assert_within_bound(w, packed, state)


@FEW
@given(quantized(double_quant=True, moderate=True))
def test_wrong_offset_fails_the_scale_check(q):
    w, packed, state = q
    assume(state.offset > 0)
    state.offset = state.offset * 1.01
    with pytest.raises(AssertionError, match="offset"):
        T.assert_within_bound(w, packed, state)


@pytest.mark.parametrize("quant_type", cb.QUANT_TYPES)
def test_max_code_error_is_the_implementations_worst_case(quant_type):
    """E is attained (up to an ulp) by the implementation and never exceeded, on a grid that
    holds every threshold and its float32 neighbours."""
    t = cb.nf4_thresholds() if quant_type == "nf4" else np.concatenate([cb.FP4_MAGNITUDE_THRESHOLDS, -cb.FP4_MAGNITUDE_THRESHOLDS])
    near = [np.nextafter(t, np.float32(-2)), t, np.nextafter(t, np.float32(2))]
    s = np.concatenate([*near, np.linspace(-1, 1, 4001, dtype=np.float32)]).astype(np.float32)
    s = s[np.abs(s) <= 1]
    blocks = np.concatenate([np.ones((len(s), 1), np.float32), s[:, None]], axis=1)  # absmax 1: s exact
    w = torch.from_numpy(np.pad(blocks, ((0, 0), (0, 30))).reshape(-1))
    packed, state = nf4kern.quantize_4bit(w, blocksize=32, quant_type=quant_type)
    values = cb.codebook(quant_type)[T.unpack_codes(packed, w.numel()).numpy()].reshape(len(s), 32)[:, 1]
    worst = np.abs(s.astype(np.float64) - values).max()
    assert T.max_code_error(quant_type) - 2**-23 <= worst <= T.max_code_error(quant_type)


def test_max_nested_code_error_is_the_references_worst_case():
    dyn = cb.dynamic_map()
    mids = (dyn[:-1] + dyn[1:]) / np.float32(2)
    s = np.concatenate([np.nextafter(mids, np.float32(-2)), mids, np.nextafter(mids, np.float32(2)), [-1, 1]])
    worst = np.abs(s.astype(np.float64) - dyn[reference.dynamic_codes(s.astype(np.float64))]).max()
    assert T.max_nested_code_error() - 2**-23 <= worst <= T.max_nested_code_error()


def test_error_bound_rejects_nonfinite_and_mismatched_inputs():
    w = torch.randn(64)
    packed, state = nf4kern.quantize_4bit(w)
    with pytest.raises(ValueError, match="NaN or inf"):
        T.error_bound(torch.full((64,), math.nan), packed, state)
    with pytest.raises(ValueError, match="elements"):
        T.error_bound(torch.randn(63), packed, state)


# ---- edge cases these properties found in the core ---------------------------------------------


def test_double_quant_of_huge_finite_weights_is_refused():
    w = torch.full((64,), 2e38)  # finite; the float32 sum of the two block absmax is not
    with pytest.raises(ValueError, match="double_quant=False"):
        nf4kern.quantize_4bit(w, 32, double_quant=True)
    packed, state = nf4kern.quantize_4bit(w, 32)
    assert bool(torch.isfinite(nf4kern.dequantize_4bit(packed, state)).all())


def test_backends_agree_on_a_subnormal_nested_absmax():
    w = torch.zeros(64)
    w[0] = 4e-39  # block absmax [4e-39, 0]: offset 2e-39 and nested absmax 2e-39 < 2**-128
    fast = nf4kern.quantize_4bit(w, 32, double_quant=True, backend="torch")[1]
    ref = nf4kern.quantize_4bit(w, 32, double_quant=True, backend="reference")[1]
    assert torch.equal(fast.absmax, ref.absmax), (fast.absmax, ref.absmax)


# ---- invariants -------------------------------------------------------------------------------


@PROPERTY
@given(quantized(), st.booleans())
def test_roundtrip_exact(q, float32_out):
    w, packed, state = q
    w_hat = nf4kern.dequantize_4bit(packed, state, dtype=torch.float32 if float32_out else None)
    assume(T.roundtrip_exact_applies(w_hat, packed, state))
    T.assert_roundtrip_exact(w_hat, packed, state)


def test_roundtrip_exact_catches_a_non_fixed_point(rng):
    w = torch.randn(8, 64, generator=rng)
    packed, state = nf4kern.quantize_4bit(w)
    with pytest.raises(AssertionError, match="changed element"):
        T.assert_roundtrip_exact(w, packed, state)  # w itself: same codes, other values
    w_hat = nf4kern.dequantize_4bit(packed, state)
    a0 = state.absmax[0]
    w_hat[0, 1] = a0 if w_hat[0, 1].abs() < a0 / 2 else 0.0  # another code's value
    with pytest.raises(AssertionError, match="packed codes"):
        T.assert_roundtrip_exact(w_hat, packed, state)


def test_roundtrip_exact_states_its_preconditions():
    w = torch.full((64,), 1e-39)  # a block below the tiny-absmax threshold
    packed, state = nf4kern.quantize_4bit(w, quant_type="fp4")
    w_hat = nf4kern.dequantize_4bit(packed, state)
    assert not T.roundtrip_exact_applies(w_hat, packed, state)
    with pytest.raises(ValueError, match="does not apply"):
        T.assert_roundtrip_exact(w_hat, packed, state)


@PROPERTY
@given(quantized())
def test_codes_monotone(q):
    T.assert_monotone_codes(*q)


@pytest.mark.parametrize("quant_type", cb.QUANT_TYPES)
def test_monotone_check_catches_swapped_codes(quant_type):
    w = torch.linspace(-1, 1, 64)
    packed, state = nf4kern.quantize_4bit(w, quant_type=quant_type)
    packed = packed.clone()
    packed[0] = 0x3B if quant_type == "fp4" else 0xF0  # element 0 (w = -1) -> +1, element 1 -> -1
    with pytest.raises(AssertionError, match="not monotone"):
        T.assert_monotone_codes(w, packed, state)


@PROPERTY
@given(st.data())
def test_scale_equivariance(data):
    blocksize = data.draw(T.blocksizes())
    dq = data.draw(st.booleans())
    w = data.draw(T.weights(blocksize=blocksize, max_numel=2048))
    exponent = data.draw(st.integers(-12, 12))
    assume(T.scale_equivariance_applies(w, exponent, blocksize, dq))
    T.assert_scale_equivariance(w, exponent, blocksize=blocksize, quant_type=data.draw(T.quant_types()), double_quant=dq)


def test_scale_equivariance_catches_a_biased_quantizer(rng):
    w = torch.randn(4, 64, generator=rng)
    biased = lambda A, **kw: nf4kern.quantize_4bit(A + 0.05, **kw)  # noqa: E731
    with pytest.raises(AssertionError, match="scaling w by 2"):
        T.assert_scale_equivariance(w, 3, quantize=biased)
    with pytest.raises(ValueError, match="not exact"):
        T.assert_scale_equivariance(w.half(), 20)  # overflows float16


# ---- SQNR ----------------------------------------------------------------------------------------


@FEW
@given(quantized(kind="normal", shape=(16, 64), moderate=True))
def test_sqnr_is_at_least_what_the_bound_allows(q):
    w, packed, state = q
    w_hat = nf4kern.dequantize_4bit(packed, state)
    bound = T.error_bound(w, packed, state)
    floor = 10 * math.log10(w.double().square().sum().item() / bound.square().sum().item())
    assert T.sqnr_db(w, w_hat) >= floor
    assert T.sqnr_db(w * 4, w_hat * 4) == pytest.approx(T.sqnr_db(w, w_hat), abs=1e-9)


@FEW
@given(T.weights(shape=(4096,), dtype=torch.float32, kind="normal", log2_scale=0))
def test_nf4_beats_fp4_on_normal_data(w):
    sqnr = {}
    for qt in cb.QUANT_TYPES:
        packed, state = nf4kern.quantize_4bit(w, 64, qt)
        sqnr[qt] = T.sqnr_db(w, nf4kern.dequantize_4bit(packed, state))
    assert sqnr["nf4"] > sqnr["fp4"] + 1.0, sqnr
    assert 19 < sqnr["nf4"] < 23, sqnr  # 4 bits at blocksize 64: ~20.7 dB


def test_sqnr_special_cases():
    w = torch.tensor([1.0, -2.0, 3.0])
    assert T.sqnr_db(w, w) == math.inf
    assert T.sqnr_db(w, torch.zeros(3)) == 0.0
    assert T.sqnr_db(w, -w) == pytest.approx(-10 * math.log10(4))
    assert T.sqnr_db(torch.zeros(3), w) == -math.inf


# ---- the strategies themselves ---------------------------------------------------------------------


@PROPERTY
@given(T.shapes(max_numel=500))
def test_shapes_in_range(shape):
    assert 1 <= len(shape) <= 3 and 1 <= math.prod(shape) <= 500


@PROPERTY
@given(st.data())
def test_weights_follow_their_arguments(data):
    shape = data.draw(T.shapes(max_numel=1000))
    dtype = data.draw(T.float_dtypes())
    kind = data.draw(st.sampled_from(T.KINDS))
    blocksize = data.draw(st.sampled_from((32, 64)))
    log2_scale = data.draw(st.integers(-10, 10))  # extreme scales may flush everything to 0
    w = data.draw(T.weights(shape=shape, dtype=dtype, kind=kind, blocksize=blocksize, log2_scale=log2_scale))
    assert w.shape == shape and w.dtype == dtype and bool(torch.isfinite(w).all())
    nblocks = -(-w.numel() // blocksize)
    blocks = torch.nn.functional.pad(w.reshape(-1).float(), (0, nblocks * blocksize - w.numel())).view(nblocks, -1)
    sizes = torch.full((nblocks,), blocksize)
    sizes[-1] = w.numel() - (nblocks - 1) * blocksize
    zero = (blocks == 0).all(dim=1)
    constant = (blocks[:, :1] == blocks).sum(dim=1) >= sizes  # padding 0 counts only for zero blocks
    if kind in ("constant_blocks", "mixed") and nblocks >= (2 if kind == "constant_blocks" else 5):
        assert bool(zero.any()) and bool((constant & ~zero).any())


def test_importing_without_hypothesis_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    monkeypatch.delitem(sys.modules, "nf4kern.testing")
    with pytest.raises(ImportError, match="hypothesis"):
        importlib.import_module("nf4kern.testing")


# ---- the docs' example runs ---------------------------------------------------------------------


def test_docs_testing_example_runs(tmp_path):
    text = (DOCS / "testing.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
    assert "def test_" in code
    path = tmp_path / "docs_testing_example.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("docs_testing_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [fn for name, fn in vars(module).items() if name.startswith("test_") and callable(fn)]
    assert len(tests) >= 3
    for fn in tests:
        fn()
