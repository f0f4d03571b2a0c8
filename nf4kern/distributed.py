"""Data-parallel training of nf4kern QLoRA models: FSDP2 (`fully_shard`) and DDP helpers.

    model = prepare_qlora(model, ..., compute_dtype=torch.bfloat16)
    to_float_storage(model, torch.bfloat16)      # optional under FSDP2, see docs/distributed.md
    shard_qlora_model(model)                     # fully_shard per block (or per QLoRALinear) + root

FSDP2 shards the packed 4-bit weights on dim 0 like any frozen parameter; the quantization
state (absmax, nested absmax, code tables) stays replicated on every rank, in the module's
`quant_state`. When FSDP2 all-gathers a weight it swaps a plain tensor into the module, and
Linear4bit falls back to the module's quant_state. QLoRALinear reads `base_layer.weight` without
calling the base layer's forward, so the FSDP unit must hold the QLoRALinear (or a module above
it), never the bare base layer: `shard_qlora_model` refuses that.

State dicts keep bitsandbytes' keys (`weight`, `weight.absmax`, ..., `weight.quant_state.
bitsandbytes__nf4`). `enable_distributed_state_dict` (called by shard_qlora_model) makes them
work with torch.distributed.checkpoint: it lets `get_model_state_dict` resolve those keys as
attributes, and lets `load_state_dict` / `set_model_state_dict` copy a 4-bit weight into an
FSDP-sharded parameter in place (nf4kern.nn's own load replaces the parameter, which FSDP2 does
not see).
"""
from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn

from . import checkpoint
from .functional import STORAGE_DTYPES
from .nn import Linear4bit, Params4bit
from .qlora import QLoRALinear
from .quant_state import QuantState

__all__ = [
    "broadcast_quant_states",
    "enable_distributed_state_dict",
    "fit_to_checkpoint",
    "load_full_state_dict",
    "load_sharded_checkpoint",
    "qlora_shard_units",
    "quantized_weight_bytes",
    "shard_qlora_model",
    "state_dict_storage",
    "to_float_storage",
]

_BLOB_MARK = ".quant_state.bitsandbytes__"


# -- storage dtype ------------------------------------------------------------------------------


