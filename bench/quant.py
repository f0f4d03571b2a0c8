"""Quantize and dequantize a bf16 4096x4096 weight (blocksize 64), nf4kern against bitsandbytes.

    python bench/quant.py [--write-docs] [--size 4096] [--quick]

The measuring is nf4kern.benchmarks.quant (also run by `nf4kern bench`); this script prints the
table and, with --write-docs, writes it into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from nf4kern.benchmarks import quant  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, help=f"side of the square weight (default {quant.SIZE}; {quant.QUICK_SIZE} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"a {quant.QUICK_SIZE}x{quant.QUICK_SIZE} weight")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    device = common.setup()
    section = quant.run(device, args.size or (quant.QUICK_SIZE if args.quick else quant.SIZE))
    print(section.render())
    if args.write_docs:
        common.write_docs("quant", device, section, quant.placeholder)


if __name__ == "__main__":
    main()
