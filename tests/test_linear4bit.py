"""Linear4bit / LinearNF4 / Params4bit: bitsandbytes' behaviour, without its defects."""
import copy
import io

import pytest
import torch

import nf4kern
from nf4kern import reference
from nf4kern.nn import Linear4bit, LinearNF4, Params4bit
from tests.helpers import assert_bytes_equal

bnb = pytest.importorskip("bitsandbytes")


def _pair(rng, bias=True):
    linear = torch.nn.Linear(128, 40, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 128, generator=rng) * 0.05)
    return linear, LinearNF4.from_linear(linear, blocksize=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_grads_against_reference(dtype, rng):
    linear, layer = _pair(rng)
    x = torch.randn(3, 5, 128, generator=rng).to(dtype).requires_grad_()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    state = layer.weight.quant_state
    ref = reference.matmul(x.reshape(-1, 128), layer.weight.data, state, layer.bias)
    bound = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert y.dtype == dtype and float((y.detach().reshape(-1, 40).double() - ref).norm() / ref.norm()) < bound
    ref_dx = reference.matmul_dx(dy.reshape(-1, 40), layer.weight.data, state)
    assert float((x.grad.reshape(-1, 128).double() - ref_dx).norm() / ref_dx.norm()) < bound
    assert layer.weight.grad is None and layer.bias.grad is not None


def test_state_dict_equals_bitsandbytes_and_loads_both_ways(rng):
    linear, layer = _pair(rng)
    theirs = bnb.nn.Linear4bit(128, 40, quant_type="nf4", compress_statistics=True)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")
    ours_sd, theirs_sd = layer.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for key in ours_sd:
        assert ours_sd[key].dtype == theirs_sd[key].dtype and ours_sd[key].shape == theirs_sd[key].shape, key
    assert_bytes_equal(ours_sd["weight"], theirs_sd["weight"])
    # bitsandbytes' own Linear4bit cannot load_state_dict its keys (its issue 1946); ours can.
    fresh = LinearNF4(128, 40)
    fresh.load_state_dict(theirs_sd)
    x = torch.randn(4, 128, generator=rng)
    back = nf4kern.QuantState.from_dict({k[len("weight."):]: v for k, v in theirs_sd.items() if k.startswith("weight.")})
    assert fresh.weight.quant_state == back
    assert torch.equal(fresh(x), nf4kern.nf4_linear(x, theirs_sd["weight"], theirs_sd["bias"], back))


def test_load_state_dict_errors(rng):
    _, layer = _pair(rng)
    sd = layer.state_dict()
    sd["weight.absmax"] = sd["weight.absmax"][:3]
    with pytest.raises(RuntimeError, match="absmax must be"):
        LinearNF4(128, 40).load_state_dict(sd)
    sd = layer.state_dict()
    sd["weight"] = torch.zeros(7, 7)
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(RuntimeError):
        LinearNF4(128, 40).to("cpu").load_state_dict(sd)


def test_moves_copies_and_pickling_keep_the_bytes(rng):
    _, layer = _pair(rng)
    x = torch.randn(2, 128, generator=rng)
    y = layer(x)
    before = layer.weight.data.clone()
    moved = layer.to("cpu")
    assert isinstance(moved.weight, Params4bit) and torch.equal(moved.weight.data, before)
    clone = copy.deepcopy(layer)
    assert clone.weight.module is clone and clone.quant_state is clone.weight.quant_state
    assert torch.equal(clone(x), y)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.weight) is Params4bit and torch.equal(loaded(x), y)


def test_dtype_casts_never_touch_packed_bytes(rng):
    linear = torch.nn.Linear(128, 40)
    layer = Linear4bit.from_linear(linear, quant_storage=torch.bfloat16)
    before = layer.weight.data.clone()
    w_hat = nf4kern.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    for cast in (lambda m: m.half(), lambda m: m.float(), lambda m: m.to(torch.float16), lambda m: m.bfloat16()):
        cast(layer)
        assert layer.weight.dtype == torch.bfloat16
        assert_bytes_equal(layer.weight.data, before)
    assert torch.equal(nf4kern.dequantize_4bit(layer.weight.data, layer.weight.quant_state), w_hat)


def test_forward_leaves_bias_dtype_alone(rng):
    _, layer = _pair(rng)
    layer(torch.randn(2, 128, generator=rng).to(torch.bfloat16))
    assert layer.bias.dtype == torch.float32


def test_quantize_on_first_move_and_rebuild(rng):
    layer = LinearNF4(64, 16)
    with pytest.raises(RuntimeError, match="not quantized yet"):
        layer(torch.randn(1, 64))
    layer = layer.to("cpu")
    assert layer.weight.bnb_quantized and layer.weight.shape == (64 * 16 // 2, 1)
    rebuilt = Params4bit(layer.weight.data, **{k: v for k, v in layer.weight.__dict__.items()})
    assert rebuilt.quant_state is layer.weight.quant_state
    pieces = torch.chunk(layer.weight, 2)
    assert all(type(p) is Params4bit and p.quant_state is layer.weight.quant_state for p in pieces)
    assert "quant_type=nf4" in repr(layer) and "blocksize=64" in repr(layer)


def test_nothing_activation_sized_is_saved_for_backward(rng):
    _, layer = _pair(rng)
    x = torch.randn(97, 128, generator=rng, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved, "the hook must see what autograd keeps"
    assert all(97 not in t.shape for t in saved), [tuple(t.shape) for t in saved]
    assert sum(t.numel() * t.element_size() for t in saved) < 128 * 40  # ~the packed weight + scales
    y.sum().backward()
    assert x.grad.shape == x.shape
