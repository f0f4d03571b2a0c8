"""QuantState: the metadata of a 4-bit tensor, with bitsandbytes' fields and serialised form."""
from __future__ import annotations

import json
import math

import torch

from . import codebook as cb

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TYPE_KEYS = tuple(f"bitsandbytes__{t}" for t in cb.QUANT_TYPES)
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_JSON_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name, key: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"state dict entry {key!r} must name one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


class QuantState:
    """Block scales and layout of a quantized tensor (bitsandbytes' QuantState fields).

    absmax is float32 [B], or uint8 [B] nested codes when double quantized; then `offset` is a
    0-dim float32 tensor and `state2` holds the nested float32 absmax and the dynamic map.
    """

    valid_quant_types = cb.QUANT_TYPES
    valid_qs_type_keys = list(_TYPE_KEYS)
    valid_qs_keys = ["absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", *_JSON_KEYS]

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None, dtype=None, offset=None, state2=None):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    def __getitem__(self, index):
        """bitsandbytes' legacy list layout: [absmax, shape, dtype, blocksize, [offset, state2]
        or None, quant_type] (code that unpacks a QuantState like a list)."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][index]

    def __getattr__(self, name: str):
        # FSDP's state-dict traversal resolves the key "weight.quant_state.bitsandbytes__nf4"
        # as an attribute path: answer it with the packed JSON blob, as bitsandbytes does. Only
        # called for names not found normally; __dict__ may be empty here (during unpickling).
        if name == f"bitsandbytes__{self.__dict__.get('quant_type')}":
            return self.as_dict(packed=True)[f"quant_state.{name}"]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- serialisation ----------------------------------------------------------------------

    def as_dict(self, packed: bool = False) -> dict:
        """bitsandbytes' layout: tensors under their keys, the rest as values or, when packed,
        as one uint8 tensor of JSON under 'quant_state.bitsandbytes__<quant_type>'."""
        d = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.nested:
            d.update(
                nested_absmax=self.state2.absmax,
                nested_blocksize=self.state2.blocksize,
                # A clone: safetensors refuses to save two names for one storage.
                nested_quant_map=self.state2.code.clone(),
                nested_dtype=dtype_name(self.state2.dtype),
                nested_offset=self.offset.item(),
            )
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        blob = json.dumps({k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}).encode("utf-8")
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict, device=None) -> "QuantState":
        """Rebuild from as_dict output, packed or not; keys may carry a module prefix
        ('weight.absmax'). Missing, unknown or inconsistent entries raise ValueError."""
        if not isinstance(qs_dict, dict):
            raise TypeError(f"qs_dict must be a dict, got {type(qs_dict).__name__}")
        flat = _unpack_blob(dict(qs_dict))
        for key in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
            if key not in flat:
                raise ValueError(f"quantization state is missing {key!r}")
        quant_type = flat["quant_type"]
        cb.check_quant_type(quant_type)
        blocksize = flat["blocksize"]
        cb.check_blocksize(blocksize)
        shape = _shape(flat["shape"])
        absmax = _tensor(flat, "absmax", device)
        code = _tensor(flat, "quant_map", device)
        _check_table(code, cb.codebook(quant_type), "quant_map")
        nested_keys = ("nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset")
        offset = state2 = None
        if any(key in flat for key in nested_keys):
            for key in nested_keys:
                if key not in flat:
                    raise ValueError(f"quantization state has nested entries but is missing {key!r}")
            if flat["nested_blocksize"] != cb.NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize must be {cb.NESTED_BLOCKSIZE}, got {flat['nested_blocksize']!r}")
            nested_map = _tensor(flat, "nested_quant_map", device)
            _check_table(nested_map, cb.dynamic_map(), "nested_quant_map")
            if not isinstance(flat["nested_offset"], (int, float)) or not math.isfinite(flat["nested_offset"]):
                raise ValueError(f"nested_offset must be a finite number, got {flat['nested_offset']!r}")
            offset = torch.tensor(float(flat["nested_offset"]), dtype=torch.float32, device=device)
            state2 = cls(
                absmax=_tensor(flat, "nested_absmax", device),
                code=nested_map,
                blocksize=cb.NESTED_BLOCKSIZE,
                dtype=_dtype_from_name(flat["nested_dtype"], "nested_dtype"),
            )
        state = cls(
            absmax=absmax,
            shape=shape,
            code=code,
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=_dtype_from_name(flat["dtype"], "dtype"),
            offset=offset,
            state2=state2,
        )
        state.check()
        return state

    # -- consistency --------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def check(self, packed: torch.Tensor | None = None) -> None:
        """Raise ValueError if the state is inconsistent, or does not describe `packed`."""
        cb.check_quant_type(self.quant_type)
        cb.check_blocksize(self.blocksize)
        if self.shape is None or self.numel == 0:
            raise ValueError(f"quantization state shape must describe a non-empty tensor, got {self.shape}")
        nblocks = -(-self.numel // self.blocksize)
        want = torch.uint8 if self.nested else torch.float32
        if not isinstance(self.absmax, torch.Tensor) or self.absmax.dtype != want or self.absmax.shape != (nblocks,):
            raise ValueError(
                f"absmax must be a {want} tensor of shape ({nblocks},) for shape {tuple(self.shape)} and "
                f"blocksize {self.blocksize}, got {_describe(self.absmax)}"
            )
        if self.nested:
            if not isinstance(self.state2, QuantState):
                raise ValueError(
                    "the state is nested (double quantized), so state2 must be the QuantState of the "
                    f"nested absmax, got {_describe(self.state2)}"
                )
            nested_blocks = -(-nblocks // cb.NESTED_BLOCKSIZE)
            na = self.state2.absmax
            if not isinstance(na, torch.Tensor) or na.dtype != torch.float32 or na.shape != (nested_blocks,):
                raise ValueError(f"nested_absmax must be a torch.float32 tensor of shape ({nested_blocks},), got {_describe(na)}")
            if not isinstance(self.offset, torch.Tensor) or self.offset.dtype != torch.float32 or self.offset.dim() != 0:
                raise ValueError(f"offset must be a 0-dim torch.float32 tensor, got {_describe(self.offset)}")
        if packed is not None:
            nbytes = packed.numel() * packed.element_size()
            if nbytes != -(-self.numel // 2):
                raise ValueError(
                    f"packed data holds {nbytes} bytes but the quantization state describes "
                    f"{self.numel} elements ({-(-self.numel // 2)} bytes)"
                )

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor the state holds, the nested ones as 'state2.<name>'."""
        pairs = [("absmax", self.absmax), ("code", self.code)]
        if self.nested and self.state2 is not None:
            pairs += [("offset", self.offset), ("state2.absmax", self.state2.absmax), ("state2.code", self.state2.code)]
        return [(name, t) for name, t in pairs if isinstance(t, torch.Tensor)]

    # -- bitsandbytes' conveniences -------------------------------------------------------------

    def to(self, device) -> None:
        """Move every tensor to `device`, in place (as bitsandbytes' QuantState.to)."""
        self.code = self.code.to(device)
        self.absmax = self.absmax.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)

    def __eq__(self, other) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        return (
            _same(self.absmax, other.absmax)
            and self.shape == other.shape
            and _same(self.code, other.code)
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and _same(self.offset, other.offset)
            and (self.state2 == other.state2 if self.nested and other.nested else self.state2 is other.state2)
        )

    __hash__ = None

    def __repr__(self) -> str:
        nested = f", nested={self.nested}" if self.quant_type is not None else ""
        return (
            f"QuantState(quant_type={self.quant_type!r}, shape={tuple(self.shape) if self.shape else None}, "
            f"dtype={self.dtype}, blocksize={self.blocksize}{nested})"
        )


