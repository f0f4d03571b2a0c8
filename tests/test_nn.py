"""nf4kern.nn: Params4bit, Linear4bit, LinearNF4 against the float64 reference and against
bitsandbytes' Linear4bit (state dicts both ways), and bitsandbytes' module behaviour without its
defects (moves, copies, pickling, dtype casts, bias dtype, chunk/split, rebuilds)."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import nf4kern
from nf4kern import reference
from nf4kern.nn import Linear4bit, LinearFP4, LinearNF4, Params4bit
from tests.conftest import DTYPES
from tests.helpers import assert_bytes_equal

bnb = pytest.importorskip("bitsandbytes")

BOUND = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _linear(N, K, rng, bias=True, dtype=torch.float32):
    linear = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=rng) * 0.05)
        if bias:
            linear.bias.copy_(torch.randn(N, generator=rng) * 0.1)
    return linear.to(dtype)


def _rms_ratio(out, ref):
    return float((out.detach().double() - ref).norm() / ref.norm())


def _bnb_layer(linear, double_quant=True):
    """bitsandbytes' NF4 Linear4bit holding linear's weight (in linear's dtype, as transformers
    builds it), quantized on the CPU."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, quant_type="nf4", compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4", module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone())
    return layer.to("cpu")


# -- numerics -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,K,quant_type", [(33, 65, "nf4"), (17, 200, "nf4"), (40, 96, "fp4"), (1, 3, "nf4")])
def test_forward_matches_reference(dtype, compute_dtype, bias, N, K, quant_type, rng):
    layer = Linear4bit.from_linear(_linear(N, K, rng, bias), quant_type=quant_type, compute_dtype=compute_dtype)
    for shape in [(3, K), (2, 5, K)]:
        x = (torch.randn(shape, generator=rng)).to(dtype)
        y = layer(x)
        compute = compute_dtype or dtype
        ref = reference.matmul(x.to(compute).reshape(-1, K), layer.weight.data, layer.weight.quant_state, layer.bias)
        assert y.dtype == dtype and y.shape == (*shape[:-1], N)
        assert _rms_ratio(y.reshape(-1, N), ref) < max(BOUND[dtype], BOUND[compute])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compute_dtype", [None, torch.float32])
def test_backward_matches_reference(dtype, compute_dtype, rng):
    N, K = 33, 130
    layer = LinearNF4.from_linear(_linear(N, K, rng), compute_dtype=compute_dtype)
    layer.bias.data = layer.bias.data.to(dtype)
    x = torch.randn(4, 3, K, generator=rng).to(dtype).requires_grad_()
    y = layer(x)
    dy = torch.randn(y.shape, generator=rng).to(dtype)
    y.backward(dy)
    state = layer.weight.quant_state
    ref_dx = reference.matmul_dx(dy.to(compute_dtype or dtype).reshape(-1, N), layer.weight.data, state)
    bound = max(BOUND[dtype], BOUND[compute_dtype or dtype])
    assert x.grad.dtype == dtype and _rms_ratio(x.grad.reshape(-1, K), ref_dx) < bound
    ref_db = dy.double().reshape(-1, N).sum(0)
    assert layer.bias.grad.dtype == dtype and _rms_ratio(layer.bias.grad, ref_db) < bound
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_from_linear_quantizes_like_quantize_4bit(rng):
    for dtype in DTYPES:
        linear = _linear(24, 72, rng, dtype=dtype)
        for blocksize, double_quant in [(32, False), (64, True), (256, True)]:
            layer = LinearNF4.from_linear(linear, blocksize, double_quant)
            packed, state = nf4kern.quantize_4bit(linear.weight, blocksize, "nf4", double_quant)
            assert_bytes_equal(layer.weight.data, packed)
            assert layer.weight.quant_state == state and layer.quant_state is layer.weight.quant_state
            assert layer.weight.blocksize == blocksize and layer.weight.compress_statistics == double_quant
            assert state.dtype == dtype and layer.bias.dtype == dtype and layer.bias is not linear.bias
    assert LinearFP4.from_linear(_linear(8, 64, rng)).weight.quant_type == "fp4"
    assert Linear4bit.from_linear(_linear(8, 64, rng)).weight.quant_type == "nf4"
    with pytest.raises(TypeError, match="nn.Linear"):
        LinearNF4.from_linear(nn.Conv1d(4, 4, 1))


