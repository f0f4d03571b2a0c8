"""Bad input gets a clear error that names the argument; user tensors are never modified."""
import json

import pytest
import torch

import nf4kern
from nf4kern import dispatch
from tests.helpers import assert_bytes_equal, randn


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float64, torch.bool])
def test_wrong_dtype(dtype):
    with pytest.raises(ValueError, match="A must be float32, float16 or bfloat16"):
        nf4kern.quantize_4bit(torch.zeros(64, dtype=dtype))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        nf4kern.quantize_4bit([1.0, 2.0])


def test_empty_and_meta():
    with pytest.raises(ValueError, match="A is empty"):
        nf4kern.quantize_4bit(torch.zeros(0, 64))
    with pytest.raises(ValueError, match="meta tensor"):
        nf4kern.quantize_4bit(torch.zeros(64, 64, device="meta"))


@pytest.mark.parametrize("blocksize", [16, 100, 8192, 64.0, None])
def test_invalid_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        nf4kern.quantize_4bit(torch.zeros(64), blocksize)


def test_invalid_quant_type():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        nf4kern.quantize_4bit(torch.zeros(64), 64, "int4")


def test_invalid_quant_storage():
    with pytest.raises(ValueError, match="quant_storage must be one of"):
        nf4kern.quantize_4bit(torch.zeros(64), quant_storage=torch.int8)
    with pytest.raises(ValueError, match="multiple of 2"):
        nf4kern.quantize_4bit(torch.zeros(5, 13), quant_storage=torch.bfloat16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_reports_count_and_first_index(bad, rng):
    x = randn((5, 70), torch.bfloat16, rng)
    x[2, 17] = bad
    x[4, 69] = bad
    before = x.clone()
    with pytest.raises(ValueError, match=r"A has 2 non-finite value\(s\).*first is A\[2, 17\].*allow_nonfinite"):
        nf4kern.quantize_4bit(x, 64, double_quant=True)
    assert_bytes_equal(x, before, "input")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_never_modified(dtype, rng):
    x = randn((9, 130), dtype, rng)
    before = x.clone()
    packed, state = nf4kern.quantize_4bit(x, 64, double_quant=True)
    state_before = {k: v.clone() for k, v in state.as_dict(packed=True).items()}
    nf4kern.dequantize_4bit(packed, state)
    assert_bytes_equal(x, before, "input")
    for k, v in state.as_dict(packed=True).items():
        assert_bytes_equal(v, state_before[k], k)


def test_state_that_does_not_match_the_data(rng):
    packed, state = nf4kern.quantize_4bit(randn((8, 64), torch.float32, rng))
    other, _ = nf4kern.quantize_4bit(randn((8, 32), torch.float32, rng))
    with pytest.raises(ValueError, match="packed data holds 128 bytes but the quantization state describes 512"):
        nf4kern.dequantize_4bit(other, state)
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match=r"absmax must be a torch.float32 tensor of shape \(8,\)"):
        nf4kern.dequantize_4bit(packed, state)
    with pytest.raises(TypeError, match="quant_state must be a QuantState"):
        nf4kern.dequantize_4bit(packed, {"absmax": state.absmax})


def test_dequantize_rejects_bad_output_dtype(rng):
    packed, state = nf4kern.quantize_4bit(randn((4, 64), torch.float32, rng))
    with pytest.raises(ValueError, match="dtype must be one of"):
        nf4kern.dequantize_4bit(packed, state, dtype=torch.int8)


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
@pytest.mark.parametrize("backend", [None, "torch", "reference", "triton"])
def test_backends_run_on_cpu_and_cuda_only(device, backend):
    # Any other device used to reach the torch path (which returns garbage for meta).
    with pytest.raises(ValueError, match=f"cpu and cuda tensors only; got a tensor on {device}"):
        dispatch.select(torch.device(device), backend)


def _quantized(rng, double_quant=True):
    """Packed data and a state of their own, so a test may replace the state's tensors."""
    return nf4kern.quantize_4bit(randn((8, 64), torch.float32, rng), 64, double_quant=double_quant)


