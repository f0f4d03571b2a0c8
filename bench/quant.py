"""Quantize and dequantize a bf16 4096x4096 weight (blocksize 64), nf4kern against bitsandbytes.

    python bench/quant.py [--write-docs] [--size 4096]

Both libraries run in the same process on the same tensor; the ratio is bitsandbytes' time over
nf4kern's. On a GPU the dequantize row also reports the share of the copy bandwidth measured here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import nf4kern  # noqa: E402

GOALS = {"cpu": {"quantize": 5.0, "dequantize": 1.5}, "cuda": {}}


def bnb_functions():
    try:
        import bitsandbytes.functional as F
    except ImportError:
        return None
    return F


def copy_bandwidth_gbs(nbytes: int, device: str) -> float:
    """Device copy bandwidth (bytes read + written) measured now, for the % of roofline."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = common.time_ms(lambda: dst.copy_(src), repeat=20)
    return 2 * nbytes / (ms * 1e6)


def run(size: int) -> tuple[list[list], str]:
    device = common.device_kind()
    torch.manual_seed(0)
    w = (torch.randn(size, size) * 0.02).to(torch.bfloat16).to(device)
    F = bnb_functions()
    rows = []
    for double_quant in (False, True):
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
            extra = f"{100 * moved / (ours_d * 1e6) / copy_bandwidth_gbs(moved, device):.0f}% of copy BW"
        for op, ours, theirs in (("quantize", ours_q, theirs_q), ("dequantize", ours_d, theirs_d)):
            ratio = f"{theirs / ours:.2f}x" if theirs else "bitsandbytes not installed"
            goal = GOALS[device].get(op)
            verdict = "" if goal is None or not theirs else ("meets" if theirs / ours >= goal else "misses") + f" {goal}x goal"
            rows.append([op, dq, f"{ours:.2f}", f"{theirs:.2f}" if theirs else "-", ratio, verdict or extra])
    return rows, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads())) if not torch.cuda.is_available() else None
    rows, device = run(args.size)
    headers = ["op", "double quant", "nf4kern ms", "bitsandbytes ms", "speedup", "note"]
    text = table = common.table(headers, rows)
    print(f"{device}: bf16 {args.size}x{args.size}, blocksize 64, NF4\n{table}")
    if args.write_docs:
        body = f"## Quantize / dequantize ({device})\n\n{common.stamp(common.command_line())}\n{text}\n"
        other = "cpu" if device == "cuda" else "cuda"
        placeholder = f"## Quantize / dequantize ({other})\n\nnot measured\n"
        common.write_section(f"quant:{device}", body, {f"quant:{other}": placeholder})


if __name__ == "__main__":
    main()
