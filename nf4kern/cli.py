"""The nf4kern command line.

    nf4kern demo [--steps N]    the end-to-end job: QLoRA on real pretrained all-MiniLM-L6-v2
    nf4kern report [--size N]   quantization report on built-in example weights
    nf4kern quantize IN OUT     a float safetensors checkpoint -> bitsandbytes' 4-bit layout
    nf4kern inspect FILE        per-tensor quantization error of a checkpoint
    nf4kern bench [--quick]     microbenchmarks against bitsandbytes and torch on this machine

Expected failures (missing or corrupt files, wrong formats, unwritable outputs, bad options)
end with one line `nf4kern: error: ...` on stderr and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from . import codebook as cb
from .benchmarks import BENCHMARKS
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


def report(size: int) -> int:
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


def _fmt_db(x: float) -> str:
    return f"{x:8.2f}" if math.isfinite(x) else f"{x:>8}"


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def quantize(args) -> int:
    from . import convert

    opts = _options(args)
    summary = convert.quantize_checkpoint(args.input, args.output, opts, progress=False if args.no_progress else None)
    src = summary.source
    _warn_if_config_unused(summary.selection)
    print(f"nf4kern quantize: {src.path} -> {summary.out}")
    print(f"  format: {opts.describe()}, compute dtype {opts.compute_dtype}")
    print(f"  weights quantized: {summary.selection.describe()}")
    shards = f" in {len(src.shards)} shards" if len(src.shards) > 1 else ""
    transposed = sum(t.transposed for t in summary.quantized)
    conv1d = f" ({transposed} Conv1D, transposed to [out, in])" if transposed else ""
    print(f"  tensors: {len(summary.quantized)} quantized{conv1d}, {summary.copied} copied unchanged{shards}")
    if summary.not_in_model:
        _warn(f"{summary.selection.model.name}, built from config.json, has no parameter of the name and shape of "
              f"{len(summary.not_in_model)} 2-D weight(s), copied unchanged: {_names(summary.not_in_model)}")
    ratio = summary.bytes_out / summary.bytes_in if summary.bytes_in else 0.0
    print(f"  size: {convert.human_bytes(summary.bytes_in)} -> {convert.human_bytes(summary.bytes_out)} ({ratio:.1%}; "
          f"{summary.bytes_in} -> {summary.bytes_out} bytes)")
    if src.folder:
        config = "config.json: quantization_config added" if summary.config_written else "no config.json to update"
        print(f"  {config}; other files copied: {', '.join(summary.other_files) or 'none'}")
        if summary.ignored_files:
            print(f"  not copied (other weight formats or folders): {', '.join(summary.ignored_files)}")
    if not summary.quantized:
        print("  no eligible tensors: nothing was quantized")
        return 0
    params = sum(math.prod(t.shape) for t in summary.quantized)
    stored = sum(t.stored_bytes for t in summary.quantized)
    print(f"  quantized: {params} parameters, {8 * stored / params:.3f} bits/param as stored "
          "(codes + absmax + nested absmax + maps + state)")
    width = max(len(t.name) for t in summary.quantized)
    print(f"\n  {'tensor':{width}} {'shape':>14} {'dtype':>5} {'SQNR dB':>8}")
    for t in summary.quantized:
        print(f"  {t.name:{width}} {_shape(t.shape):>14} {t.dtype:>5} {_fmt_db(t.stats.sqnr_db)}")
    print(f"\n  SQNR dB: {_sqnr_summary(summary.quantized)}")
    return 0


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _warn_if_config_unused(selection) -> None:
    if selection.config_unused:
        _warn(f"weights chosen by name, not by model ({selection.why_by_name}); transformers may not load the "
              "result as intended")


def _warn(message: str) -> None:
    sys.stderr.write(f"nf4kern: warning: {' '.join(message.split())}\n")


def _sqnr_summary(reports) -> str:
    """min (name) and mean SQNR; tensors reproduced exactly (infinite SQNR) are counted apart."""
    finite = [t for t in reports if math.isfinite(t.stats.sqnr_db)]
    exact = len(reports) - len(finite)
    if not finite:
        return f"all {exact} tensors reproduced exactly (no error)"
    worst = min(finite, key=lambda t: t.stats.sqnr_db)
    mean = sum(t.stats.sqnr_db for t in finite) / len(finite)
    extra = f"; {exact} tensor(s) reproduced exactly, not in the mean" if exact else ""
    return f"min {worst.stats.sqnr_db:.2f} ({worst.name}), mean {mean:.2f}{extra}"


def inspect(args) -> int:
    from . import convert

    opts = _options(args)
    if args.top is not None and args.top < 1:
        raise convert.ConvertError(f"--top must be a positive number, got {args.top}")
    plot = _plot_file(args.plot) if args.plot else None  # before the work, so a bad --plot fails at once
    try:
        return _inspect(args, opts, plot)
    finally:
        if plot is not None:
            plot.discard()


def _plot_file(path: str):
    from . import convert

    try:
        import matplotlib
    except ImportError:
        raise convert.ConvertError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    try:
        dest = Path(path)
        convert.check_output_file(dest)
        return convert.OutputFile(dest, suffix=".png.tmp")
    except convert.ConvertError as e:
        raise convert.ConvertError(f"--plot: {e}") from None


def _inspect(args, opts, plot) -> int:
    from . import convert

    report = convert.inspect_checkpoint(args.file, opts, bins=80 if plot else 0, progress=False if args.no_progress else None)
    _warn_if_config_unused(report.selection)
    print(f"nf4kern inspect: {report.source.path} ({opts.describe()})")
    print(f"weights inspected: {report.selection.describe()}")
    rows = report.errors
    if args.top is not None:
        rows = sorted(rows, key=_worst_first)[: args.top]
    if rows:
        title = f"lowest SQNR first, top {len(rows)} of {len(report.errors)}" if args.top is not None else "in file order"
        print(f"quantization error of the float tensors ({title}); rel err = mean |err| / mean |w|; "
              "outliers = |w| > 6 std")
        width = max(len(t.name) for t in rows)
        print(f"{'tensor':{width}} {'shape':>14} {'dtype':>5} {'SQNR dB':>8} {'max |err|':>10} {'mean |err|':>10} "
              f"{'rel err':>8} {'outliers':>8} {'bits/param':>10}")
        for t in rows:
            print(_error_row(t, width))
        print(f"summary: {_error_summary(report.errors)}")
    if report.quantized:
        print(f"already quantized (bitsandbytes layout): {len(report.quantized)} tensors")
        width = max(len(q.name) for q in report.quantized)
        print(f"{'tensor':{width}} {'shape':>14} {'type':>4} {'block':>5} {'DQ':>3} {'storage':>8} {'bits/param':>10}")
        for q in report.quantized:
            if q.problem:
                print(f"{q.name:{width}} invalid quantization state: {q.problem}")
                continue
            print(f"{q.name:{width}} {_shape(q.shape):>14} {q.quant_type:>4} {q.blocksize:5d} "
                  f"{'on' if q.nested else 'off':>3} {q.storage:>8} {q.bits_per_param:10.3f}")
    if not rows and not report.quantized:
        print("no eligible tensors and no quantized ones")
    print(f"not inspected: {report.not_eligible} tensors (quantize would copy them unchanged)")
    if plot is not None:
        quantized = [t for t in rows if t.stats is not None]
        if not quantized:
            raise convert.ConvertError("--plot: no float tensors were quantized, nothing to plot")
        _plot(quantized, plot)
        print(f"error histograms written to {plot.dest}")
    bad = [t.name for t in report.errors if t.nonfinite]
    if bad:  # after the whole report, so that a script notices
        raise convert.ConvertError(f"{report.source.path}: {len(bad)} tensor(s) hold NaN or inf, which quantize "
                                   f"refuses: {_names(bad)}")
    return 0


def _worst_first(t) -> float:
    """--top's order: tensors that are not finite (no SQNR), then the lowest SQNR."""
    return t.stats.sqnr_db if t.stats is not None else -math.inf


