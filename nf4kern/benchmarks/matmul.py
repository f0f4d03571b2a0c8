"""NF4 linear y = x W^T, forward and forward + backward (dx only: the 4-bit weight is frozen).

Peers, measured in the same run on the same bf16 weight (NF4, blocksize 64, double quant):

  nf4kern         nf4kern.nf4_linear (the fused kernel: W is dequantized tile by tile)
  bf16            torch's bf16 matmul on the unquantized weight (cuBLAS on a GPU)
  bitsandbytes    bnb.nn.Linear4bit (compute dtype bf16) holding bitsandbytes' own quantization of
                  W: what a bitsandbytes user runs. In eval mode for the forward (on CPUs with
                  AVX512-BF16 it then repacks the weight for its native CPU kernel), in training
                  mode for forward + backward
  dequant+matmul  nf4kern.dequantize_4bit, then torch's matmul (again in backward), in bf16, or in
                  float32 on CPUs without native bf16 GEMM (as nf4kern's CPU path): the
                  candidate a dispatcher could pick for large M

Time: median of calls with the caches flushed before each (weights come from memory, as in a
model larger than the caches), the peers' calls interleaved round by round (a slow spell of the
machine reaches them all); forward runs under no_grad, forward + backward is y = f(x);
y.backward(dy). Calls over a second (emulated bf16 on some CPUs) are timed 3 times
after one warm-up. speedup = peer time / nf4kern time.
Roofline: bytes = the weight as stored (NF4 codes + scales, or bf16), read once per pass, plus
the activations read and written (x, y; and dy, dx in backward); FLOP = 2MNK per pass. GB/s and
TFLOP/s are these over the time; % roofline = max(bytes / bandwidth, FLOP / GEMM rate) / time,
with the copy bandwidth and the GEMM rate (bf16; on the CPU the faster of bf16 and float32)
measured in the same run.
"""
from __future__ import annotations

import itertools
import warnings

import torch
import torch.nn.functional as F

import nf4kern

from . import common

MS = (1, 16, 64, 256, 4096)
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (N, K)
PASSES = ("fwd", "fwd+bwd")
PEERS = ("nf4kern", "bf16", "bitsandbytes", "dequant+matmul")
NOT_MEASURED = common.NOT_MEASURED
SLOW_MS = 1000.0
# {mode: {pass: (Ms, shapes)}}; "full" is every pass over MS x SHAPES.
GRIDS = {
    ("cpu", "default"): {"fwd": ((1, 16, 64, 256), ((4096, 4096), (4096, 14336))),
                         "fwd+bwd": ((1, 64), ((4096, 4096), (4096, 14336)))},
    ("cpu", "quick"): {"fwd": ((1, 64), ((4096, 4096),)), "fwd+bwd": ((1, 64), ((4096, 4096),))},
    ("cuda", "quick"): {"fwd": ((1, 16, 4096), ((4096, 14336),)), "fwd+bwd": ((16, 4096), ((4096, 14336),))},
}
GOAL_TEXT = {
    "cuda": "GPU goals: M = 1 >= 3.0x bf16 and M = 16 >= 2.5x bf16 on 4096x14336 forward (the byte-count "
            "limit is 3.88x); M >= 4096 within 0.9x of bf16; faster than bitsandbytes at every M, forward and "
            "forward + backward.",
    "cpu": "CPU goals: >= 2x bitsandbytes at M = 1 (forward), >= 10x bitsandbytes forward + backward at M = 64.",
}
HEADERS = ["pass", "M", "N x K", "peer", "ms", "TFLOP/s", "GB/s", "% roofline", "nf4kern speedup", "goal"]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"4096x4096,4096x14336" -> [(4096, 4096), (4096, 14336)] as (N, K); ValueError names the bad item."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {item.strip()!r} is not NxK with positive integers (e.g. 4096x14336)")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def parse_ms(text: str) -> list[int]:
    """"1,16,64" -> [1, 16, 64]; ValueError names the bad item."""
    ms = []
    for item in text.split(","):
        if not item.strip().isdigit() or int(item) < 1:
            raise ValueError(f"M {item.strip()!r} is not a positive integer")
        ms.append(int(item))
    return ms


