"""quantize_model and load_bnb_checkpoint on a real transformers checkpoint saved with bitsandbytes."""
import json

import pytest
import torch
from torch import nn

import nf4kern
from nf4kern.model import load_bnb_checkpoint, quantize_model
from nf4kern.nn import Linear4bit
from tests.helpers import TINY_LLAMA, assert_bytes_equal, require_fixture

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")


def _llama_skeleton(fixture) -> nn.Module:
    config = json.loads((fixture / "config.json").read_text())
    config.pop("quantization_config")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.bfloat16)
    return model.eval()


@pytest.mark.parametrize("prequantize", [False, True])
def test_load_tiny_llama_reproduces_bitsandbytes(prequantize):
    fixture = require_fixture(TINY_LLAMA)
    torch.manual_seed(0)
    model = _llama_skeleton(fixture)
    if prequantize:
        quantize_model(model)
    load_bnb_checkpoint(model, fixture)
    reference = safetensors.load_file(str(fixture / "reference.safetensors"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 14 and "lm_head" not in layers
    for name, layer in layers.items():
        w = nf4kern.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert_bytes_equal(w, reference[f"{name}.dequantized"], name)
    with torch.no_grad():
        logits = model(reference["input_ids"]).logits.float()
    expected = reference["logits"]
    # bitsandbytes computed these logits in bf16 with its own arithmetic order.
    ratio = float((logits - expected).norm() / expected.norm())
    agreement = float((logits.argmax(-1) == expected.argmax(-1)).float().mean())
    assert ratio < 2e-2, ratio
    assert agreement > 0.95, agreement


def test_quantize_model_skips_the_head_and_matches_from_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    model.lm_head = nn.Linear(16, 8)
    original = model[0].weight.detach().clone()
    quantize_model(model, skip=(r"2",))
    assert isinstance(model[0], Linear4bit) and type(model[2]) is nn.Linear and type(model.lm_head) is nn.Linear
    packed, state = nf4kern.quantize_4bit(original, 64, "nf4", True)
    assert_bytes_equal(model[0].weight.data, packed)


def test_load_errors(tmp_path):
    fixture = require_fixture(TINY_LLAMA)
    model = _llama_skeleton(fixture)
    with pytest.raises(FileNotFoundError):
        load_bnb_checkpoint(model, tmp_path / "missing.safetensors")
    sd = safetensors.load_file(str(fixture / "model.safetensors"))
    del sd["model.norm.weight"]
    safetensors.save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="missing .*model.norm.weight"):
        load_bnb_checkpoint(_llama_skeleton(fixture), tmp_path / "partial.safetensors")
    sd = safetensors.load_file(str(fixture / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight.absmax"] = sd["model.layers.0.mlp.up_proj.weight.absmax"][:5]
    safetensors.save_file(sd, str(tmp_path / "corrupt.safetensors"))
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight: absmax must be"):
        load_bnb_checkpoint(_llama_skeleton(fixture), tmp_path / "corrupt.safetensors")