def test_dequantize_rejects_meta_packed(rng):
    packed, state = _quantized(rng)
    with pytest.raises(ValueError, match="packed is a meta tensor"):
        nf4kern.dequantize_4bit(packed.to("meta"), state)


@pytest.mark.parametrize("field", ["absmax", "code", "offset", "state2.absmax", "state2.code"])
def test_dequantize_rejects_state_on_another_device(field, rng):
    packed, state = _quantized(rng)
    owner, name = (state.state2, field[7:]) if field.startswith("state2.") else (state, field)
    setattr(owner, name, getattr(owner, name).to("meta"))
    with pytest.raises(ValueError, match=rf"quant_state\.{field} is on meta but packed is on cpu"):
        nf4kern.dequantize_4bit(packed, state)


@pytest.mark.parametrize(
    "offset",
    [torch.tensor(0.5, dtype=torch.float64), torch.tensor([0.5]), torch.tensor(1, dtype=torch.int32), 0.5, None],
    ids=["float64", "shape1", "int32", "float", "none"],
)
def test_nested_offset_must_be_a_0dim_float32_tensor(offset, rng):
    packed, state = _quantized(rng)
    state.offset = offset
    with pytest.raises(ValueError, match="offset must be a 0-dim torch.float32 tensor"):
        nf4kern.dequantize_4bit(packed, state)


def test_nested_state_without_state2(rng):
    packed, state = _quantized(rng)
    state.state2 = None  # `nested` stays True, as when a caller edits the state
    with pytest.raises(ValueError, match="nested .*state2 must be the QuantState of the nested absmax, got NoneType"):
        nf4kern.dequantize_4bit(packed, state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.bool])
def test_linear_bias_dtype(dtype, rng):
    packed, state = _quantized(rng)
    with pytest.raises(ValueError, match="bias must be float32, float16 or bfloat16, got"):
        nf4kern.nf4_linear(torch.randn(2, 64), packed, torch.ones(8, dtype=dtype), state)


def test_matmul_bias_device_and_type(rng):
    # nf4kern.matmul directly (through nf4_linear a meta input stops at the op's fake kernel).
    from nf4kern import matmul

    packed, state = _quantized(rng)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        matmul.nf4_matmul(x, packed, state, torch.ones(8, device="meta"))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None, got list"):
        matmul.nf4_matmul(x, packed, state, [0.0] * 8)


@pytest.mark.parametrize("where", ["bias", "weight", "absmax", "lora_A", "lora_B"])
def test_linear_ops_reject_a_meta_operand(where, rng):
    """A meta operand makes the torch.library op run its fake kernel, which must raise rather than
    hand back uninitialised memory."""
    packed, state = _quantized(rng, double_quant=False)
    x, bias = torch.randn(2, 64), torch.zeros(8)
    A, B = torch.randn(4, 64), torch.randn(8, 4)
    if where == "weight":
        packed = packed.to("meta")
    elif where == "absmax":
        state.absmax = state.absmax.to("meta")
    elif where == "bias":
        bias = bias.to("meta")
    elif where == "lora_A":
        A = A.to("meta")
    else:
        B = B.to("meta")
    with pytest.raises(ValueError, match=rf"{where} is on meta but x is on cpu"):
        nf4kern.qlora_linear(x, packed, A, B, 2.0, bias, quant_state=state)
    if where not in ("lora_A", "lora_B"):
        with pytest.raises(ValueError, match=rf"{where} is on meta but x is on cpu"):
            nf4kern.nf4_linear(x, packed, bias, state)


def test_matmul_rejects_state_on_another_device(rng):
    from nf4kern import matmul

    packed, state = _quantized(rng, double_quant=False)
    state.absmax = state.absmax.to("meta")
    with pytest.raises(ValueError, match="quant_state.absmax is on meta but weight is on cpu"):
        matmul.nf4_matmul(torch.randn(2, 64), packed, state)


def _state_dict(rng, double_quant=True):
    _, state = nf4kern.quantize_4bit(randn((16, 64), torch.bfloat16, rng), 64, double_quant=double_quant)
    return {"weight." + k: v for k, v in state.as_dict(packed=True).items()}


