"""Whole-model helpers: quantize a model's Linear layers, load a bitsandbytes 4-bit checkpoint."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .checkpoint import is_quant_state_key, quantized_entries
from .nn import Linear4bit, LinearNF4, Params4bit


def _output_heads(model: nn.Module) -> set[str]:
    names = {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return names | {n for n, m in model.named_modules() if head is not None and m is head}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(
    model: nn.Module,
    blocksize: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    quant_storage: torch.dtype = torch.uint8,
    skip: tuple[str, ...] | None = None,
) -> nn.Module:
    """Replace every `nn.Linear` (exactly that type) in place by a 4-bit LinearNF4 and return the
    model. The output head (lm_head / get_output_embeddings()) is skipped, as are modules whose
    full name matches a regular expression in `skip`."""
    skipped = _output_heads(model)
    patterns = [re.compile(p) for p in (skip or ())]
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name not in skipped and not any(p.fullmatch(name) for p in patterns)
    ]
    for name, linear in targets:
        _set_submodule(model, name, LinearNF4.from_linear(linear, blocksize, double_quant, quant_type, compute_dtype, quant_storage))
    return model


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.is_file():
        return load_file(str(path))
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} not found")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(str(path / shard)))
        return tensors
    single = path / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")


def load_bnb_checkpoint(model: nn.Module, path, strict: bool = True) -> nn.Module:
    """Load a checkpoint saved by transformers with bitsandbytes 4-bit (NF4/FP4, double quant or
    not) into `model` and return it. Layers holding a 4-bit weight may be nf4kern Linear4bit
    (from quantize_model) or plain nn.Linear (replaced by a Linear4bit holding the checkpoint's
    bytes); every other tensor loads as load_state_dict would load it."""
    state_dict = _read_checkpoint(Path(path))
    entries = quantized_entries(state_dict)
    for name, (packed, state) in entries.items():
        module_name = name.rsplit(".", 1)[0]
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            if strict:
                raise ValueError(f"checkpoint has a 4-bit weight {name!r} but the model has no module {module_name!r}") from None
            continue
        if type(module) is nn.Linear:
            replacement = Linear4bit.__new__(Linear4bit)
            nn.Module.__init__(replacement)
            replacement.in_features, replacement.out_features = module.in_features, module.out_features
            replacement.compute_dtype, replacement.compute_type_is_set = None, False
            replacement.quant_storage, replacement.quant_state = packed.dtype, None
            replacement.weight = Params4bit(module.weight.detach(), False, quant_type=state.quant_type, module=replacement)
            replacement.register_parameter("bias", module.bias)
            _set_submodule(model, module_name, replacement)
            module = replacement
        if not isinstance(module, Linear4bit):
            raise ValueError(f"{module_name} is a {type(module).__name__}; a 4-bit weight needs an nn.Linear or a Linear4bit")
        if tuple(state.shape) != (module.out_features, module.in_features):
            raise ValueError(f"{name}: checkpoint shape {tuple(state.shape)} does not fit {module_name} ({module.out_features}, {module.in_features})")
        quant = {k: v for k, v in state_dict.items() if k.startswith(name + ".") and is_quant_state_key(k)}
        module.weight = Params4bit.from_prequantized(packed, quant, device=packed.device, module=module)
    rest = {k: v for k, v in state_dict.items() if not is_quant_state_key(k) and k not in entries}
    own = model.state_dict()
    expected = {k for k in own if not is_quant_state_key(k) and k not in entries}
    missing, unexpected = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    with torch.no_grad():
        for key in set(rest) & expected:
            target = own[key]
            if target.shape != rest[key].shape:
                raise ValueError(f"{key}: checkpoint shape {tuple(rest[key].shape)} does not fit {tuple(target.shape)}")
            target.copy_(rest[key])
    return model
