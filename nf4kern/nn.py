"""nn modules: Params4bit and the 4-bit Linear layers, with bitsandbytes' behaviour and names.

Where bitsandbytes has a defect these classes do not copy it: load_state_dict works (bnb issue
1946), a dtype cast never value-casts packed bytes held in a float quant_storage, forward never
recasts the bias in place, pickling keeps the class, a moved parameter keeps its `module`, and
a layer moves to the meta device.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import checkpoint
from .autograd import nf4_linear
from .functional import quantize_4bit
from .quant_state import QuantState

_ATTRS = ("blocksize", "compress_statistics", "quant_type", "quant_state", "quant_storage", "bnb_quantized", "module")


class Params4bit(nn.Parameter):
    """A frozen weight that quantizes itself on its first move to a device (`.to(device)`,
    `.cuda()`, `.cpu()`), as bitsandbytes' Params4bit does; after that moves keep the bytes."""

    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = False,
        quant_state: QuantState | None = None,
        blocksize: int | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: nn.Module | None = None,
        bnb_quantized: bool = False,
        **kwargs,  # transformers and peft rebuild with Params4bit(t, **old.__dict__)
    ):
        if data is None:
            data = torch.empty(0)
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = 64 if blocksize is None else blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    @classmethod
    def from_prequantized(cls, data, quantized_stats: dict, requires_grad=False, device="cuda", module=None, **kwargs):
        """Wrap packed data and its serialised quantization state (a checkpoint's entries)."""
        state = QuantState.from_dict(quantized_stats, device=device)
        state.check(data)
        self = cls(
            data.to(device),
            requires_grad=requires_grad,
            quant_state=state,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=data.dtype,
            module=module,
            bnb_quantized=True,
        )
        if module is not None:
            module.quant_state = state
        return self

    def _quantize(self, device) -> "Params4bit":
        packed, state = quantize_4bit(
            self.data.to(device),
            self.blocksize,
            self.quant_type,
            self.compress_statistics,
            self.quant_storage,
        )
        self.data = packed
        self.quant_state = state
        if self.module is not None:
            self.module.quant_state = state
        self.bnb_quantized = True
        return self

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type != "meta" and not self.bnb_quantized:
            return self._quantize(device)
        if self.bnb_quantized:
            dtype = None  # packed bytes are never value-cast, whatever quant_storage holds them
            if self.quant_state is not None and device is not None:
                self.quant_state.to(device)
        moved = super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        # bitsandbytes drops `module` here; kept, a later requantization through this copy
        # (peft's merge rebuilds from its __dict__) still updates the layer's quant_state.
        return type(self)(moved, self.requires_grad, **{a: getattr(self, a) for a in _ATTRS})

    # Module.half()/.float()/.bfloat16()/.double() call these on every floating parameter:
    # packed bytes in a float quant_storage must not be value-cast.
    def half(self, *args, **kwargs):
        return self if self.bnb_quantized else super().half(*args, **kwargs)

    def float(self, *args, **kwargs):
        return self if self.bnb_quantized else super().float(*args, **kwargs)

    def bfloat16(self, *args, **kwargs):
        return self if self.bnb_quantized else super().bfloat16(*args, **kwargs)

    def double(self, *args, **kwargs):
        return self if self.bnb_quantized else super().double(*args, **kwargs)

    def cuda(self, device=None, non_blocking=False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def cpu(self):
        return self.to(device="cpu")

    def __deepcopy__(self, memo):
        attrs = {a: copy.deepcopy(getattr(self, a), memo) for a in _ATTRS if a != "module"}
        # The layer's copy when the layer itself is being copied; else the same layer, as in
        # bitsandbytes (copying a parameter must not copy the whole module around it).
        attrs["module"] = memo.get(id(self.module), self.module)
        new = type(self)(copy.deepcopy(self.data, memo), self.requires_grad, **attrs)
        memo[id(self)] = new
        return new

    def __copy__(self):
        return type(self)(self.data, self.requires_grad, **{a: getattr(self, a) for a in _ATTRS})

    def __reduce_ex__(self, protocol):
        # Attributes go in the pickled state, not the constructor arguments: `module` refers
        # back to the layer holding this parameter, a cycle pickle resolves only through state.
        return (_rebuild_params4bit, (self.data, self.requires_grad), {a: getattr(self, a) for a in _ATTRS})

    def __setstate__(self, state):
        for a in _ATTRS:
            setattr(self, a, state.get(a))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if not (args and isinstance(args[0], Params4bit)):
            return result
        src = args[0]
        if func in (torch.chunk, torch.split, torch.Tensor.chunk, torch.Tensor.split):
            # FSDP2 splits parameters: every piece keeps the type and the shared quant_state.
            return tuple(type(src)(piece, src.requires_grad, **{a: getattr(src, a) for a in _ATTRS}) for piece in result)
        if func is torch.Tensor.detach:
            # nn.Parameter(p) detaches a subclass p and requires the same type back: Module.to()
            # builds the parameter that way on a device change it cannot do in place (to "meta").
            return type(src)(result, False, **{a: getattr(src, a) for a in _ATTRS})
        return result

    # Read-only views of the quantization state, by bitsandbytes' names: FSDP's state-dict
    # traversal resolves 'weight.absmax' through them.
    absmax = property(lambda self: self.quant_state.absmax)
    code = property(lambda self: self.quant_state.code)
    quant_map = property(lambda self: self.quant_state.code)
    offset = property(lambda self: self.quant_state.offset)
    state2 = property(lambda self: self.quant_state.state2)
    nested_absmax = property(lambda self: self.quant_state.state2.absmax)
    nested_blocksize = property(lambda self: self.quant_state.state2.blocksize)
    nested_quant_map = property(lambda self: self.quant_state.state2.code)
    nested_dtype = property(lambda self: self.quant_state.state2.dtype)
    nested_offset = property(lambda self: self.quant_state.offset.item())


def _rebuild_params4bit(data, requires_grad):
    return Params4bit(data, requires_grad)


class Linear4bit(nn.Linear):
    """A Linear layer whose weight is stored in 4 bits (bitsandbytes' Linear4bit interface).

    The weight quantizes on the first `.to(device)`; `from_linear` quantizes an existing layer.
    state_dict() holds bitsandbytes' keys, and load_state_dict() reads them back.
    """

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device=None,
    ):
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        )
        self.compute_dtype = compute_dtype
        self.compute_type_is_set = compute_dtype is not None
        self.quant_state = None
        self.quant_storage = quant_storage

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_type: str | None = None,
        compute_dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
    ) -> "Linear4bit":
        """A quantized copy of `linear` on its device (the original is left unchanged).
        quant_type defaults to the class's own (LinearFP4: "fp4"), else "nf4"."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if quant_type is None:
            quant_type = getattr(cls, "_default_quant_type", "nf4")
        layer = Linear4bit.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.compute_dtype = compute_dtype
        layer.compute_type_is_set = compute_dtype is not None
        layer.quant_storage = quant_storage
        layer.quant_state = None
        weight = Params4bit(
            linear.weight.detach(),
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=layer,
        )
        layer.weight = weight._quantize(linear.weight.device)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), linear.bias.requires_grad)
        layer.register_parameter("bias", bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._quant_state()
        inp_dtype = x.dtype
        # With compute_dtype None every call computes in its input's dtype (bitsandbytes instead
        # fixes compute_dtype from the first input it sees).
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nf4_linear(x, self.weight, bias, state).to(inp_dtype)

    def _quant_state(self) -> QuantState:
        state = getattr(self.weight, "quant_state", None)
        if state is None:
            # FSDP and others may swap in a plain tensor; the layer keeps the state.
            state = self.quant_state
        if state is None:
            raise RuntimeError(
                f"{type(self).__name__} weight is not quantized yet: move the layer to a device "
                "(.to('cpu') or .cuda()) or load a quantized state dict first"
            )
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = getattr(self.weight, "quant_state", None) or self.quant_state
        if state is not None:
            for key, value in state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        weight_key = prefix + "weight"
        quant = {k: v for k, v in state_dict.items() if k.startswith(weight_key + ".") and checkpoint.is_quant_state_key(k)}
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k not in quant}
        if quant and weight_key in own:
            packed = own.pop(weight_key)
            try:
                self._load_quantized(packed, quant)
            except ValueError as e:
                error_msgs.append(f"{weight_key}: {e}")
        elif weight_key in own and self.weight.bnb_quantized:
            full = own.pop(weight_key)
            if tuple(full.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"size mismatch for {weight_key}: expected a quantized weight with its quantization "
                    f"state, or a weight of shape {(self.out_features, self.in_features)}, got {tuple(full.shape)}"
                )
            else:  # an unquantized checkpoint: quantize it with this layer's settings
                self._requantize(full)
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        consumed = weight_key in state_dict and weight_key not in own
        if consumed and weight_key in missing_keys:
            missing_keys.remove(weight_key)

    def _load_quantized(self, packed: torch.Tensor, quant: dict) -> None:
        device = self.weight.device if self.weight.device.type != "meta" else packed.device
        state = QuantState.from_dict(quant, device=device)
        state.check(packed)
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight has shape {tuple(state.shape)}, the layer needs {(self.out_features, self.in_features)}")
        self.weight = Params4bit.from_prequantized(packed, quant, device=device, module=self)
        self.weight.quant_state = state
        self.quant_state = state
        self.quant_storage = packed.dtype

    def _requantize(self, full: torch.Tensor) -> None:
        old = self.weight
        weight = Params4bit(
            full.detach().to(old.device),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=self,
        )
        self.weight = weight._quantize(old.device)

    def extra_repr(self) -> str:
        w = self.weight
        state = "quantized" if w.bnb_quantized else "not quantized yet"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={w.quant_type}, blocksize={w.blocksize}, double_quant={w.compress_statistics}, "
            f"compute_dtype={self.compute_dtype}, quant_storage={w.quant_storage}, {state}"
        )


class LinearNF4(Linear4bit):
    """Linear4bit with quant_type="nf4"."""

    _default_quant_type = "nf4"

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True, quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "nf4", quant_storage, device)


class LinearFP4(Linear4bit):
    """Linear4bit with quant_type="fp4"."""

    _default_quant_type = "fp4"

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True, quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "fp4", quant_storage, device)


def __getattr__(name: str):
    # QLoRALinear lives in nf4kern.qlora (which builds on these classes); served from here too.
    if name == "QLoRALinear":
        from .qlora import QLoRALinear

        return QLoRALinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
