"""`python -m nf4kern.selfcheck [--device cuda|cpu] [--large]`: every Triton kernel, run on this
machine, against the float64 reference; one line per case, exit status 1 if any case fails.

The test suite runs the kernels in Triton's interpreter on the CPU; this is the check to run where
they compile for real, on a GPU. On the CPU it runs the same cases in the interpreter
(TRITON_INTERPRET=1 is set before triton is imported). Cases: quantize and dequantize (bytes,
scales and values equal to the reference's), nf4_linear (forward, dx, dbias) and qlora_linear
(forward, dx, dA, dB, dbias, with and without dropout) within a relative RMS bound per dtype, and
every autotuning candidate of the fused matmuls (each config and split-K size the tuner may pick);
with --large on a GPU, tensors past 2**31 elements.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Relative RMS error allowed against float64, by activation dtype: one rounding of the operands
# and of the result, fp32 accumulation (3xTF32 dots for fp32 on a GPU).
RMS_BOUND = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# (M, N, K, blocksize): odd sizes, K not a multiple of the blocksize (blocks straddle rows),
# M = 1 (GEMV), small M (split-K) and M > 64 (tiled GEMM).
MATMUL_SHAPES = [(1, 33, 200, 64), (3, 17, 130, 64), (17, 40, 96, 32), (65, 33, 256, 64)]
LARGE_MATMUL_SHAPES = [(1, 4096, 4096, 64), (16, 4096, 14336, 64), (300, 4096, 4096, 64), (4096, 1024, 4096, 64)]
# (pass, M, N, K, dtype): split-K sizes (M <= 64) and the large-M GEMM with its alternates.
CANDIDATE_CASES = [("fwd", 1, 33, 1024, torch.bfloat16), ("fwd", 17, 40, 1024, torch.float16),
                   ("fwd", 70, 33, 256, torch.bfloat16), ("dx", 3, 1040, 64, torch.bfloat16),
                   ("dx", 130, 17, 128, torch.float16)]
LARGE_CANDIDATE_CASES = [("fwd", 16, 4096, 14336, torch.bfloat16), ("fwd", 300, 4096, 4096, torch.bfloat16),
                         ("dx", 16, 4096, 14336, torch.bfloat16), ("dx", 300, 4096, 4096, torch.float16)]
# Past 2**31 elements (64-bit offsets in every kernel; GPU only: the interpreter is far too slow):
# a weight that is zero but for its last blocks / rows, which are checked against the reference
# run on them alone.
HUGE_ELEMENTS = 2**31 + 4096 * 3 + 64 * 5 + 7
HUGE_LINEAR = (2**31 // 4096 + 5, 4096)  # (N, K): N * K > 2**31
QUANT_SHAPES = [((33, 200), 64), ((4099,), 4096), ((3, 5, 7), 32)]
LARGE_QUANT_SHAPES = [((4096, 14336), 64)]


@dataclass
class Result:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name:<58} {self.detail}"


def rms_ratio(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def _compare(name: str, pairs: dict, dtype: torch.dtype) -> Result:
    ratios = {what: rms_ratio(out, ref) for what, (out, ref) in pairs.items()}
    bound = RMS_BOUND[dtype]
    detail = " ".join(f"{what} {r:.1e}" for what, r in ratios.items()) + f" (bound {bound:.0e})"
    return Result(name, all(r < bound for r in ratios.values()), detail)


def check_quant(shape, blocksize, quant_type, double_quant, dtype, device, gen) -> Result:
    """quantize_4bit / dequantize_4bit on the Triton backend equal the reference bit for bit."""
    import nf4kern

    name = f"quant {quant_type} dq={int(double_quant)} {str(dtype)[6:]} {tuple(shape)} bs{blocksize}"
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    packed, state = nf4kern.quantize_4bit(w.to(device), blocksize, quant_type, double_quant, backend="triton")
    ref_packed, ref_state = nf4kern.quantize_4bit(w, blocksize, quant_type, double_quant, backend="reference")
    checks = {"packed": (packed, ref_packed), "absmax": (state.absmax, ref_state.absmax)}
    if double_quant:
        checks |= {"nested": (state.state2.absmax, ref_state.state2.absmax), "offset": (state.offset, ref_state.offset)}
    checks["dequantized"] = (nf4kern.dequantize_4bit(packed, state, backend="triton"),
                             nf4kern.dequantize_4bit(ref_packed, ref_state, backend="reference"))
    differ = [what for what, (a, b) in checks.items() if not _same_bits(a, b)]
    return Result(name, not differ, "bit-exact" if not differ else "differs: " + ", ".join(differ))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    same_kind = a.shape == b.shape and a.dtype == b.dtype
    return same_kind and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _weight(N, K, blocksize, quant_type, device, gen):
    import nf4kern

    w = torch.randn(N, K, generator=gen) * (0.01 + 0.05 * torch.rand(N, 1, generator=gen))
    return nf4kern.quantize_4bit(w.to(device), blocksize, quant_type, double_quant=True, backend="triton")


def check_linear(M, N, K, blocksize, quant_type, dtype, device, gen) -> Result:
    """nf4_linear forward, dx and dbias against float64."""
    import nf4kern
    from nf4kern import reference

    packed, state = _weight(N, K, blocksize, quant_type, device, gen)
    x = torch.randn(M, K, generator=gen).to(dtype).to(device).requires_grad_()
    bias = (torch.randn(N, generator=gen) * 0.1).to(dtype).to(device).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(dtype).to(device)
    y = nf4kern.nf4_linear(x, packed, bias, state, backend="triton")
    y.backward(dy)
    pairs = {"y": (y, reference.matmul(x, packed, state, bias)),
             "dx": (x.grad, reference.matmul_dx(dy, packed, state)),
             "dbias": (bias.grad, dy.detach().cpu().double().sum(0))}
    return _compare(f"nf4_linear {quant_type} {str(dtype)[6:]} M={M} N={N} K={K} bs{blocksize}", pairs, dtype)


def check_qlora(M, N, K, blocksize, r, p, dtype, device, gen) -> Result:
    """qlora_linear forward and every gradient against float64, with the kernels' own dropout mask."""
    import nf4kern
    from nf4kern import reference
    from nf4kern.kernels import lora as lora_kernels

    packed, state = _weight(N, K, blocksize, "nf4", device, gen)
    x = torch.randn(M, K, generator=gen).to(dtype).to(device).requires_grad_()
    bias = (torch.randn(N, generator=gen) * 0.1).to(dtype).to(device).requires_grad_()
    A = (torch.randn(r, K, generator=gen) * 0.1).to(dtype).to(device).requires_grad_()
    B = (torch.randn(N, r, generator=gen) * 0.1).to(dtype).to(device).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(dtype).to(device)
    seed, scale = 1234, 2.0
    y = nf4kern.qlora_linear(x, packed, A, B, scale, bias, dropout=p, quant_state=state, seed=seed, backend="triton")
    y.backward(dy)
    keep = lora_kernels.keep_mask(seed, M, K, p, device).cpu() if p > 0 else None
    ref_y, _ = reference.lora_forward(x, packed, state, bias, A, B, scale, keep)
    ref_dx, ref_dA, ref_dB, ref_db = reference.lora_backward(dy, x, packed, state, A, B, scale, keep)
    pairs = {"y": (y, ref_y), "dx": (x.grad, ref_dx), "dA": (A.grad, ref_dA), "dB": (B.grad, ref_dB),
             "dbias": (bias.grad, ref_db)}
    return _compare(f"qlora_linear {str(dtype)[6:]} M={M} N={N} K={K} r={r} p={p}", pairs, dtype)