def test_from_dict_round_trip_packed_and_unpacked(rng):
    _, state = nf4kern.quantize_4bit(randn((16, 64), torch.bfloat16, rng), 32, "fp4", double_quant=True)
    assert nf4kern.QuantState.from_dict(state.as_dict(packed=True)) == state
    assert nf4kern.QuantState.from_dict(state.as_dict(packed=False)) == state


@pytest.mark.parametrize("missing", ["weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map"])
def test_from_dict_missing_entry(missing, rng):
    sd = _state_dict(rng)
    del sd[missing]
    with pytest.raises(ValueError, match=f"missing '{missing.split('.')[-1]}'"):
        nf4kern.QuantState.from_dict(sd)


def test_from_dict_corrupt_json(rng):
    sd = _state_dict(rng)
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not valid JSON"):
        nf4kern.QuantState.from_dict(sd)


def test_from_dict_blob_type_mismatch(rng):
    sd = _state_dict(rng)
    sd["weight.quant_state.bitsandbytes__fp4"] = sd.pop("weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="holds quant_type 'nf4'"):
        nf4kern.QuantState.from_dict(sd)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("blocksize", 100, "blocksize must be one of"),
        ("dtype", "int8", "'dtype' must name one of"),
        ("shape", [16, -64], "'shape' must be a list"),
        ("nested_offset", "x", "nested_offset must be a finite number"),
        ("nested_blocksize", 128, "nested_blocksize must be 256"),
        ("shape", [16, 65], "absmax must be"),
    ],
)
def test_from_dict_bad_json_fields(field, value, message, rng):
    sd = _state_dict(rng)
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()))
    meta[field] = value
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        nf4kern.QuantState.from_dict(sd)


def test_from_dict_unknown_key_and_wrong_tables(rng):
    sd = _state_dict(rng)
    sd["weight.scales"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected quantization state entry 'weight.scales'"):
        nf4kern.QuantState.from_dict(sd)
    sd = _state_dict(rng)
    sd["weight.quant_map"] = sd["weight.quant_map"].flip(0)
    with pytest.raises(ValueError, match="'quant_map' does not hold the expected"):
        nf4kern.QuantState.from_dict(sd)
    sd = _state_dict(rng)
    sd["weight.absmax"] = sd["weight.absmax"][:3]
    with pytest.raises(ValueError, match="absmax must be a torch.uint8 tensor of shape"):
        nf4kern.QuantState.from_dict(sd)


def test_safetensors_round_trip(tmp_path, rng):
    safetensors = pytest.importorskip("safetensors.torch")
    x = randn((33, 65), torch.float16, rng)
    packed, state = nf4kern.quantize_4bit(x, 64, double_quant=True)
    safetensors.save_file({"w": packed, **{"w." + k: v for k, v in state.as_dict(packed=True).items()}}, tmp_path / "q.safetensors")
    loaded = safetensors.load_file(tmp_path / "q.safetensors")
    state2 = nf4kern.QuantState.from_dict({k: v for k, v in loaded.items() if k != "w"})
    assert state2 == state
    assert_bytes_equal(nf4kern.dequantize_4bit(loaded["w"], state2), nf4kern.dequantize_4bit(packed, state))


def test_backend_selection(monkeypatch, rng):
    x = randn((4, 64), torch.float32, rng)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select(x.device) == "reference"
    assert nf4kern.quantize_4bit(x)[1] == nf4kern.quantize_4bit(x, backend="torch")[1]
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match="NF4KERN_BACKEND must be one of"):
        nf4kern.quantize_4bit(x)
    monkeypatch.delenv(dispatch.ENV_VAR)
    with pytest.raises(ValueError, match="backend must be one of"):
        nf4kern.quantize_4bit(x, backend="numpy")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        nf4kern.quantize_4bit(x, backend="triton")


def test_non_finite_error_carries_count_and_first_index():
    A = torch.zeros(4, 100)
    A[1, 70] = float("-inf")
    A[3, 2] = float("nan")
    with pytest.raises(nf4kern.NonFiniteError) as info:
        nf4kern.quantize_4bit(A, blocksize=64)
    assert isinstance(info.value, ValueError)
    assert (info.value.count, info.value.index, info.value.value) == (2, (1, 70), float("-inf"))
