"""QLoRA linear forward + backward: nf4kern against PEFT + bitsandbytes and bf16 LoRA.

    python bench/lora.py [--full | --quick] [--size 4096] [--repeat N] [--write-docs]

The measuring (grid, peers, memory columns) is nf4kern.benchmarks.lora, also run by
`nf4kern bench`. On the CPU the default is a subset (M = 512, r in {8, 64}); --full runs the
whole grid, --quick one case (two on CUDA). Rows not run say "not measured": nothing is
estimated.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from nf4kern.benchmarks import lora  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=lora.SIZE, help=f"N = K (default {lora.SIZE})")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--full", action="store_true", help="the whole grid on the CPU too (default there: a subset)")
    grid.add_argument("--quick", action="store_true", help="one M, r = 16 (on the CPU dropout 0 only)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats (default 10 on CUDA, 5 on the CPU)")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    device = common.setup()
    mode = "full" if args.full else "quick" if args.quick else "default"
    section = lora.run(device, mode, args.size, args.repeat)
    print(section.render())
    if args.write_docs:
        common.write_docs("lora", device, section, lora.placeholder)


if __name__ == "__main__":
    main()