@contextlib.contextmanager
def _every_candidate(clock):
    """Within: a fused-matmul call tunes afresh on any device, timing each candidate launch with
    clock(run) instead of do_bench; the kernels' tuning state is restored on exit."""
    from nf4kern.kernels import matmul as mm

    saved = mm._tuning_wanted, mm._time_ms, mm._TUNED
    mm._tuning_wanted, mm._time_ms, mm._TUNED = (lambda device: True), clock, {}
    try:
        yield
    finally:
        mm._tuning_wanted, mm._time_ms, mm._TUNED = saved


def check_candidates(kind, M, N, K, dtype, device, gen) -> Result:
    """Every autotuning candidate of one fused forward or dx call, and the launch the tuner then
    keeps, against float64 (the output is poisoned before each launch)."""
    from nf4kern import reference
    from nf4kern.kernels import matmul as mm
    from nf4kern.matmul import _weight_args

    packed, state = _weight(N, K, 64, "nf4", device, gen)
    args = _weight_args(packed, state)
    if kind == "fwd":
        a = torch.randn(M, K, generator=gen).to(dtype).to(device)
        out = torch.empty(M, N, dtype=dtype, device=device)
        expect = reference.matmul(a, packed, state)
        call = lambda: mm.nf4_matmul(a, out=out, **args)  # noqa: E731
    else:
        a = torch.randn(M, N, generator=gen).to(dtype).to(device)
        out = torch.empty(M, K, dtype=dtype, device=device)
        expect = reference.matmul_dx(a, packed, state)
        call = lambda: mm.nf4_matmul_dx(a, out=out, **args)  # noqa: E731
    outputs = []

    def clock(run):
        out.fill_(float("nan"))
        run()
        outputs.append(out.clone())
        return float(len(outputs) % 3)  # scripted times: the kept launch differs by case

    with _every_candidate(clock):
        out.fill_(float("nan"))
        call()
    pairs = {f"#{i}": (o, expect) for i, o in enumerate(outputs)} | {"kept": (out, expect)}
    name = f"candidates {kind} {str(dtype)[6:]} M={M} N={N} K={K} ({len(outputs)} timed)"
    return _compare(name, pairs, dtype)