# -- state dicts and bitsandbytes ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("N,K,bias", [(48, 96, True), (33, 65, False)])
def test_state_dict_equals_bitsandbytes(dtype, double_quant, N, K, bias, rng):
    linear = _linear(N, K, rng, bias, dtype)
    ours = LinearNF4.from_linear(linear, double_quant=double_quant).state_dict()
    theirs = _bnb_layer(linear, double_quant).state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        if key == "weight.absmax" and double_quant:
            # bitsandbytes' CPU nested quantizer picks ~0.1% of codes one step off the nearest.
            step = (ours[key].int() - value.int()).abs()
            assert step.max() <= 1 and (step > 0).float().mean() < 0.02
        else:
            assert_bytes_equal(ours[key], value, key)


@pytest.mark.parametrize("double_quant", [True, False])
def test_load_bitsandbytes_state_dict(double_quant, rng):
    linear = _linear(40, 128, rng)
    theirs = _bnb_layer(linear, double_quant)
    ours = LinearNF4(128, 40, compress_statistics=not double_quant)  # the checkpoint decides
    assert str(ours.load_state_dict(theirs.state_dict(), strict=True)) == "<All keys matched successfully>"
    assert ours.weight.bnb_quantized and ours.weight.compress_statistics == double_quant
    assert ours.quant_state is ours.weight.quant_state and ours.weight.module is ours
    assert_bytes_equal(ours.weight.data, theirs.weight.data)
    assert_bytes_equal(nf4kern.dequantize_4bit(ours.weight.data, ours.weight.quant_state),
                       bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state))
    x = torch.randn(5, 128, generator=rng)
    with torch.no_grad():
        assert _rms_ratio(ours(x), theirs(x).double()) < 1e-6
    # and the other way: bitsandbytes reads our state dict through from_prequantized
    sd = ours.state_dict()
    param = bnb.nn.Params4bit.from_prequantized(sd["weight"], {k: v for k, v in sd.items() if k.startswith("weight.")}, device="cpu")
    assert_bytes_equal(bnb.functional.dequantize_4bit(param.data, param.quant_state),
                       nf4kern.dequantize_4bit(ours.weight.data, ours.weight.quant_state))


