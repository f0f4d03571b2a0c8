"""Quantize and dequantize a bf16 square weight (blocksize 64, NF4), nf4kern against bitsandbytes.

Both libraries run in the same process on the same tensor; the speedup is bitsandbytes' time over
nf4kern's. On a GPU the note also gives the dequantize kernel's share of the copy bandwidth
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


def run(device: str, size: int = SIZE) -> common.Section:
    torch.manual_seed(0)
    w = (torch.randn(size, size) * 0.02).to(torch.bfloat16).to(device)
    F = _bnb_functions()
    rows = []
    for double_quant in (False, True):
        common.progress(f"  quant {size}x{size} double quant {'on' if double_quant else 'off'}")
        packed, state = nf4kern.quantize_4bit(w, 64, "nf4", double_quant)
        ours_q = common.time_ms(lambda: nf4kern.quantize_4bit(w, 64, "nf4", double_quant))
        ours_d = common.time_ms(lambda: nf4kern.dequantize_4bit(packed, state))
        theirs_q = theirs_d = None
        if F is not None:
            bpacked, bstate = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
            theirs_q = common.time_ms(lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant))
            theirs_d = common.time_ms(lambda: F.dequantize_4bit(bpacked, bstate))
        dq = "on" if double_quant else "off"
        moved = packed.numel() * packed.element_size() + w.numel() * 2  # packed in, bf16 out
        extra = ""
        if device == "cuda":
            extra = f"{100 * moved / (ours_d * 1e6) / common.copy_bandwidth_gbs(moved, device):.0f}% of copy BW"
        for op, ours, theirs in (("quantize", ours_q, theirs_q), ("dequantize", ours_d, theirs_d)):
            ratio = f"{theirs / ours:.2f}x" if theirs else "bitsandbytes not installed"
            goal = GOALS[device].get(op)
            verdict = "" if goal is None or not theirs else ("meets" if theirs / ours >= goal else "misses") + f" {goal}x goal"
            note = verdict or (extra if op == "dequantize" else "")
            rows.append([op, dq, f"{ours:.2f}", f"{theirs:.2f}" if theirs else "-", ratio, note])
    intro = f"bf16 {size}x{size}, blocksize 64, NF4."
    return common.Section(f"Quantize / dequantize ({device})", intro, common.table(HEADERS, rows))
