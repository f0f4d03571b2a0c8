"""Quantize and dequantize a bf16 square weight (blocksize 64, NF4), nf4kern against bitsandbytes.

Both libraries run in the same process on the same tensor, their calls interleaved (a slow spell of
the machine reaches both); the speedup is bitsandbytes' time over nf4kern's. On a GPU the note also gives the dequantize kernel's share of the copy bandwidth
measured in the same run.
"""
from __future__ import annotations

import torch

import nf4kern

from . import common

GOALS = {"cpu": {"quantize": 5.0, "dequantize": 1.5}, "cuda": {}}
HEADERS = ["op", "double quant", "nf4kern ms", "bitsandbytes ms", "speedup", "note"]
SIZE, QUICK_SIZE = 4096, 1024


def _bnb_functions():
    try:
        import bitsandbytes.functional as F
    except ImportError:
        return None
    return F


def placeholder(device: str) -> common.Section:
    return common.Section(f"Quantize / dequantize ({device})", common.NOT_MEASURED, "")


def run(device: str, size: int = SIZE, repeat: int = 11) -> common.Section:
    torch.manual_seed(0)
    w = (torch.randn(size, size) * 0.02).to(torch.bfloat16).to(device)
    F = _bnb_functions()
    rows = []
    for double_quant in (False, True):
        common.progress(f"  quant {size}x{size} double quant {'on' if double_quant else 'off'}")
        packed, state = nf4kern.quantize_4bit(w, 64, "nf4", double_quant)
        calls = {"ours_q": lambda: nf4kern.quantize_4bit(w, 64, "nf4", double_quant),
                 "ours_d": lambda: nf4kern.dequantize_4bit(packed, state)}
        if F is not None:
            bpacked, bstate = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
            calls["theirs_q"] = lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
            calls["theirs_d"] = lambda: F.dequantize_4bit(bpacked, bstate)
        times = common.time_interleaved(calls, repeat=repeat)
        for name in ("ours_q", "ours_d"):
            if isinstance(times[name], Exception):
                raise times[name]
        dq = "on" if double_quant else "off"
        moved = packed.numel() * packed.element_size() + w.numel() * 2  # packed in, bf16 out
        extra = ""
        if device == "cuda":
            extra = f"{100 * moved / (times['ours_d'] * 1e6) / common.copy_bandwidth_gbs(moved, device):.0f}% of copy BW"
        for op, key in (("quantize", "q"), ("dequantize", "d")):
            rows.append([op, dq] + _cells(device, op, times[f"ours_{key}"], times.get(f"theirs_{key}"), extra))
    intro = (f"bf16 {size}x{size}, blocksize 64, NF4; median of {repeat} calls after 5 warm-up, the four calls "
             "(quantize and dequantize, each library) interleaved round by round.")
    return common.Section(f"Quantize / dequantize ({device})", intro, common.table(HEADERS, rows))


def _cells(device: str, op: str, ours: float, theirs, extra: str) -> list[str]:
    """nf4kern ms, bitsandbytes ms, speedup and note; theirs is None without bitsandbytes and an
    exception when its call failed."""
    if theirs is None or isinstance(theirs, Exception):
        why = "bitsandbytes not installed" if theirs is None else common.failure(theirs)
        return [f"{ours:.2f}", "-", why, extra if op == "dequantize" else ""]
    goal = GOALS[device].get(op)
    verdict = "" if goal is None else ("meets" if theirs / ours >= goal else "misses") + f" {goal}x goal"
    note = verdict or (extra if op == "dequantize" else "")
    return [f"{ours:.2f}", f"{theirs:.2f}", f"{theirs / ours:.2f}x", note]
