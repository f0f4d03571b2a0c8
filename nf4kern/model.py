"""Whole models: quantize every Linear layer in place, or load a checkpoint saved by
transformers + bitsandbytes in 4 bits.

    quantize_model(model, ...)         nn.Linear -> LinearNF4/LinearFP4, in place (not the head)
    load_bnb_checkpoint(model, path)   a bitsandbytes 4-bit safetensors checkpoint into a model

Neither needs transformers: the model is any nn.Module; `get_output_embeddings()` is used when
the model has it. Layers are swapped by setting the parent module's attribute, so forward hooks
registered on a replaced nn.Linear do not carry over to its replacement.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from . import codebook as cb
from .checkpoint import is_quant_state_key, quantized_entries
from .functional import STORAGE_DTYPES
from .nn import Linear4bit, LinearFP4, LinearNF4, Params4bit

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_CLASSES = {"nf4": LinearNF4, "fp4": LinearFP4}


# -- quantize_model -----------------------------------------------------------------------------


@dataclass
class QuantizeSummary:
    """What quantize_model did: module names quantized, and skipped Linear layers with the reason."""

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0  # weight bytes of the quantized layers, before and after
    bytes_after: int = 0

    def __str__(self) -> str:
        text = f"quantized {len(self.quantized)} Linear layer(s): weights {self.bytes_before:,} -> {self.bytes_after:,} bytes"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} ({why})" for n, why in self.skipped.items())
        return text


def quantize_model(
    model: nn.Module,
    blocksize: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    quant_storage: torch.dtype = torch.uint8,
    skip: Iterable[str] = ("lm_head",),
    include: Iterable[str] | None = None,
    *,
    return_summary: bool = False,
):
    """Replace, in place, every submodule whose type is exactly nn.Linear by a 4-bit
    LinearNF4 (quant_type="nf4") or LinearFP4 ("fp4") quantized from it on its own device, and
    return the model (or `(model, QuantizeSummary)` with return_summary=True). The summary is
    also logged (logger "nf4kern.model", INFO).

    Names in `skip` and `include` match a module's full name or a dotted suffix of it ("lm_head"
    matches "lm_head" and "model.lm_head"; "mlp.down_proj" matches "layers.0.mlp.down_proj").
    Left as they are:
      * modules matching `skip` (default: lm_head), and the module returned by
        `model.get_output_embeddings()` when the model has that method;
      * in a transformers model with a task head on a base model, the head (the module holding
        the last parameter: a classifier, a score layer), and the modules the model lists in
        `_keep_in_fp32_modules`: transformers' load_in_4bit leaves them unquantized too;
      * with `include` given, every module matching none of its names;
      * a Linear whose weight is tied (the same Parameter) to another module's parameter, as an
        output head tied to the input embedding usually is: quantizing it would untie them;
      * subclasses of nn.Linear (Linear4bit included: already quantized, or custom layers).
    A Linear shared under several names is quantized once and replaced under each name. Every
    layer is quantized before any is swapped in, so an error (e.g. a float64 or meta-device
    weight) leaves the model unchanged; the error names the layer.
    """
    cb.check_blocksize(blocksize)
    cb.check_quant_type(quant_type)
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES}, got {quant_storage!r}")
    skip = _names(skip, "skip")
    include = None if include is None else _names(include, "include")

    head, task_head = _output_embeddings(model), _task_head(model)
    keep_fp32 = _keep_in_fp32(model)
    owners = _parameter_owners(model)
    summary = QuantizeSummary()
    linears: dict[int, tuple[nn.Linear, list[str]]] = {}  # every name of each (maybe shared) Linear
    for name, module in model.named_modules(remove_duplicate=False):
        if name and isinstance(module, nn.Linear) and not isinstance(module, Linear4bit):
            linears.setdefault(id(module), (module, []))[1].append(name)
    plan: dict[int, tuple[str, nn.Linear]] = {}  # id(module) -> (first name, module)
    for key, (module, names) in linears.items():
        reason = None
        if type(module) is not nn.Linear:
            reason = f"subclass {type(module).__name__} of nn.Linear"
        elif any(_matches(n, skip) for n in names):
            reason = "in skip"
        elif module is head:
            reason = "output embeddings"
        elif module is task_head:
            reason = "task head (the model's last module)"
        elif any(_matches(n, keep_fp32) for n in names):
            reason = "kept in float32 by the model (_keep_in_fp32_modules)"
        elif include is not None and not any(_matches(n, include) for n in names):
            reason = "not in include"
        elif len({id(m) for m, _ in owners[id(module.weight)]}) > 1:
            others = sorted({n for m, n in owners[id(module.weight)] if m is not module})
            reason = f"weight tied to {', '.join(others)}"
        if reason is not None:
            summary.skipped.update((n, reason) for n in names)
        else:
            plan[key] = (names[0], module)

    cls = _CLASSES[quant_type]
    new_modules = {}
    for key, (name, module) in plan.items():
        try:
            layer = cls.from_linear(module, blocksize, double_quant, quant_type, compute_dtype, quant_storage)
        except (ValueError, TypeError) as e:
            raise ValueError(f"cannot quantize {name}: {e}") from e
        layer.train(module.training)
        new_modules[key] = layer
        summary.quantized.append(name)
        summary.bytes_before += module.weight.numel() * module.weight.element_size()
        summary.bytes_after += _weight_bytes(layer)

    _replace_modules(model, new_modules)
    logger.info("%s", summary)
    return (model, summary) if return_summary else model


def _weight_bytes(layer: Linear4bit) -> int:
    w, state = layer.weight, layer.weight.quant_state
    total = w.numel() * w.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        total += state.state2.absmax.numel() * 4 + 4
    return total


def _names(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise TypeError(f"{what} must be a module name or an iterable of names, got {value!r}") from None
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{what} must hold non-empty module names, got {value!r}")
    return names


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_embeddings(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None


def _task_head(model: nn.Module):
    """The head of a transformers model built on a base model (a ...ForSequenceClassification's
    classifier, a ...ForCausalLM's lm_head): the module holding the last parameter, which
    transformers leaves unquantized. None for base models and other modules."""
    prefix = getattr(model, "base_model_prefix", None)
    if not isinstance(prefix, str) or not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        return None
    names = [name for name, _ in model.named_parameters()]
    if not names or "." not in names[-1]:
        return None
    return model.get_submodule(names[-1].rsplit(".", 1)[0])


def _keep_in_fp32(model: nn.Module) -> tuple[str, ...]:
    """Module names a transformers model keeps in float32 (T5's `wo`, ...)."""
    names = []
    for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        names += list(getattr(model, attr, None) or ())
    return _names(names, "_keep_in_fp32_modules")


def _parameter_owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> [(module, full parameter name)] over every path to it."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, f"{prefix}.{pname}" if prefix else pname))
    return owners


def _replace_modules(model: nn.Module, new_modules: dict[int, nn.Module]) -> None:
    """Swap each module (by id) for its replacement under every parent that holds it."""
    if not new_modules:
        return
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new_modules:
                parent._modules[child_name] = new_modules[id(child)]


# -- load_bnb_checkpoint -----------------------------------------------------------------------


@dataclass
class LoadSummary:
    """What load_bnb_checkpoint did. missing_keys/unexpected_keys can only be non-empty with
    strict=False (strict raises on them)."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    quantized: list[str]  # modules that received a 4-bit weight
    replaced: list[str]  # of those, nn.Linear modules swapped for a Linear4bit


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys and the model's parameters do not match (strict loading)."""


def load_bnb_checkpoint(
    model: nn.Module,
    path,
    strict: bool = True,
    *,
    compute_dtype: torch.dtype | None = None,
    return_summary: bool = False,
):
    """Load a checkpoint saved by transformers + bitsandbytes in 4 bits into `model`; return the
    model (or `(model, LoadSummary)` with return_summary=True; also logged at INFO).

    path: a .safetensors file, or a folder with model.safetensors or a sharded
    model.safetensors.index.json. Every 4-bit weight in it ('<module>.weight' with its
    '.absmax', '.quant_map', [nested entries] and '.quant_state.bitsandbytes__<type>') goes to
    `<module>`, which must be a Linear4bit (from quantize_model or built directly; its packed
    weight and quantization state are replaced by the checkpoint's, bytes as saved) or an
    nn.Linear: that one is replaced by a LinearNF4/LinearFP4 holding the checkpoint's weight
    (same bias, training mode and device; compute_dtype as given), so a model built from its
    config, unquantized, loads a 4-bit checkpoint directly. The other tensors load as
    load_state_dict loads them (cast to the dtype of the model's tensor, on its device); these
    must not be on the meta device.

    strict=True: keys of the model missing from the checkpoint, or checkpoint keys with nowhere
    to go, raise CheckpointMismatchError (a ValueError) listing them (a parameter tied to one the
    checkpoint holds, e.g. an lm_head tied to the embeddings, counts as present). strict=False:
    they are skipped and listed in the summary.
    A missing file raises FileNotFoundError; an unreadable file, a corrupt or inconsistent 4-bit
    entry, or a tensor of the wrong shape raises ValueError naming it. All checks run before
    the model is changed, so an error leaves it as it was.
    """
    state_dict = read_safetensors(path)
    entries = quantized_entries(state_dict)  # ValueError naming the weight for a corrupt entry
    groups: dict[str, list[str]] = {}  # 4-bit weight name -> its state entries (not the weight)
    for key in state_dict:
        base = _quant_base(key, entries)
        if base is not None and base != key:
            groups.setdefault(base, []).append(key)
    quant_keys = set(entries) | {k for keys in groups.values() for k in keys}
    orphans = sorted(k for k in state_dict if is_quant_state_key(k) and k not in quant_keys and _owner_weight(k) in state_dict)
    if orphans:
        weight = _owner_weight(orphans[0])
        raise ValueError(
            f"{weight}: 4-bit quantization state entries ({', '.join(k for k in orphans if _owner_weight(k) == weight)}) "
            f"without '{weight}.quant_state.bitsandbytes__<type>' (corrupt or incomplete checkpoint)"
        )

    targets = _load_targets(model)
    unexpected: list[str] = []
    loads: list[tuple[str, nn.Module, str]] = []  # (weight name, module, module name)
    replace_linear: dict[int, tuple[str, nn.Linear]] = {}
    for name, (packed, state) in entries.items():
        module_name, _, leaf = name.rpartition(".")
        module = _submodule(model, module_name)
        if module is None or leaf != "weight":
            unexpected.extend([name, *groups[name]])
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{name}: the checkpoint holds a 4-bit Linear weight but {module_name or 'the model'} is a "
                f"{type(module).__name__}, not an nn.Linear or Linear4bit"
            )
        if tuple(state.shape) != (module.out_features, module.in_features):
            raise ValueError(
                f"{name}: 4-bit weight of shape {tuple(state.shape)} does not fit {module_name} "
                f"(out_features={module.out_features}, in_features={module.in_features})"
            )
        if not isinstance(module, Linear4bit):
            replace_linear.setdefault(id(module), (module_name, module))
        loads.append((name, module, module_name))

    rest = {}
    for key, value in state_dict.items():
        if key in quant_keys:
            continue
        target = targets.get(key)
        if target is None:
            unexpected.append(key)
            continue
        module, leaf = target
        expected = _expected_shape(module, leaf)
        if tuple(value.shape) != expected:
            raise ValueError(f"{key}: checkpoint tensor has shape {tuple(value.shape)}, the model's has {expected}")
        if getattr(module, leaf).is_meta:
            raise ValueError(f"{key}: the model's tensor is on the meta device; build the model on a real device to load it")
        rest[key] = value

    provided = set(rest) | {name for name, _, _ in loads}
    missing = _missing_keys(model, targets, provided)
    unexpected = sorted(set(unexpected))
    if strict and (missing or unexpected):
        lines = []
        if missing:
            lines.append(f"missing key(s) ({len(missing)}): " + _listing(missing))
        if unexpected:
            lines.append(f"unexpected key(s) ({len(unexpected)}): " + _listing(unexpected))
        raise CheckpointMismatchError(f"checkpoint {path} does not match {type(model).__name__}:\n  " + "\n  ".join(lines))

    # -- everything checked: change the model --
    replacements = {}
    for key, (module_name, linear) in replace_linear.items():
        packed, state = entries[module_name + ".weight"]
        replacements[key] = _empty_linear4bit(linear, state, compute_dtype)
    _replace_modules(model, replacements)
    for name, module, _ in loads:
        device = module.weight.device  # where the float (or older packed) weight was
        module = replacements.get(id(module), module)
        if device.type == "meta":
            device = torch.device("cpu")
        quant = {k: state_dict[k] for k in groups[name]}
        module.weight = Params4bit.from_prequantized(entries[name][0], quant, device=device, module=module)
        module.quant_storage = module.weight.dtype
    if rest:
        result = model.load_state_dict(rest, strict=False)
        leftover = [k for k in result.unexpected_keys if k in rest]
        if leftover:  # cannot happen after the checks above, unless a load hook renames keys
            raise CheckpointMismatchError(f"model did not accept {leftover}")

    quantized = sorted({module_name for _, _, module_name in loads})
    replaced = sorted(name for name, _ in replace_linear.values())
    logger.info(
        "loaded %d tensors from %s: %d 4-bit Linear weights (%d nn.Linear replaced)",
        len(state_dict), path, len(quantized), len(replaced),
    )
    summary = LoadSummary(missing, unexpected, quantized, replaced)
    return (model, summary) if return_summary else model


def _listing(keys: list[str], limit: int = 50) -> str:
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor (on the CPU) of a .safetensors file, or of a folder holding model.safetensors
    or a sharded model.safetensors.index.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if (path / INDEX_FILE).is_file():
            files = _shard_files(path / INDEX_FILE)
        elif (path / SINGLE_FILE).is_file():
            files = [path / SINGLE_FILE]
        else:
            raise FileNotFoundError(f"checkpoint folder {path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    else:
        files = [path]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint file {file} does not exist")
        try:
            part = load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read {file} as safetensors: {e}") from e
        duplicated = set(part) & set(tensors)
        if duplicated:
            raise ValueError(f"{file} repeats tensors of another shard: {sorted(duplicated)[:5]}")
        tensors.update(part)
    return tensors


def _shard_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {e!r}") from None
    if not files or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{index} lists no shard files")
    return [index.parent / f for f in files]


def _owner_weight(key: str) -> str:
    """'a.weight.quant_state.bitsandbytes__nf4' / 'a.weight.absmax' -> 'a.weight'."""
    if ".quant_state." in key:
        return key.rsplit(".quant_state.", 1)[0]
    return key.rsplit(".", 1)[0]


def _quant_base(key: str, entries: dict) -> str | None:
    """The 4-bit weight a checkpoint key belongs to (the packed weight itself included)."""
    if key in entries:
        return key
    if is_quant_state_key(key) and _owner_weight(key) in entries:
        return _owner_weight(key)
    return None


def _submodule(model: nn.Module, name: str):
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _load_targets(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every key load_state_dict would fill: parameters and persistent buffers, per path."""
    targets = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None:
                targets[dot + name] = (module, name)
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                targets[dot + name] = (module, name)
    return targets


def _expected_shape(module: nn.Module, leaf: str) -> tuple[int, ...]:
    if isinstance(module, Linear4bit) and leaf == "weight":
        return (module.out_features, module.in_features)  # an unquantized weight for a 4-bit layer
    return tuple(getattr(module, leaf).shape)


def _missing_keys(model, targets, provided: set[str]) -> list[str]:
    """Model keys not provided, where one provided key of a tied group covers the whole group."""
    groups: dict[int, list[str]] = {}
    for key, (module, leaf) in targets.items():
        groups.setdefault(id(getattr(module, leaf)), []).append(key)
    missing = []
    for keys in groups.values():
        if not any(k in provided for k in keys):
            missing.extend(keys)
    return sorted(missing)


def _empty_linear4bit(linear: nn.Linear, state, compute_dtype) -> Linear4bit:
    """A 4-bit layer for `linear`'s place, its weight still to load (built on the meta device:
    no float weight is allocated); bias, training mode and requires_grad of the bias carry over."""
    cls = _CLASSES[state.quant_type]
    layer = cls(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=compute_dtype,
        compress_statistics=state.nested,
        device="meta",
    )
    if linear.bias is not None:
        layer.bias = linear.bias
    layer.train(linear.training)
    return layer