def goals(device: str, pass_: str, M: int, N: int, K: int) -> dict[str, float]:
    """{peer: least speedup (peer time / nf4kern time) the goals ask for} for one case."""
    out = {}
    if device == "cuda":
        out["bitsandbytes"] = 1.0
        if pass_ == "fwd" and (N, K) == (4096, 14336) and M in (1, 16):
            out["bf16"] = 3.0 if M == 1 else 2.5
        if M >= 4096:
            out["bf16"] = 0.9
    elif pass_ == "fwd" and M == 1:
        out["bitsandbytes"] = 2.0
    elif pass_ == "fwd+bwd" and M == 64:
        out["bitsandbytes"] = 10.0
    return out


def grid(device: str, mode: str, shapes=None, ms=None) -> list[tuple[str, int, int, int]]:
    """(pass, M, N, K) cases, shape by shape; shapes / ms replace the mode's."""
    per_pass = GRIDS.get((device, mode), {p: (MS, SHAPES) for p in PASSES})
    cases = []
    for pass_ in PASSES:
        mode_ms, mode_shapes = per_pass[pass_]
        cases += [(pass_, M, N, K) for (N, K), M in itertools.product(shapes or mode_shapes, ms or mode_ms)]
    return sorted(set(cases), key=lambda c: (PASSES.index(c[0]), c[2], c[3], c[1]))


def _dequantize_matmul(x, packed, state, dtype):
    w = nf4kern.dequantize_4bit(packed, state, dtype=dtype)
    return F.linear(x.to(dtype), w).to(x.dtype)


class _DequantizeMatmul(torch.autograd.Function):
    """x W^T with W dequantized whole by nf4kern's kernel, in forward and again in backward
    (only the packed weight is kept between them, as nf4_linear does)."""

    @staticmethod
    def forward(ctx, x, packed, state, dtype):
        ctx.args = (packed, state, dtype)
        return _dequantize_matmul(x, packed, state, dtype)

    @staticmethod
    def backward(ctx, dy):
        packed, state, dtype = ctx.args
        return (dy.to(dtype) @ nf4kern.dequantize_4bit(packed, state, dtype=dtype)).to(dy.dtype), None, None, None


def _bnb():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb


def _bnb_layer(bnb, w: torch.Tensor):
    """A bitsandbytes Linear4bit (NF4, blocksize 64, double quant, bf16 compute) quantizing w."""
    N, K = w.shape
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True, device="meta")
    layer.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, blocksize=64, compress_statistics=True,
                                     quant_type="nf4", module=layer)
    return layer.to(w.device)


