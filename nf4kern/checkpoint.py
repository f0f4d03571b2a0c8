"""Reading 4-bit weights out of state dicts saved with bitsandbytes' keys."""
from __future__ import annotations

import torch

from .quant_state import QuantState

_BLOB_SUFFIXES = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
_STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", *_BLOB_SUFFIXES)


def quantized_entries(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, QuantState]]:
    """{weight name: (packed data, QuantState)} for every 4-bit weight in state_dict.

    A weight is 4-bit when '<name>.quant_state.bitsandbytes__<type>' is present; its other
    entries are '<name>.absmax', '<name>.quant_map' and, if double quantized, the nested ones.
    """
    names = [k[: -len(s)] for k in state_dict for s in _BLOB_SUFFIXES if k.endswith(s)]
    entries = {}
    for name in names:
        if name not in state_dict:
            raise ValueError(f"state dict has quantization state for {name!r} but no {name!r} entry")
        qs = {name + s: state_dict[name + s] for s in _STATE_SUFFIXES if name + s in state_dict}
        try:
            state = QuantState.from_dict(qs)
            state.check(state_dict[name])
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        entries[name] = (state_dict[name], state)
    return entries


def is_quant_state_key(key: str) -> bool:
    return key.endswith(_STATE_SUFFIXES)