def _error_row(t, width: int) -> str:
    head = f"{t.name:{width}} {_shape(t.shape):>14} {t.dtype:>5}"
    if t.nonfinite:
        count, first = t.nonfinite
        return f"{head} not finite: {count} NaN/inf value(s), the first at {list(first)}; not quantized"
    s = t.stats
    return (f"{head} {_fmt_db(s.sqnr_db)} {s.max_abs:10.3e} {s.mean_abs:10.3e} {s.rel:8.4f} {s.outliers:8d} "
            f"{8 * t.stored_bytes / math.prod(t.shape):10.3f}")


def _error_summary(reports) -> str:
    quantized = [t for t in reports if t.stats is not None]
    bad = len(reports) - len(quantized)
    text = f"{len(reports)} tensors" + (f" ({bad} not finite, not quantized)" if bad else "")
    if not quantized:
        return text
    return f"{text}, SQNR dB {_sqnr_summary(quantized)}; outliers {sum(t.stats.outliers for t in quantized)}"


def _plot(rows, out) -> None:
    """Error histograms of up to 12 tensors, saved as PNG into the convert.OutputFile out."""
    import matplotlib.pyplot as plt

    rows = rows[:12]
    cols = min(3, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, t in zip(axes.flat, rows):
        counts, lo, hi = t.stats.hist
        width = (hi - lo) / len(counts)
        centers = [lo + (i + 0.5) * width for i in range(len(counts))]
        ax.bar(centers, counts, width=width, color="tab:blue", log=True)
        ax.set_title(f"{t.name[-45:]}\nSQNR {t.stats.sqnr_db:.1f} dB", fontsize=8)
        ax.set_xlabel("(w - w_hat) / std(w)", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    try:
        with out.writing():
            fig.savefig(out.file, format="png", dpi=100)
    finally:
        plt.close(fig)
    out.commit()


def _options(args):
    from . import convert

    return convert.QuantOptions(
        blocksize=args.blocksize,
        quant_type=args.quant_type,
        double_quant=not args.no_double_quant,
        quant_storage=args.quant_storage,
        compute_dtype=getattr(args, "compute_dtype", "bfloat16"),
        skip=args.skip,
    )


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of the other failures."""

    def error(self, message: str):
        self.exit(2, f"nf4kern: error: {message} (see '{self.prog} --help')\n")


def _quant_arguments(p: argparse.ArgumentParser, compute_dtype: bool) -> None:
    p.add_argument("--blocksize", type=int, default=64, choices=cb.BLOCKSIZES, metavar="N",
                   help=f"elements per absmax block, one of {', '.join(map(str, cb.BLOCKSIZES))} (default 64)")
    p.add_argument("--quant-type", choices=cb.QUANT_TYPES, default="nf4", help="4-bit format (default nf4)")
    p.add_argument("--no-double-quant", action="store_true", help="keep absmax in float32 (default: 8-bit nested absmax)")
    p.add_argument("--quant-storage", choices=("uint8", "float16", "bfloat16", "float32"), default="uint8",
                   help="dtype the packed bytes are stored as (bnb_4bit_quant_storage; default uint8)")
    if compute_dtype:
        p.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                       help="bnb_4bit_compute_dtype written to config.json (default bfloat16)")
    p.add_argument("--skip", metavar="REGEX",
                   help="tensors whose name matches are not quantized either (default: none with a model's "
                   "config.json; by name, it replaces the default: embeddings, lm_head, norms)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only on a terminal anyway)")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="nf4kern", description="NF4/FP4 quantization, bit-exact with bitsandbytes")
    commands = parser.add_subparsers(dest="command", required=True)
    p_demo = commands.add_parser("demo", help="the end-to-end job: quantize, measure, fine-tune, save and reload a real model")
    p_demo.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    p_demo.add_argument("--out", default="demo-out", help="folder for the loss plot and the adapter")
    p_report = commands.add_parser("report", help="quantization report on built-in example weights")
    p_report.add_argument("--size", type=int, default=1024, help="side of the square example weights")
    p_quant = commands.add_parser(
        "quantize", help="quantize a float safetensors checkpoint to bitsandbytes' 4-bit layout",
        description="Quantize the eligible weights of a safetensors file or a Hugging Face folder (model.safetensors "
        "or sharded with an index) to 4 bits with bitsandbytes' keys; other tensors are copied unchanged. A folder "
        "gets config.json's quantization_config. Eligible, for a folder whose config.json transformers can build: "
        "the weights of the modules transformers' bitsandbytes 4-bit loading turns into Linear4bit (nn.Linear; "
        "Conv1D, as in GPT-2, transposed), not output embeddings (lm_head), tied weights or _keep_in_fp32_modules. "
        "Otherwise (a lone .safetensors file, no config.json, transformers missing): chosen by name, every floating "
        "2-D '*.weight' but embeddings, lm_head and norms, which cannot tell Conv1D or other non-Linear 2-D "
        "weights from Linear ones.",
    )
    p_quant.add_argument("input", metavar="IN", help="a .safetensors file or a Hugging Face model folder")
    p_quant.add_argument("output", metavar="OUT", help="output file (for a file IN) or folder (for a folder IN)")
    _quant_arguments(p_quant, compute_dtype=True)
    p_insp = commands.add_parser("inspect", help="per-tensor quantization error of a checkpoint")
    p_insp.add_argument("file", metavar="FILE", help="a .safetensors file or a Hugging Face model folder")
    _quant_arguments(p_insp, compute_dtype=False)
    p_insp.add_argument("--plot", metavar="OUT.png", help="write error histograms to a PNG (needs matplotlib)")
    p_insp.add_argument("--top", type=int, metavar="N", help="only the N tensors with the lowest SQNR")
    p_bench = commands.add_parser(
        "bench", help="microbenchmarks against bitsandbytes and torch on this machine, as tables",
        description="Quantize/dequantize, the NF4 matmul (forward and forward + backward) and the QLoRA layer, "
        "nf4kern against bitsandbytes, torch bf16 and PEFT, measured now on CUDA if available, else the CPU. "
        "Every number is measured in the run; peers not installed are named as such.",
    )
    p_bench.add_argument("--quick", action="store_true", help="a small subset of each benchmark")
    p_bench.add_argument("--only", choices=BENCHMARKS, help="run one benchmark")
    p_bench.add_argument("--shapes", type=_benchmark_arg("parse_shapes"), metavar="NxK,...",
                         help="matmul: (N, K) weight shapes instead of the grid's (e.g. 4096x14336)")
    p_bench.add_argument("--m", type=_benchmark_arg("parse_ms"), metavar="M,...", help="matmul: rows of x instead of the grid's")
    args = parser.parse_args(argv)
    if args.command == "bench":
        if (args.shapes or args.m) and args.only not in (None, "matmul"):
            p_bench.error(f"--shapes and --m apply to the matmul benchmark, not --only {args.only}")
        return bench(args)
    if args.command == "demo":
        return _run(_demo, args, interrupted="interrupted")
    if args.command == "report":
        return report(args.size)
    return _run(quantize if args.command == "quantize" else inspect, args)


def _benchmark_arg(name: str):
    """An argparse type from nf4kern.benchmarks.matmul's parser `name` (its ValueError: one line)."""
    def convert(text: str):
        from .benchmarks import matmul

        try:
            return getattr(matmul, name)(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def bench(args) -> int:
    """Run the benchmarks on the device at hand and print each table as it completes (progress on
    stderr)."""
    from .benchmarks import common, lora, matmul, quant

    device = common.device_kind()
    mode = "quick" if args.quick else "default"
    print(f"nf4kern bench: {common.machine()}" + (" (--quick subset)" if args.quick else ""), flush=True)
    runs = {
        "quant": lambda: quant.run(device, quant.QUICK_SIZE if args.quick else quant.SIZE),
        "matmul": lambda: matmul.run(device, mode, args.shapes, args.m),
        "lora": lambda: lora.run(device, mode),
    }
    try:
        for name in [args.only] if args.only else BENCHMARKS:
            print("\n" + runs[name]().render(), flush=True)
    except KeyboardInterrupt as e:
        return _fail("interrupted", e, status=130)
    return 0


def _demo(args) -> int:
    from . import demo

    demo.run(steps=args.steps, out_dir=args.out)
    return 0


def _run(command, args, interrupted: str = "interrupted; no output was written") -> int:
    """Run a command; expected failures become one line on stderr (NF4KERN_DEBUG=1: raise)."""
    from .convert import ConvertError

    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _terminate)  # cleanup runs on kill as on Ctrl-C
    except ValueError:  # not the main thread
        previous = None
    try:
        return command(args)
    except ConvertError as e:
        return _fail(str(e), e)
    except BrokenPipeError:
        return _reader_gone()
    except OSError as e:
        return _fail(_os_error(e), e)
    except KeyboardInterrupt as e:
        return _fail(interrupted, e, status=130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _reader_gone() -> int:
    """stdout's reader exited (`nf4kern inspect ... | head`): stop quietly, as a shell tool does.
    stdout goes to /dev/null so that Python's final flush cannot fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141  # 128 + SIGPIPE, what the shell reports for a tool killed by the closed pipe


def _fail(message: str, exc: BaseException, status: int = 1) -> int:
    if os.environ.get("NF4KERN_DEBUG"):
        raise exc
    sys.stdout.flush()
    sys.stderr.write(f"nf4kern: error: {' '.join(message.split())}\n")
    return status


def _os_error(e: OSError) -> str:
    reason = e.strerror or str(e)
    if e.errno == 28:
        reason = "no space left on device"
    if e.filename is not None:
        target = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return f"{target}: {reason}"
    return reason


if __name__ == "__main__":
    sys.exit(main())