def _state_bytes(state) -> int:
    """Bytes of a quantization state's tensors (absmax, code tables, nested state), either library's."""
    total = 0
    while state is not None:
        for t in (state.absmax, state.code, getattr(state, "offset", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        state = getattr(state, "state2", None)
    return total


class Weights:
    """One (N, K) weight, bf16 and quantized by each library, with each peer's op on it."""

    def __init__(self, N: int, K: int, device: str):
        self.compute = torch.bfloat16 if device == "cuda" or common.cpu_native_bf16() else torch.float32
        torch.manual_seed(0)
        self.w = (torch.randn(N, K, device=device) * 0.02).to(torch.bfloat16)
        self.packed, self.state = nf4kern.quantize_4bit(self.w, 64, "nf4", double_quant=True)
        self.nf4_bytes = self.packed.numel() * self.packed.element_size() + _state_bytes(self.state)
        bnb = _bnb()
        # bitsandbytes' layers for the forward (eval) and forward + backward (train) passes.
        self.bnb = None if bnb is None else {"fwd": _bnb_layer(bnb, self.w).eval(),
                                             "fwd+bwd": _bnb_layer(bnb, self.w).train()}

    def ops(self, pass_: str) -> dict:
        """{peer: x -> y, or the reason it is missing}."""
        packed, state, compute = self.packed, self.state, self.compute
        ops = {
            "nf4kern": lambda x: nf4kern.nf4_linear(x, packed, quant_state=state),
            "bf16": lambda x: F.linear(x, self.w),
            "bitsandbytes": "bitsandbytes not installed",
            "dequant+matmul": (lambda x: _DequantizeMatmul.apply(x, packed, state, compute)) if pass_ == "fwd+bwd"
            else lambda x: _dequantize_matmul(x, packed, state, compute),
        }
        if self.bnb is not None:
            ops["bitsandbytes"] = self.bnb[pass_]
        return ops

    def weight_bytes(self, peer: str) -> int:
        return self.w.numel() * 2 if peer == "bf16" else self.nf4_bytes


def _agrees(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same product as nf4kern's up to bf16 rounding and summation order (a broken peer must not
    look fast)."""
    return float((y.float() - ref.float()).norm()) <= 0.02 * float(ref.float().norm()) + 1e-6


def run_case(pass_: str, M: int, weights: Weights, device: str, warmup: int, repeat: int, flush) -> dict:
    """{peer: median ms, or why there is none}; the peers' calls interleaved (common.time_interleaved)."""
    N, K = weights.w.shape
    x = torch.randn(M, K, dtype=torch.bfloat16, device=device)
    dy = torch.randn(M, N, dtype=torch.bfloat16, device=device)
    results, timed = {}, {}
    ops = weights.ops(pass_)
    with torch.no_grad():
        ref = ops["nf4kern"](x)
    for peer, op in ops.items():
        why = op if isinstance(op, str) else None if peer in ("nf4kern", "bf16") else _disagreement(op, x, ref)
        if why is None:
            timed[peer] = _timed_call(pass_, op, x, dy)
        else:
            results[peer] = why
    for peer, ms in common.time_interleaved(timed, warmup, repeat, flush, SLOW_MS).items():
        results[peer] = common.failure(ms) if isinstance(ms, Exception) else ms
    for peer in ops:
        shown = results[peer] if isinstance(results[peer], str) else f"{results[peer]:.4g} ms"
        common.progress(f"  matmul {pass_} M={M} {N}x{K} {peer}: {shown}")
    return results


def _disagreement(op, x, ref) -> str | None:
    """None when op(x) agrees with nf4kern's result, else why it does not."""
    try:
        with torch.no_grad():
            return None if _agrees(op(x), ref) else "wrong result (differs from nf4kern's by > 2%)"
    except Exception as e:
        return common.failure(e)


def _timed_call(pass_: str, op, x, dy):
    """The call to time: op(x) under no_grad, or op(x).backward(dy)."""
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                op(x)
        return forward
    xg = x.clone().requires_grad_(True)

    def step():
        xg.grad = None
        op(xg).backward(dy)
    return step


def _rows(device: str, case, results: dict, weights: Weights, bandwidth: float, gemm: float) -> list[list]:
    pass_, M, N, K = case
    passes = 1 if pass_ == "fwd" else 2
    flop = 2 * M * N * K * passes
    ours = results.get("nf4kern")
    wanted = goals(device, pass_, M, N, K)
    rows = []
    for peer in PEERS:
        ms = results.get(peer, NOT_MEASURED)
        head = [pass_, M, f"{N}x{K}", peer]
        if isinstance(ms, str):
            rows.append(head + [ms, "-", "-", "-", "-", f">= {wanted[peer]}x: not measured" if peer in wanted else ""])
            continue
        nbytes = (weights.weight_bytes(peer) + 2 * M * (N + K)) * passes
        roofline_ms = max(nbytes / (bandwidth * 1e6), flop / (gemm * 1e9))
        speedup = f"{ms / ours:.2f}x" if peer != "nf4kern" and isinstance(ours, float) else "-"
        goal = ""
        if peer in wanted:
            met = NOT_MEASURED if speedup == "-" else "meets" if ms / ours >= wanted[peer] else "misses"
            goal = f">= {wanted[peer]}x: {met}"
        rows.append(head + [f"{ms:.4g}", f"{flop / (ms * 1e9):.3g}", f"{nbytes / (ms * 1e6):.3g}",
                            f"{100 * roofline_ms / ms:.0f}%", speedup, goal])
    return rows


def placeholder(device: str) -> common.Section:
    """The section for a device not measured yet: every case of the full grid, "not measured"."""
    rows = [[p, M, f"{N}x{K}", "all"] + [NOT_MEASURED] * 6 for p, M, N, K in grid(device, "full")]
    return common.Section(f"NF4 matmul ({device})", GOAL_TEXT[device], common.table(HEADERS, rows))


def run(device: str, mode: str = "default", shapes=None, ms=None, repeat: int | None = None) -> common.Section:
    """Measure the cases of `mode` ("full", "default": full on CUDA, a subset on the CPU; "quick"),
    shapes / ms replacing the mode's, and return the table."""
    warmup, repeat = (5, repeat or 20) if device == "cuda" else (2, repeat or 5)
    cases = grid(device, mode, shapes, ms)
    common.progress(f"  matmul: measuring the {device} copy bandwidth and GEMM rate")
    copy_mib, gemm_size = (1024, 8192) if device == "cuda" else (256, 1024)
    bandwidth = common.copy_bandwidth_gbs(copy_mib * 2**20, device)
    rates = {dt: common.gemm_tflops(gemm_size, device, dt)
             for dt in ((torch.bfloat16,) if device == "cuda" else (torch.bfloat16, torch.float32))}
    gemm_dtype = max(rates, key=rates.get)
    gemm = rates[gemm_dtype]
    flush = common.cache_flusher(device)
    rows, done, weights, shape = [], set(), None, None
    for case in cases:
        pass_, M, N, K = case
        if shape != (N, K):
            weights, shape = None, (N, K)  # frees the previous shape's tensors first
            try:
                weights = Weights(N, K, device)
            except Exception as e:  # e.g. out of memory: the shape's rows say so
                weights = common.failure(e)
        try:
            results = dict.fromkeys(PEERS, weights) if isinstance(weights, str) else \
                run_case(pass_, M, weights, device, warmup, repeat, flush)
        except Exception as e:
            results = dict.fromkeys(PEERS, common.failure(e))
        rows += _rows(device, case, results, weights, bandwidth, gemm)
        done.add(case)
    full = grid(device, "full")
    missing = [c for c in full if c not in done]
    intro = (f"bf16 x, NF4 blocksize 64 with double quant; median of {repeat} after {warmup} warm-up ({min(repeat, 3)} after 1 for "
             f"calls over {SLOW_MS / 1000:.0f} s), caches flushed before each, the peers' calls interleaved. {GOAL_TEXT[device]}\n"
             f"Roofline: copy bandwidth {bandwidth:.0f} GB/s ({copy_mib} MiB copy) and GEMM {gemm:.3g} TFLOP/s "
             f"({str(gemm_dtype).removeprefix('torch.')} {gemm_size}^3"
             + (f"; bf16 {rates[torch.bfloat16]:.3g}" if gemm_dtype != torch.bfloat16 else "")
             + "), both measured in this run."
             + (f"\n{common.cpu_bf16_note()}" if device == "cpu" else ""))
    verdicts = [row[-1].rsplit(": ", 1)[-1] for row in rows if row[-1]]
    summary = (f"Goals in this run: {verdicts.count('meets')} met, {verdicts.count('misses')} missed"
               + (f", {verdicts.count(NOT_MEASURED)} not measured" if NOT_MEASURED in verdicts else "") + ".")
    notes = "\n".join(n for n in (summary if verdicts else "", _missing_note(missing, len(full)),
                                  _tuning_note(device)) if n)
    return common.Section(f"NF4 matmul ({device})", intro, common.table(HEADERS, rows), notes)


def _tuning_note(device: str) -> str:
    """What nf4kern's autotuner kept for each shape it timed in this run (on a GPU)."""
    if device != "cuda":
        return ""
    from nf4kern.kernels import matmul as kernels

    lines = kernels.tuning_report()
    return "Autotuner's choices in this run:\n" + "\n".join(f"* {line}" for line in lines) if lines else ""


def _missing_note(missing: list, total: int) -> str:
    """The full grid's cases this run left out, grouped by pass and shape."""
    if not missing:
        return ""
    groups = {}
    for p, M, N, K in missing:
        groups.setdefault((p, f"{N}x{K}"), []).append(M)
    listed = "; ".join(f"{p} {shape}: " + ("all M" if len(m) == len(MS) else "M = " + ", ".join(map(str, m)))
                       for (p, shape), m in groups.items())
    return f"{NOT_MEASURED.capitalize()} ({len(missing)} of the full grid's {total} cases): {listed}."
