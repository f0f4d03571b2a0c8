"""The nf4kern command line.

    nf4kern demo [--size N]     quantization report on built-in example weights
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import codebook as cb
from .functional import dequantize_4bit, quantize_4bit


def _example_weights(size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Weights shaped like a transformer layer's, with the distributions 4-bit formats meet."""
    normal = torch.randn(size, size, generator=generator) * 0.02
    student_t = torch.distributions.StudentT(3.0).sample((size, size)) * 0.01
    outliers = normal.clone()
    idx = torch.randint(0, normal.numel(), (size // 8,), generator=generator)
    outliers.view(-1)[idx] *= 50.0
    return {"normal": normal, "heavy-tailed (t, 3 dof)": student_t, "normal + 0.01% outliers": outliers}


def _sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    signal = w.double().pow(2).mean()
    noise = (w.double() - w_hat.double()).pow(2).mean()
    return float(10 * torch.log10(signal / noise))


def _bits_per_param(state) -> float:
    n = state.numel
    bits = 4 * n + 8 * state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        bits += 32 * state.state2.absmax.numel() + 32
    return bits / n


def demo(size: int) -> int:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    weights = _example_weights(size, generator)
    for quant_type in cb.QUANT_TYPES:  # builds the code-selection tables outside the timings
        quantize_4bit(torch.zeros(64), 64, quant_type)
    print(f"nf4kern quantization report: {size}x{size} weights, bf16, torch {torch.__version__}")
    print("rel err = mean |w - w_hat| / mean |w|; ms = quantize time (double quant included)\n")
    header = f"{'weights':26} {'type':4} {'block':>5} {'DQ':>3} {'bits/param':>10} {'SQNR dB':>8} {'mean |err|':>11} {'rel err':>8} {'ms':>7}"
    print(header)
    print("-" * len(header))
    for name, w in weights.items():
        w = w.to(torch.bfloat16)
        for quant_type in cb.QUANT_TYPES:
            for blocksize, double_quant in ((64, False), (64, True), (256, True)):
                start = time.perf_counter()
                packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
                elapsed = (time.perf_counter() - start) * 1e3
                w_hat = dequantize_4bit(packed, state)
                err = (w.float() - w_hat.float()).abs()
                rel = float(err.mean() / w.float().abs().mean())
                print(
                    f"{name:26} {quant_type:4} {blocksize:5} {'on' if double_quant else 'off':>3} "
                    f"{_bits_per_param(state):10.3f} {_sqnr_db(w, w_hat):8.2f} {float(err.mean()):11.3e} {rel:8.4f} {elapsed:7.1f}"
                )
    print()
    _compare_with_bitsandbytes(weights["normal"].to(torch.bfloat16))
    return 0


def _compare_with_bitsandbytes(w: torch.Tensor) -> None:
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError:
        print("bitsandbytes is not installed: byte-for-byte comparison skipped")
        return
    packed, state = quantize_4bit(w, 64, "nf4", double_quant=True)
    bpacked, bstate = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    same_bytes = torch.equal(packed, bpacked)
    ours_from_theirs = dequantize_4bit(bpacked, type(state).from_dict(bstate.as_dict(packed=True)))
    same_values = torch.equal(ours_from_theirs, bnb_f.dequantize_4bit(bpacked, bstate))
    print(
        "bitsandbytes check (NF4, blocksize 64, double quant): packed bytes "
        f"{'identical' if same_bytes else 'DIFFER'}; dequantizing bitsandbytes' state: "
        f"{'bit-identical' if same_values else 'DIFFERS'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nf4kern", description="NF4/FP4 quantization, bit-exact with bitsandbytes")
    commands = parser.add_subparsers(dest="command", required=True)
    p_demo = commands.add_parser("demo", help="quantization report on built-in example weights")
    p_demo.add_argument("--size", type=int, default=1024, help="side of the square example weights")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.size)
    return 2


if __name__ == "__main__":
    sys.exit(main())
