"""quantize_4bit / dequantize_4bit: argument checks, backend dispatch, the QuantState."""
from __future__ import annotations

import torch

from . import codebook as cb
from . import dispatch
from .quant_state import QuantState

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
    *,
    backend: str | None = None,
    allow_nonfinite: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize A blockwise to 4 bits, bit-identically to bitsandbytes.

    Returns (packed, state): packed is [ceil(numel/2) / itemsize, 1] in quant_storage (the same
    bytes for every storage dtype), two codes a byte, the first element in the high nibble.
    NaN or inf in A raise ValueError unless allow_nonfinite=True (their blocks decode to NaN).
    A is never modified.
    """
    check_float_tensor(A, "A")
    cb.check_blocksize(blocksize)
    cb.check_quant_type(quant_type)
    nbytes = -(-A.numel() // 2)
    storage_bytes = _check_storage(quant_storage, nbytes)
    impl = dispatch.ops(dispatch.select(A.device, backend))

    packed, absmax = impl.quantize_blocks(A.detach().contiguous(), blocksize, quant_type)
    if not allow_nonfinite:
        _check_finite(A, absmax, blocksize)
    state = QuantState(
        absmax=absmax,
        shape=A.shape,
        code=torch.from_numpy(cb.codebook(quant_type).copy()).to(A.device),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=A.dtype,
    )
    if double_quant:
        offset = absmax.mean()  # as bitsandbytes stores it; the reduction order sets the last bit
        if not allow_nonfinite and not bool(torch.isfinite(offset)):
            raise ValueError(
                "double quantization needs the float32 mean of the block absmax to be finite; it "
                f"overflows to {offset.item()} for A (values near the float32 limit): use double_quant=False"
            )
        qabsmax, nested_absmax = impl.quantize_nested(absmax, offset)
        state.absmax, state.offset, state.nested = qabsmax, offset, True
        state.state2 = QuantState(
            absmax=nested_absmax,
            code=torch.from_numpy(cb.dynamic_map().copy()).to(A.device),
            blocksize=cb.NESTED_BLOCKSIZE,
            dtype=torch.float32,
        )
    return packed.view(quant_storage).reshape(storage_bytes, 1), state


def dequantize_4bit(
    packed: torch.Tensor,
    quant_state: QuantState,
    *,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The tensor of quant_state.shape in `dtype` (default quant_state.dtype): one float32 product
    code * scale per element, rounded once to the output dtype."""
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype not in STORAGE_DTYPES:
        raise ValueError(f"packed must have a storage dtype {STORAGE_DTYPES}, got {packed.dtype}")
    quant_state.check(packed)
    check_state_device(packed, quant_state, "packed")
    out_dtype = dtype or quant_state.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    impl = dispatch.ops(dispatch.select(packed.device, backend))
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    nested = (quant_state.state2.absmax, quant_state.offset) if quant_state.nested else (None, None)
    flat = impl.dequantize(
        data, quant_state.absmax, quant_state.numel, quant_state.blocksize, quant_state.quant_type, out_dtype, *nested
    )
    return flat.reshape(quant_state.shape)


def check_float_tensor(A, name: str) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {A.dtype}")
    if A.is_meta:
        raise ValueError(f"{name} is a meta tensor: it has no data to quantize")
    if A.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(A.shape)})")


def check_state_device(packed: torch.Tensor, quant_state: QuantState, name: str) -> None:
    """The kernels read the packed bytes and every state tensor from one device; a meta tensor
    has no bytes to read."""
    if packed.is_meta:
        raise ValueError(f"{name} is a meta tensor: it has no data to dequantize")
    for field, t in quant_state.named_tensors():
        if t.device != packed.device:
            raise ValueError(
                f"quant_state.{field} is on {t.device} but {name} is on {packed.device}: "
                f"move the state with quant_state.to({str(packed.device)!r})"
            )


def _check_storage(quant_storage, nbytes: int) -> int:
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES}, got {quant_storage!r}")
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if nbytes % itemsize:
        raise ValueError(
            f"quant_storage={quant_storage} needs the packed size ({nbytes} bytes) to be a multiple of {itemsize}"
        )
    return nbytes // itemsize


class NonFiniteError(ValueError):
    """NaN or inf in a tensor to quantize: `count` of them, the first at `index` (of A's shape)."""

    def __init__(self, count: int, index: tuple[int, ...], value: float):
        self.count, self.index, self.value = count, index, value
        super().__init__(
            f"A has {count} non-finite value(s) (NaN or inf); the first is A{list(index)} = {value}. "
            "Pass allow_nonfinite=True to quantize anyway (those blocks do not decode to their values)."
        )


def _check_finite(A: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> None:
    """A block's absmax is finite iff the block is: only blocks that fail are searched."""
    bad_blocks = (~torch.isfinite(absmax)).nonzero().reshape(-1)
    if bad_blocks.numel() == 0:
        return
    flat = A.detach().reshape(-1)
    count, first = 0, None
    for b in bad_blocks.tolist():
        block = flat[b * blocksize : (b + 1) * blocksize]
        bad = (~torch.isfinite(block)).nonzero().reshape(-1)
        count += bad.numel()
        if first is None:
            first = b * blocksize + bad[0].item()
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), A.shape))
    raise NonFiniteError(count, index, flat[first].item())
