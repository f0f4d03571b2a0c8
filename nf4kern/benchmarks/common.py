"""Timing, machine description and table formatting shared by the benchmarks."""
from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

NOT_MEASURED = "not measured"


@dataclass
class Section:
    """One benchmark's result: a title, what was measured (intro), the markdown table and notes
    after it."""

    title: str
    intro: str
    table: str
    notes: str = ""

    def render(self, stamp: str = "") -> str:
        parts = [f"## {self.title}", stamp, self.intro, self.table, self.notes]
        return "\n\n".join(p.strip() for p in parts if p.strip()) + "\n"


def time_ms(fn, warmup: int = 5, repeat: int = 7, flush: torch.Tensor | None = None, slow_ms: float | None = None) -> float:
    """Median time of fn() in milliseconds after warm-up calls (see time_interleaved)."""
    result = time_interleaved({"fn": fn}, warmup, repeat, flush, slow_ms)["fn"]
    if isinstance(result, Exception):
        raise result
    return result


def time_interleaved(fns: dict, warmup: int = 5, repeat: int = 7, flush: torch.Tensor | None = None,
                     slow_ms: float | None = None) -> dict:
    """{name: median milliseconds of fns[name]()}, the timed calls taken in rounds that call every
    function once: drift in the machine's speed (frequency, a noisy neighbour on a VM) then reaches
    every peer alike instead of whichever ran during it, and the ratios between them hold.

    Warm-up calls come first (they also let the allocator settle: the first large allocations of
    a process are page-faulted in). On CUDA each call is timed by events, so launches queue
    behind the previous work instead of paying a host synchronisation each. `flush` (see
    cache_flusher) is overwritten before every timed call, outside the timing: the operands then
    come from memory, as in a model larger than the caches. A function whose first call takes
    longer than slow_ms gets that one warm-up and 3 timed calls, in the first rounds (emulated
    bf16 GEMMs on some CPUs take seconds). A function that raises is left out of the later rounds
    and its entry is the exception."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    results, samples, rounds = {}, {}, {}
    for name, fn in fns.items():
        try:
            slow = False
            for i in range(warmup):
                ms = _call_ms(fn)
                if i == 0 and slow_ms is not None and ms > slow_ms:
                    slow = True
                    break
            samples[name], rounds[name] = [], min(repeat, 3) if slow else repeat
        except Exception as e:
            results[name] = e
    for round_ in range(repeat):
        for name in [n for n in samples if round_ < rounds[n]]:
            if flush is not None:
                flush.zero_()
            try:
                samples[name].append(_call_ms(fns[name]))
            except Exception as e:
                results[name] = e
                del samples[name]
    results.update({name: statistics.median(s) for name, s in samples.items()})
    return {name: results[name] for name in fns}


def _call_ms(fn) -> float:
    """Milliseconds of one fn() call, to the end of the work it queued on a GPU."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def cache_flusher(device: str) -> torch.Tensor:
    """A buffer for time_ms(flush=): 256 MiB on CUDA (GPU L2 caches are at most ~100 MB); on the
    CPU four times the last-level cache the OS reports (at least 32 MiB), else 256 MiB."""
    nbytes = 256 * 2**20
    if device == "cpu":
        try:
            sizes = [p.read_text().strip() for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")]
            largest = max(int(s[:-1]) * 1024 ** "BKMG".index(s[-1].upper()) if not s[-1].isdigit() else int(s) for s in sizes)
            nbytes = max(32 * 2**20, 4 * largest)
        except (OSError, ValueError):
            pass
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def copy_bandwidth_gbs(nbytes: int, device: str) -> float:
    """Memory bandwidth measured now by a copy of nbytes (bytes read + written per second, GB/s)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=2, repeat=5)
    return 2 * nbytes / (ms * 1e6)


def gemm_tflops(size: int, device: str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Matmul throughput measured now on a size^3 product x @ w.t() (the layout of a linear
    layer), TFLOP/s."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    ms = time_ms(lambda: a @ b.t(), warmup=1, repeat=3)
    return 2 * size**3 / (ms * 1e9)


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # The vector ISA torch dispatches to: CPUs sold under one name differ (AVX2 vs AVX512), and
    # bitsandbytes' CPU kernels change with it.
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{cpu} ({isa}), {torch.get_num_threads()} threads (torch {torch.__version__}, CPU)"


def _cpu_flags() -> list[str] | None:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return None


def cpu_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX)."""
    return any(f in (_cpu_flags() or ()) for f in ("avx512_bf16", "amx_bf16"))


def cpu_bf16_note() -> str:
    """Whether the CPU multiplies bf16 natively; without it torch emulates bf16 GEMMs, slowly."""
    flags = _cpu_flags()
    if flags is None:
        return "CPU bf16 instructions: unknown."
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if native:
        return f"This CPU multiplies bf16 natively ({', '.join(native)})."
    return "This CPU has no native bf16 matmul (no avx512_bf16 / amx_bf16): torch emulates bf16 GEMMs."


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stamp(command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Measured {now} on {machine()}.\nCommand: `{command}`\n"


def progress(message: str) -> None:
    """Progress lines go to stderr: stdout carries only the tables."""
    print(message, file=sys.stderr, flush=True)


def failure(e: Exception) -> str:
    """A peer that fails is reported in its cell, never estimated."""
    return f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