def check_huge_quant(n, dtype, device, gen, tail_blocks=7) -> Result:
    """quantize / dequantize of n elements, zero but for the last tail_blocks blocks and the partial
    one: their bytes, scales and values equal the reference's on that tail alone."""
    import nf4kern

    blocksize = 64
    start = max(0, (n // blocksize - tail_blocks) * blocksize)
    w = torch.zeros(n, dtype=dtype, device=device)
    tail = (torch.randn(n - start, generator=gen) * 0.05).to(dtype)
    w[start:] = tail.to(device)
    packed, state = nf4kern.quantize_4bit(w, blocksize, "nf4", backend="triton")
    ref_packed, ref_state = nf4kern.quantize_4bit(tail, blocksize, "nf4", backend="reference")
    values = nf4kern.dequantize_4bit(packed, state, backend="triton")
    checks = {"packed": (packed.reshape(-1)[start // 2:], ref_packed.reshape(-1)),
              "absmax": (state.absmax[start // blocksize:], ref_state.absmax),
              "dequantized": (values[start:], nf4kern.dequantize_4bit(ref_packed, ref_state, backend="reference")),
              "zeros": (values[:start].abs().amax() if start else torch.zeros((), dtype=dtype), torch.zeros((), dtype=dtype))}
    differ = [what for what, (a, b) in checks.items() if not _same_bits(a, b)]
    name = f"quant huge nf4 {str(dtype)[6:]} n={n} (2**31{n - 2**31:+d})"
    return Result(name, not differ, "tail bit-exact" if not differ else "differs: " + ", ".join(differ))


def check_huge_linear(N, K, M, dtype, device, gen, tail_rows=3) -> Result:
    """nf4_linear forward and dx on an [N, K] weight, zero but for its last tail_rows rows (K a
    multiple of the blocksize): the output columns / the dx from those rows against float64 on
    them alone, the other columns exactly zero."""
    import nf4kern
    from nf4kern import matmul as ops
    from nf4kern import reference

    r0 = N - tail_rows
    w = torch.zeros(N, K, dtype=torch.bfloat16, device=device)
    tail = (torch.randn(tail_rows, K, generator=gen) * 0.05).to(torch.bfloat16)
    w[r0:] = tail.to(device)
    packed, state = nf4kern.quantize_4bit(w, 64, "nf4", backend="triton")
    del w
    tail_packed, tail_state = nf4kern.quantize_4bit(tail, 64, "nf4", backend="reference")
    x = torch.randn(M, K, generator=gen).to(dtype).to(device)
    dy = torch.zeros(M, N, dtype=dtype, device=device)
    dy_tail = torch.randn(M, tail_rows, generator=gen).to(dtype)
    dy[:, r0:] = dy_tail.to(device)
    y = nf4kern.nf4_linear(x, packed, None, state, backend="triton")
    dx = ops.nf4_matmul_dx(dy, packed, state, backend="triton")
    pairs = {"y tail": (y[:, r0:], reference.matmul(x, tail_packed, tail_state)),
             "dx": (dx, reference.matmul_dx(dy_tail, tail_packed, tail_state))}
    result = _compare(f"nf4_linear huge {str(dtype)[6:]} M={M} N={N} K={K} (N*K = 2**31{N * K - 2**31:+d})",
                      pairs, dtype)
    if bool(y[:, :r0].any()):
        return Result(result.name, False, "output columns of zero rows are not zero; " + result.detail)
    return result


def cases(device: str, large: bool):
    """(callable, args) of every case, smallest first."""
    out = []
    for shape, bs in QUANT_SHAPES + (LARGE_QUANT_SHAPES if large else []):
        for quant_type in ("nf4", "fp4"):
            for dq in (False, True):
                for dtype in DTYPES:
                    out.append((check_quant, (shape, bs, quant_type, dq, dtype, device)))
    for M, N, K, bs in MATMUL_SHAPES + (LARGE_MATMUL_SHAPES if large else []):
        for dtype in DTYPES:
            out.append((check_linear, (M, N, K, bs, "nf4", dtype, device)))
        out.append((check_linear, (M, N, K, bs, "fp4", torch.bfloat16, device)))
    for M, N, K, bs in MATMUL_SHAPES + (LARGE_MATMUL_SHAPES[:3] if large else []):
        for p in (0.0, 0.1):
            out.append((check_qlora, (M, N, K, bs, 8, p, torch.bfloat16, device)))
    for kind, M, N, K, dtype in CANDIDATE_CASES + (LARGE_CANDIDATE_CASES if large else []):
        out.append((check_candidates, (kind, M, N, K, dtype, device)))
    if large and device == "cuda":
        out.append((check_huge_quant, (HUGE_ELEMENTS, torch.bfloat16, device)))
        for M in (1, 17, 300):
            out.append((check_huge_linear, (*HUGE_LINEAR, M, torch.bfloat16, device)))
    return out


def run(device: str, large: bool = False, out=None) -> int:
    """Run every case on `device`, print one line each (to stdout by default); the number of failures."""
    out = out or sys.stdout
    failures = 0
    for fn, args in cases(device, large):
        gen = torch.Generator().manual_seed(0)
        try:
            result = fn(*args, gen)
        except Exception as e:  # a kernel that fails to compile or launch is a failed case
            result = Result(f"{fn.__name__} {args[:-1]}", False, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        failures += not result.ok
        print(result.line(), file=out, flush=True)
    return failures


def _prepare_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("nf4kern.selfcheck: --device cuda, but torch sees no CUDA device")
    if device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("nf4kern.selfcheck: on the CPU the kernels run in Triton's interpreter, which must be "
                             "chosen before triton is imported: set TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nf4kern.selfcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the kernels run (default: cuda when there is one, else the CPU interpreter)")
    parser.add_argument("--large", action="store_true", help="add model-sized cases (slow in the interpreter)")
    args = parser.parse_args(argv)
    _prepare_device(args.device)
    failures = run(args.device, args.large)
    total = len(cases(args.device, args.large))
    print(f"{total - failures} of {total} cases passed on {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else " (Triton interpreter)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