def _view_bytes(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same bytes as a [n, 1] column of `dtype` (quantize_4bit's layout)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() % dtype.itemsize:
        raise ValueError(f"{raw.numel()} packed bytes do not divide into {dtype} elements ({dtype.itemsize} bytes each)")
    return raw.view(dtype).reshape(-1, 1)


def to_float_storage(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Reinterpret every Linear4bit weight of `model` as `dtype` storage, in place: the same
    bytes, viewed (never value-cast), as quantize_4bit(..., quant_storage=dtype) lays them out.
    Any of uint8, float16, bfloat16, float32. Call it before sharding."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype}")
    for name, module in model.named_modules():
        if isinstance(module, QLoRALinear) and module.merged:
            raise ValueError(f"{name} is merged: unmerge() it before changing the storage dtype")
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        w = module.weight
        if not isinstance(w, Params4bit) or not w.bnb_quantized:
            raise ValueError(f"{name}.weight is not a quantized Params4bit (convert before sharding, after quantizing)")
        if w.dtype == dtype:
            continue
        try:
            data = _view_bytes(w.data, dtype)
        except ValueError as e:
            raise ValueError(f"{name}.weight: {e}") from None
        state = w.quant_state if w.quant_state is not None else module.quant_state
        module.weight = Params4bit(
            data, False, quant_state=state, blocksize=w.blocksize, compress_statistics=w.compress_statistics,
            quant_type=w.quant_type, quant_storage=dtype, module=module, bnb_quantized=True,
        )
        module.quant_state = state
        module.quant_storage = dtype
    return model


def state_dict_storage(state_dict: dict, dtype: torch.dtype) -> dict:
    """A copy of a bitsandbytes-format state dict whose packed 4-bit weights (every `<name>`
    with a `<name>.quant_state.bitsandbytes__<type>` entry) are viewed as `dtype` storage, e.g.
    to load a uint8 checkpoint into a model sharded with bfloat16 storage. Nothing is copied."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype}")
    out = dict(state_dict)
    for key in state_dict:
        if _BLOB_MARK in key:
            name = key.split(_BLOB_MARK, 1)[0]
            if name not in out:
                raise ValueError(f"state dict has quantization state for {name!r} but no {name!r} entry")
            if _is_dtensor(out[name]):
                raise ValueError(f"{name} is a DTensor: convert a full (unsharded) state dict")
            out[name] = _view_bytes(out[name], dtype)
    return out


# -- FSDP2 ---------------------------------------------------------------------------------------


def qlora_shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules shard_qlora_model wraps by default: every entry of an nn.ModuleList that
    holds a QLoRALinear (the transformer blocks), then every QLoRALinear outside those."""
    units: list[nn.Module] = []
    covered: set[int] = set()
    for module in model.modules():
        if id(module) in covered or not isinstance(module, nn.ModuleList):
            continue
        for child in module:
            if child is not model and any(isinstance(m, QLoRALinear) for m in child.modules()):
                units.append(child)
                covered.update(id(m) for m in child.modules())
    units += [m for m in model.modules() if isinstance(m, QLoRALinear) and id(m) not in covered]
    return units


def shard_qlora_model(
    model: nn.Module,
    mesh=None,
    *,
    units: Iterable[nn.Module] | None = None,
    mp_policy=None,
    reshard_after_forward: bool = True,
    **fully_shard_kwargs,
) -> nn.Module:
    """Apply FSDP2's fully_shard to each unit (default: qlora_shard_units(model)), then to the
    root, and enable_distributed_state_dict(model). Returns the model (sharded in place).

    A unit holds a QLoRALinear's frozen packed weight and its float32 adapters together; FSDP2
    all-gathers a group of mixed dtypes as bytes, and reduce-scatters only the adapters' gradients.
    A float quant_storage must equal mp_policy.param_dtype (if set): FSDP2 value-casts float
    parameters to param_dtype, which would corrupt the packed bytes. uint8 storage is never cast.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    param_dtype = getattr(mp_policy, "param_dtype", None)
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            storage = module.weight.dtype
            if param_dtype is not None and storage.is_floating_point and storage != param_dtype:
                raise ValueError(
                    f"{name}.weight holds packed bytes as {storage} but mp_policy.param_dtype is {param_dtype}: "
                    f"FSDP2 would value-cast them and corrupt the weight. Use to_float_storage(model, {param_dtype}) "
                    "or uint8 storage"
                )
    units = qlora_shard_units(model) if units is None else list(units)
    parents = {id(m.base_layer): n for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    for unit in units:
        if id(unit) in parents:
            raise ValueError(
                f"{parents[id(unit)]}.base_layer cannot be an FSDP unit: QLoRALinear reads its weight without "
                "calling its forward, so FSDP would never all-gather it. Shard the QLoRALinear or a module above it"
            )
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, **fully_shard_kwargs)
    kwargs["mp_policy"] = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    for unit in units:
        if unit is not model:
            fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    enable_distributed_state_dict(model)
    return model


def _reshard(model: nn.Module) -> None:
    # set_model_state_dict reads the parameters in place before loading: a unit left unsharded
    # (reshard_after_forward=False, after a forward) would show plain tensors, not DTensors.
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# -- state dicts -----------------------------------------------------------------------------------


class _NamedQuantState(QuantState):
    """A QuantState whose packed JSON blob is also an attribute, `bitsandbytes__<quant_type>`, as
    in bitsandbytes: torch.distributed.checkpoint resolves every state-dict key as a chain of
    attributes (`...weight.quant_state.bitsandbytes__nf4`)."""

    def __getattr__(self, name):
        quant_type = self.__dict__.get("quant_type")
        if quant_type is not None and name == f"bitsandbytes__{quant_type}":
            return self.as_dict(packed=True)[f"quant_state.{name}"]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _named(state: QuantState) -> QuantState:
    if isinstance(state, _NamedQuantState):
        return state
    named = _NamedQuantState.__new__(_NamedQuantState)
    named.__dict__.update(state.__dict__)
    return named


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _install(module: Linear4bit) -> None:
    """Give the layer's current weight and quant_state the attributes the checkpoint API walks."""
    w = module.weight
    state = getattr(w, "quant_state", None) or module.quant_state
    if state is None:
        return
    state = _named(state)
    module.quant_state = state
    if isinstance(w, Params4bit):
        w.quant_state = state
    elif _is_dtensor(w):
        # FSDP2's sharded parameter: plain attributes stand in for Params4bit's properties. Never
        # on a plain tensor (FSDP2's unsharded parameter, reused at every all-gather): forward
        # would read a state it keeps after the next load instead of the module's.
        w.quant_state = state
        w.absmax, w.quant_map = state.absmax, state.code
        if state.nested:
            w.nested_absmax, w.nested_quant_map = state.state2.absmax, state.state2.code


def _save_post_hook(module, state_dict, prefix, local_metadata):
    _install(module)  # the weight now in place (FSDP2's sharded one) gets the attributes


def _load_post_hook(module, incompatible_keys):
    _install(module)  # nf4kern.nn's load builds a new QuantState


def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Installed on each Linear4bit: loads into an FSDP-sharded (DTensor) weight in place, and
    defers to Linear4bit's own load otherwise."""
    if not _is_dtensor(self.weight):
        return type(self)._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    weight = self.weight
    weight_key = prefix + "weight"
    quant = {k: v for k, v in state_dict.items() if k.startswith(weight_key + ".") and checkpoint.is_quant_state_key(k)}
    own = {k: v for k, v in state_dict.items() if k not in quant}
    state = None
    if weight_key in own:
        packed = own[weight_key]
        try:
            if not quant:
                raise ValueError(
                    "a sharded 4-bit weight loads only with its quantization entries (weight.absmax, "
                    "weight.quant_state.bitsandbytes__<type>, ...); with broadcast_from_rank0 use "
                    "nf4kern.distributed.load_full_state_dict"
                )
            state = QuantState.from_dict({k: v.full_tensor() if _is_dtensor(v) else v for k, v in quant.items()}, device=weight.device)
            state.check(packed)
            if tuple(state.shape) != (self.out_features, self.in_features):
                raise ValueError(f"quantized weight has shape {tuple(state.shape)}, the layer needs {(self.out_features, self.in_features)}")
            if packed.dtype != weight.dtype:
                raise ValueError(
                    f"packed bytes are stored as {packed.dtype}, the sharded layer holds {weight.dtype}: "
                    f"convert the state dict with nf4kern.distributed.state_dict_storage(sd, {weight.dtype})"
                )
        except ValueError as e:
            error_msgs.append(f"{weight_key}: {e}")
            own.pop(weight_key)
            state = None
    elif quant:
        error_msgs.append(f"{weight_key}: state dict has its quantization state but no packed weight")
    errors_before = len(error_msgs)
    nn.Module._load_from_state_dict(self, own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    if state is not None and len(error_msgs) == errors_before:
        self.quant_state = state
        weight.quant_state = None  # _install takes the module's new state
        _install(self)
    elif weight_key in state_dict and weight_key not in own and weight_key in missing_keys:
        missing_keys.remove(weight_key)  # present but refused: reported in error_msgs


def enable_distributed_state_dict(model: nn.Module) -> nn.Module:
    """Make the model's 4-bit layers work with torch.distributed.checkpoint (get/set_model_state_dict,
    dcp.save/load), sharded by FSDP2 or not. Idempotent; shard_qlora_model calls it."""
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        _install(module)
        if not getattr(module, "_nf4kern_distributed", False):
            module._nf4kern_distributed = True
            module.register_state_dict_post_hook(_save_post_hook)
            module.register_load_state_dict_post_hook(_load_post_hook)
            module._load_from_state_dict = types.MethodType(_load_from_state_dict, module)
    return model


def _quant_entries(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if checkpoint.is_quant_state_key(k)}


def load_full_state_dict(model: nn.Module, state_dict: dict, *, broadcast_from_rank0: bool = False, strict: bool = True, group=None):
    """set_model_state_dict(model, state_dict, full_state_dict=True) for a (sharded) QLoRA model.
    With broadcast_from_rank0 only rank 0 needs the state dict (others pass {}): the replicated
    quantization entries, which set_model_state_dict does not broadcast (they are no parameters),
    are broadcast here first. Returns set_model_state_dict's result."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    _reshard(model)
    enable_distributed_state_dict(model)
    state_dict = dict(state_dict)  # set_model_state_dict puts the model's own tensors in the dict it gets
    if broadcast_from_rank0:
        holder = [{k: v.cpu() for k, v in _quant_entries(state_dict).items()} if dist.get_rank(group) == 0 else None]
        dist.broadcast_object_list(holder, group_src=0, group=group)
        if dist.get_rank(group) != 0:
            state_dict = dict(holder[0])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast_from_rank0, strict=strict)
    return set_model_state_dict(model, state_dict, options=options)


def fit_to_checkpoint(state_dict: dict, metadata, prefix: str = "") -> dict:
    """Reallocate the `quant_state.bitsandbytes__<type>` entries of `state_dict` (a state dict
    about to be filled by dcp.load) to the sizes saved in the checkpoint `metadata`
    (storage_reader.read_metadata()). The entry is JSON whose length depends on its values
    (nested_offset's digits), and dcp.load refuses a size mismatch. `prefix`: the dotted path of
    state_dict inside the dict that was saved ("model." for dcp.save({"model": sd}))."""
    saved = metadata.state_dict_metadata
    out = dict(state_dict)
    for key, value in state_dict.items():
        size = getattr(saved.get(prefix + key), "size", None)
        if _BLOB_MARK in key and size is not None and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(size):
            out[key] = torch.empty(size, dtype=torch.uint8, device=value.device)
    return out


def load_sharded_checkpoint(model: nn.Module, checkpoint_id=None, *, storage_reader=None, strict: bool = True):
    """Load a model saved with dcp.save(get_model_state_dict(model), checkpoint_id=...) into
    `model` (sharded the same way or not): get_model_state_dict, fit_to_checkpoint, dcp.load,
    set_model_state_dict. Returns set_model_state_dict's result."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    _reshard(model)
    enable_distributed_state_dict(model)
    if storage_reader is None:
        storage_reader = dcp.FileSystemReader(checkpoint_id)
    state_dict = fit_to_checkpoint(get_model_state_dict(model), storage_reader.read_metadata())
    dcp.load(state_dict, checkpoint_id=checkpoint_id, storage_reader=storage_reader)
    return set_model_state_dict(model, state_dict, options=StateDictOptions(strict=strict))


# -- DDP and accounting ----------------------------------------------------------------------------


def _state_tensors(state: QuantState) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return tensors


def broadcast_quant_states(model: nn.Module, src: int = 0, group=None) -> None:
    """Copy every Linear4bit's quantization state (absmax, nested absmax, offset, code tables)
    from rank `src`, in place, in one collective. DDP broadcasts parameters from rank 0 when it
    wraps a model, the packed bytes included, but the quantization state is no parameter or
    buffer: call this after wrapping unless every rank quantized the same weights."""
    import torch.distributed as dist

    layers = [(n, m._quant_state()) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    meta = [(n, tuple(s.shape), s.blocksize, s.quant_type, s.nested, [(t.dtype, tuple(t.shape)) for t in _state_tensors(s)]) for n, s in layers]
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, meta, group=group)
    for rank, other in enumerate(everyone):
        if other != meta:
            raise ValueError(f"rank {rank} holds different 4-bit layers or layouts than this rank: the quantization states cannot be broadcast")
    tensors = [t for _, s in layers for t in _state_tensors(s)]
    if not tensors:
        return
    buf = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])
    dist.broadcast(buf, group=group, group_src=src)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel() * t.element_size()
            t.copy_(buf[offset : offset + n].view(t.dtype).reshape(t.shape))
            offset += n


def quantized_weight_bytes(model: nn.Module) -> dict:
    """Bytes of the model's 4-bit layers on this rank: `packed_local` (this rank's shard of the
    packed weights; FSDP2 may pad each shard by less than one row more), `packed_total` (all
    ranks together), `state` (absmax, nested state and code tables, replicated on every rank)."""
    local = total = state_bytes = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        w = module.weight
        size = w.element_size()
        total += w.numel() * size
        local += (w.to_local().numel() if _is_dtensor(w) else w.numel()) * size
        state = getattr(w, "quant_state", None) or module.quant_state
        if state is not None:
            state_bytes += sum(t.numel() * t.element_size() for t in _state_tensors(state))
    return {"packed_local": local, "packed_total": total, "state": state_bytes}