def _unpack_blob(qs_dict: dict) -> dict:
    blob_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
    if not blob_keys and "quant_type" not in qs_dict:
        raise ValueError("quantization state has neither a 'quant_state.bitsandbytes__<type>' entry nor 'quant_type'")
    if len(blob_keys) > 1:
        raise ValueError(f"quantization state has more than one packed entry: {blob_keys}")
    if blob_keys:
        key = blob_keys[0]
        if key.split(".")[-1] not in _TYPE_KEYS:
            raise ValueError(f"packed quantization state key {key!r} must end with one of {_TYPE_KEYS}")
        blob = qs_dict.pop(key)
        try:
            meta = json.loads(bytes(blob.to("cpu", torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"packed quantization state {key!r} is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"packed quantization state {key!r} must hold a JSON object")
        if meta.get("quant_type") != key.rsplit("__", 1)[-1]:
            raise ValueError(f"packed quantization state {key!r} holds quant_type {meta.get('quant_type')!r}")
        qs_dict.update(meta)
    flat = {}
    for key, value in qs_dict.items():
        name = key.split(".")[-1]
        if name not in QuantState.valid_qs_keys:
            raise ValueError(f"unexpected quantization state entry {key!r}")
        flat[name] = value
    return flat


def _tensor(flat: dict, key: str, device) -> torch.Tensor:
    value = flat[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"state dict entry {key!r} must be a tensor, got {type(value).__name__}")
    return value.to(device) if device is not None else value


def _shape(value) -> torch.Size:
    if not isinstance(value, (list, tuple, torch.Size)) or not all(isinstance(d, int) and d >= 0 for d in value):
        raise ValueError(f"state dict entry 'shape' must be a list of non-negative ints, got {value!r}")
    return torch.Size(value)


def _check_table(table: torch.Tensor, expected, key: str) -> None:
    ok = table.dtype == torch.float32 and table.shape == expected.shape
    if ok:
        ok = torch.equal(table.cpu(), torch.from_numpy(expected.copy()))
    if not ok:
        raise ValueError(f"state dict entry {key!r} does not hold the expected {expected.size}-entry float32 table")


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
