"""NF4 linear (y = x W^T), forward and forward + backward: nf4kern against torch bf16 (cuBLAS on a
GPU), bitsandbytes and dequantize + matmul; time, TFLOP/s, GB/s and % of the roofline.

    python bench/matmul.py [--full | --quick] [--shapes NxK,...] [--m M,...] [--repeat N] [--write-docs]

Grid: M in {1, 16, 64, 256, 4096}, (N, K) in {(4096, 4096), (14336, 4096), (4096, 14336)}, both
passes; the default is the whole grid on CUDA and on the CPU a subset that finishes in minutes
(forward M in {1, 16, 64, 256}, forward + backward M in {1, 64}, on 4096x4096 and 4096x14336).
--quick is smaller still; --shapes / --m replace the grid's shapes / Ms. The measuring is
nf4kern.benchmarks.matmul (also run by `nf4kern bench`); the section of the device not measured
lists its cases as "not measured".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from nf4kern.benchmarks import matmul  # noqa: E402


def _arg(parse):
    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--full", action="store_true", help="the whole grid on the CPU too (slow: emulated bf16, bitsandbytes' backward)")
    grid.add_argument("--quick", action="store_true", help="a few cases only")
    parser.add_argument("--shapes", type=_arg(matmul.parse_shapes), metavar="NxK,...", help="(N, K) shapes instead of the grid's")
    parser.add_argument("--m", type=_arg(matmul.parse_ms), metavar="M,...", help="M values instead of the grid's")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per case (default 20 on CUDA, 5 on the CPU)")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    device = common.setup()
    mode = "full" if args.full else "quick" if args.quick else "default"
    section = matmul.run(device, mode, args.shapes, args.m, args.repeat)
    print(section.render())
    if args.write_docs:
        common.write_docs("matmul", device, section, matmul.placeholder)


if __name__ == "__main__":
    main()