def test_state_dict_round_trip_and_meta_skeleton(rng):
    layer = LinearNF4.from_linear(_linear(24, 64, rng, dtype=torch.bfloat16), quant_storage=torch.bfloat16)
    sd = layer.state_dict()
    assert sd["weight"].dtype == torch.bfloat16 and sd["weight"].shape == (24 * 64 // 4, 1)
    for fresh in (LinearNF4(64, 24), LinearNF4(64, 24, device="meta")):
        fresh.load_state_dict(sd, assign=True)
        assert fresh.weight.device.type == "cpu" and fresh.quant_storage == torch.bfloat16
        assert_bytes_equal(fresh.weight.data, layer.weight.data)
        x = torch.randn(3, 64, generator=rng).bfloat16()
        assert torch.equal(fresh(x), layer(x))
    # a float checkpoint loaded into a quantized layer is quantized with the layer's settings
    linear = _linear(24, 64, rng)
    layer.load_state_dict(linear.state_dict())
    assert_bytes_equal(layer.weight.data, nf4kern.quantize_4bit(linear.weight, 64, "nf4", True, torch.bfloat16)[0])


def test_corrupt_state_dict_errors(rng):
    sd = LinearNF4.from_linear(_linear(48, 64, rng)).state_dict()

    def load(change, layer=None):
        bad = dict(sd)
        change(bad)
        (layer or LinearNF4(64, 48)).load_state_dict(bad)

    with pytest.raises(RuntimeError, match=r"weight: quantization state is missing 'absmax'"):
        load(lambda d: d.pop("weight.absmax"))
    with pytest.raises(RuntimeError, match=r"weight: .*nested entries but is missing 'nested_absmax'"):
        load(lambda d: d.pop("weight.nested_absmax"))
    with pytest.raises(RuntimeError, match=r"weight: .*neither a 'quant_state.bitsandbytes__<type>' entry"):
        load(lambda d: d.pop("weight.quant_state.bitsandbytes__nf4"))
    with pytest.raises(RuntimeError, match=r"weight: absmax must be a torch.uint8 tensor of shape \(48,\).*got torch.uint8 tensor of shape \(47,\)"):
        load(lambda d: d.update({"weight.absmax": d["weight.absmax"][:-1]}))
    with pytest.raises(RuntimeError, match=r"weight: packed data holds 1534 bytes but .* 3072 elements \(1536 bytes\)"):
        load(lambda d: d.update({"weight": d["weight"][:-2]}))
    with pytest.raises(RuntimeError, match=r"weight: state dict entry 'quant_map' does not hold the expected"):
        load(lambda d: d.update({"weight.quant_map": d["weight.quant_map"] * 2}))
    with pytest.raises(RuntimeError, match=r"not valid JSON"):
        load(lambda d: d.update({"weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 34], dtype=torch.uint8)}))
    with pytest.raises(RuntimeError, match=r"weight: quantized weight has shape \(48, 64\), the layer needs \(40, 64\)"):
        LinearNF4(64, 40).load_state_dict(sd)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"bias\""):
        load(lambda d: d.pop("bias"))
    with pytest.raises(RuntimeError, match=r"size mismatch for weight"):
        load(lambda d: [d.pop(k) for k in list(d) if k.startswith("weight.")])
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: expected a quantized weight with its quantization state"):
        LinearNF4(64, 48).to("cpu").load_state_dict({"weight": torch.zeros(7, 7), "bias": sd["bias"]})
    # nothing was half-loaded into the layer that failed
    layer = LinearNF4(64, 48)
    with pytest.raises(RuntimeError):
        load(lambda d: d.pop("weight.absmax"), layer)
    assert not layer.weight.bnb_quantized and layer.weight.shape == (48, 64)


# -- moves, copies, pickling ----------------------------------------------------------------------


def test_to_cpu_moves_without_requantizing(rng):
    layer = LinearNF4.from_linear(_linear(32, 64, rng))
    weight, state, ptr = layer.weight, layer.weight.quant_state, layer.weight.data_ptr()
    before = layer.weight.data.clone()
    for move in (lambda m: m.to("cpu"), lambda m: m.cpu(), lambda m: m.to(torch.device("cpu"), torch.float16)):
        assert move(layer) is layer
        assert layer.weight is weight and layer.weight.data_ptr() == ptr and layer.weight.quant_state is state
        assert_bytes_equal(layer.weight.data, before)
    moved = layer.weight.to("cpu")
    assert isinstance(moved, Params4bit) and moved.quant_state is state and moved.bnb_quantized
    assert moved.module is layer  # bitsandbytes drops it
    assert_bytes_equal(moved.data, before)


def test_to_meta_keeps_the_format(rng):
    """A model moved to "meta" (a skeleton for loading or sharding) keeps its 4-bit layers:
    torch rebuilds such a parameter through detach(), which keeps the type and attributes."""
    layer = LinearNF4.from_linear(_linear(32, 64, rng))
    shape, state = layer.weight.shape, layer.weight.quant_state
    detached = layer.weight.detach()
    assert type(detached) is Params4bit and not detached.requires_grad
    assert detached.quant_state is state and detached.module is layer and detached.bnb_quantized
    layer.to("meta")
    w = layer.weight
    assert type(w) is Params4bit and w.device.type == "meta" and w.shape == shape and w.dtype == torch.uint8
    assert w.bnb_quantized and w.quant_state is state and state.absmax.device.type == "meta"
    fresh = LinearNF4(64, 32).to("meta")  # not quantized yet: stays a float weight, on meta
    assert type(fresh.weight) is Params4bit and fresh.weight.device.type == "meta"
    assert not fresh.weight.bnb_quantized and fresh.weight.quant_state is None and fresh.weight.dtype == torch.float32


def _copies(layer):
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    return {
        "deepcopy": copy.deepcopy(layer),
        "pickle": pickle.loads(pickle.dumps(layer)),
        "torch.save": torch.load(buf, weights_only=False),
    }


def test_deepcopy_pickle_and_torch_save_keep_type_and_outputs(rng):
    layer = LinearNF4.from_linear(_linear(32, 96, rng), compute_dtype=torch.float32)
    x = torch.randn(4, 96, generator=rng).bfloat16()
    y = layer(x)
    for how, other in _copies(layer).items():
        assert type(other) is LinearNF4 and type(other.weight) is Params4bit, how
        w = other.weight
        assert w.bnb_quantized and w.quant_type == "nf4" and w.blocksize == 64 and w.compress_statistics, how
        assert w.module is other and other.quant_state is w.quant_state and w.quant_state == layer.weight.quant_state, how
        assert other.compute_dtype == torch.float32
        assert_bytes_equal(w.data, layer.weight.data, how)
        assert torch.equal(other(x), y), how
    shallow = copy.copy(layer.weight)
    assert type(shallow) is Params4bit and shallow.quant_state is layer.weight.quant_state
    assert shallow.data_ptr() == layer.weight.data_ptr()
    # a parameter copied on its own keeps pointing at its layer, which is not copied
    deep = copy.deepcopy(layer.weight)
    assert deep.module is layer and deep.quant_state == layer.weight.quant_state and deep.quant_state is not layer.weight.quant_state


@pytest.mark.parametrize("storage", [torch.uint8, torch.float16, torch.bfloat16, torch.float32])
def test_module_dtype_casts_leave_the_packed_bytes_alone(storage, rng):
    # bitsandbytes value-casts a float quant_storage here (Module.half() and .to(dtype)).
    layer = LinearNF4.from_linear(_linear(32, 64, rng), quant_storage=storage)
    layer.bias.data = layer.bias.data.bfloat16().float()  # survives the casts below exactly
    before = layer.weight.data.clone()
    x = torch.randn(3, 64, generator=rng)
    y = layer(x)
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float(), lambda m: m.bfloat16(), lambda m: m.double(), lambda m: m.to(torch.float32)):
        cast(layer)
        assert type(layer.weight) is Params4bit and layer.weight.dtype == storage
        assert layer.weight.quant_state is layer.quant_state
        assert_bytes_equal(layer.weight.data, before)
    assert layer.bias.dtype == torch.float32  # the bias follows the casts, as in any module
    assert torch.equal(layer(x), y)


def test_unquantized_weight_still_casts(rng):
    layer = LinearNF4(64, 32)
    w = layer.weight.detach().clone()
    layer.half()
    assert type(layer.weight) is Params4bit and layer.weight.dtype == torch.float16 and not layer.weight.bnb_quantized
    layer.to("cpu")
    assert layer.weight.quant_state.dtype == torch.float16
    assert_bytes_equal(layer.weight.data, nf4kern.quantize_4bit(w.half(), 64, "nf4", True)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_does_not_recast_the_bias(dtype, rng):
    # bitsandbytes permanently recasts bias.data to the input dtype in forward.
    for compute_dtype in (None, torch.float32):
        layer = LinearNF4.from_linear(_linear(16, 64, rng), compute_dtype=compute_dtype)
        bias = layer.bias.data.clone()
        y = layer(torch.randn(2, 64, generator=rng).to(dtype))
        assert y.dtype == dtype and layer.bias.dtype == torch.float32 and torch.equal(layer.bias.data, bias)


# -- bitsandbytes' Params4bit protocol -----------------------------------------------------------


def test_chunk_and_split_keep_params4bit(rng):
    layer = LinearNF4.from_linear(_linear(32, 64, rng))
    w = layer.weight
    for pieces in (torch.chunk(w, 2), w.chunk(4), torch.split(w, 300), w.split([1000, 24])):
        assert all(type(p) is Params4bit for p in pieces)
        assert all(p.quant_state is w.quant_state and p.module is layer and p.bnb_quantized for p in pieces)
        assert_bytes_equal(torch.cat([p.data for p in pieces]), w.data)
    assert type(w.t()) is torch.Tensor  # other ops return plain tensors, as in bitsandbytes


def test_rebuild_from_dict(rng):
    layer = LinearNF4.from_linear(_linear(32, 64, rng), blocksize=128, quant_storage=torch.float16)
    old = layer.weight
    # transformers / accelerate: Params4bit(t, **old.__dict__) keeps every attribute
    rebuilt = Params4bit(old.data, requires_grad=False, **old.__dict__)
    for attr in ("blocksize", "compress_statistics", "quant_type", "quant_state", "quant_storage", "bnb_quantized", "module"):
        assert getattr(rebuilt, attr) is getattr(old, attr) or getattr(rebuilt, attr) == getattr(old, attr), attr
    assert rebuilt.to("cpu").data_ptr() == old.data_ptr()
    # peft's merge: new float data, bnb_quantized=False, then .to(device) quantizes it with the
    # same settings and updates the module's quant_state
    kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_")}
    kwargs.update(bnb_quantized=False, requires_grad=False)
    merged = torch.randn(32, 64, generator=rng) * 0.05
    new = Params4bit(merged, **kwargs).to("cpu")
    packed, state = nf4kern.quantize_4bit(merged, 128, "nf4", True, torch.float16)
    assert new.bnb_quantized and new.quant_state == state and layer.quant_state is new.quant_state
    assert_bytes_equal(new.data, packed)
    layer.weight = new
    x = torch.randn(2, 64, generator=rng)
    assert _rms_ratio(layer(x), reference.matmul(x, packed, state, layer.bias)) < 1e-6


def test_quantize_on_first_move(rng):
    torch.manual_seed(0)
    layer = LinearNF4(64, 24, compute_dtype=torch.float32, compress_statistics=False)
    w = layer.weight.detach().clone()
    assert layer.quant_state is None and layer.weight.shape == (24, 64) and not layer.weight.bnb_quantized
    assert "not quantized yet" in repr(layer)
    with pytest.raises(RuntimeError, match=r"LinearNF4 weight is not quantized yet: move the layer to a device"):
        layer(torch.randn(2, 64))
    assert layer.to("cpu") is layer
    assert layer.weight.shape == (24 * 64 // 2, 1)
    packed, state = nf4kern.quantize_4bit(w, 64, "nf4", False)
    assert layer.weight.bnb_quantized and layer.quant_state is layer.weight.quant_state and layer.quant_state == state
    assert_bytes_equal(layer.weight.data, packed)
    data = layer.weight.data
    layer.to("cpu")  # a second move never re-quantizes
    assert layer.weight.data is data or layer.weight.data_ptr() == data.data_ptr()
    # a bare Params4bit quantizes itself on .to(device) and returns itself
    p = Params4bit(w, quant_type="fp4", blocksize=32)
    assert p.to("cpu") is p and p.bnb_quantized and p.quant_state == nf4kern.quantize_4bit(w, 32, "fp4", True)[1]
    assert Params4bit().shape == (0,) and Params4bit(w).quant_type == "fp4"  # bitsandbytes' defaults


def test_repr_names_the_format(rng):
    text = repr(LinearNF4.from_linear(_linear(8, 64, rng, bias=False), blocksize=128, double_quant=False))
    for part in ("in_features=64", "out_features=8", "bias=False", "quant_type=nf4", "blocksize=128", "double_quant=False", "quantized"):
        assert part in text
    assert "quant_type=fp4" in repr(LinearFP4(64, 8))


def test_plain_parameter_swapped_in_keeps_working(rng):
    # FSDP may replace the weight by a plain tensor: the layer's own quant_state is used.
    layer = LinearNF4.from_linear(_linear(16, 64, rng))
    x = torch.randn(2, 64, generator=rng)
    y = layer(x)
    layer.weight = nn.Parameter(layer.weight.data.clone(), requires_grad=False)
    assert torch.equal(layer(x), y)


def test_nothing_activation_sized_is_saved_for_backward(rng):
    layer = LinearNF4.from_linear(_linear(40, 128, rng))
    x = torch.randn(97, 128, generator=rng, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved, "the hook must see what autograd keeps"
    assert all(97 not in t.shape for t in saved), [tuple(t.shape) for t in saved]
    assert sum(t.numel() * t.element_size() for t in saved) < 128 * 40  # ~the packed weight + scales
    y.sum().backward()
    assert x.grad.shape == x.shape
