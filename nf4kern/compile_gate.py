"""Ahead-of-time compile gate: `python -m nf4kern.compile_gate`.

Compiles every kernel listed in the COMPILE_SPECS of every module of nf4kern.kernels for sm_80
and sm_90 (no GPU needed), prints registers, spills, shared memory and whether the PTX holds
wgmma, and exits non-zero on a compile error, a spill, a missing required wgmma, or a forbidden
PTX instruction.

Registers and spills: Triton reads n_regs / n_spills from the driver when it loads a kernel
(CompiledKernel._init_handles, which needs a GPU), so the gate runs the bundled ptxas with -v on
the kernel's PTX, with the flags Triton's own cubin stage uses, and parses its report. Shared
memory is Triton's allocation (metadata.shared).

Kernels cannot be compiled from a process where TRITON_INTERPRET is set (triton.jit then builds
interpreter functions), so main() re-runs itself in a clean subprocess in that case.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

TARGETS = (80, 90)
_INTERPRET_VAR = "TRITON_INTERPRET"


@dataclass
class KernelSpec:
    """One kernel configuration to compile ahead of time."""

    name: str
    fn: Any  # a triton.jit function
    signature: dict  # {arg_name: "*fp32" | "i32" | "i64" | "fp32" | "constexpr", ...}, every argument
    constexprs: dict = field(default_factory=dict)  # {arg_name: value}
    num_warps: int = 4
    num_stages: int = 3
    require_wgmma_on: tuple = ()  # capabilities whose PTX must hold wgmma (e.g. (90,))
    attrs: dict | None = None  # ASTSource attrs, e.g. {(i,): [["tt.divisibility", 16]]}
    enable_fp_fusion: bool = False  # nf4kern launches every kernel with fusion off
    maxnreg: int | None = None
    forbid_ptx: tuple = ()  # regexes that must not match the PTX


@dataclass
class Result:
    spec: str
    module: str
    target: int
    ok: bool
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    wgmma: bool | None = None
    error: str = ""


def _interpreting() -> bool:
    return os.environ.get(_INTERPRET_VAR, "0").lower() not in ("", "0", "false", "off", "no")


def _as_spec(s) -> KernelSpec:
    if isinstance(s, KernelSpec):
        return s
    if dataclasses.is_dataclass(s) and not isinstance(s, type):
        s = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    if isinstance(s, dict):
        names = {f.name for f in dataclasses.fields(KernelSpec)}
        return KernelSpec(**{k: v for k, v in s.items() if k in names})
    raise TypeError(f"a COMPILE_SPECS entry must be a KernelSpec or a dict, got {type(s).__name__}")


def kernel_modules() -> list[str]:
    import nf4kern.kernels as pkg

    return [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]


def collect(modules: list[str], only: str | None = None) -> list[tuple[str, KernelSpec]]:
    out = []
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        for s in getattr(mod, "COMPILE_SPECS", ()):
            spec = _as_spec(s)
            if only is None or re.search(only, spec.name):
                out.append((mod_name, spec))
    return out


# ------------------------------------------------------------------------------------------------
# ptxas
# ------------------------------------------------------------------------------------------------


def _ptxas_path(capability: int) -> str:
    from triton.backends.nvidia import compiler as nv

    try:  # Triton >= 3.5: a ptxas per architecture family
        return nv.get_ptxas(capability).path
    except TypeError:
        return nv.get_ptxas().path


def _gpu_name(capability: int) -> str:
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    return sm_arch_from_capability(capability)


def _triton_ptxas_flag(flag: str) -> bool:
    """Whether this Triton's cubin stage passes `flag` to ptxas (3.9 does; older releases may not)."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend

    try:
        return flag.lstrip("-").split("=")[0] in inspect.getsource(CUDABackend.make_cubin)
    except (OSError, TypeError):
        return False


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(ptx: str, capability: int, enable_fp_fusion: bool) -> dict:
    """Registers, stack frame and spill bytes, from `ptxas -v` run with Triton's cubin flags."""
    from triton import knobs

    ptxas = _ptxas_path(capability)
    extra = knobs.nvidia.ptxas_options.split() if knobs.nvidia.ptxas_options else []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        base = [ptxas, "-lineinfo", *([] if enable_fp_fusion else ["--fmad=false"]), "-v"]
        if _triton_ptxas_flag("--regAllocOptLevel=2"):
            base.append("--regAllocOptLevel=2")
        cmd = [*base, *extra, f"--gpu-name={_gpu_name(capability)}", src, "-o", os.path.join(d, "k.cubin")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"ptxas -v failed:\n{log[-2000:]}")
    regs, spill = _RE_REGS.search(log), _RE_SPILL.search(log)
    if regs is None or spill is None:
        raise RuntimeError(f"cannot parse the ptxas report:\n{log[-2000:]}")
    return {"regs": int(regs.group(1)), "stack": int(spill.group(1)),
            "spill_stores": int(spill.group(2)), "spill_loads": int(spill.group(3))}


# ------------------------------------------------------------------------------------------------
# Compiling
# ------------------------------------------------------------------------------------------------


def compile_one(mod_name: str, spec: KernelSpec, capability: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(spec.name, mod_name.rsplit(".", 1)[-1], capability, ok=False)
    try:
        src = ASTSource(spec.fn, dict(spec.signature), dict(spec.constexprs), spec.attrs or {})
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                   "enable_fp_fusion": spec.enable_fp_fusion}
        if spec.maxnreg is not None:
            options["maxnreg"] = spec.maxnreg
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
        ptx = kernel.asm["ptx"]
        res.shared = int(kernel.metadata.shared)
        res.wgmma = "wgmma" in ptx
        rep = ptxas_report(ptx, capability, spec.enable_fp_fusion)
        res.regs, res.stack = rep["regs"], rep["stack"]
        res.spill_stores, res.spill_loads = rep["spill_stores"], rep["spill_loads"]
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the gate
        msg = str(e).strip().splitlines()
        res.error = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
        return res
    problems = []
    if res.spill_stores or res.spill_loads:
        problems.append(f"spills {res.spill_stores} B stored / {res.spill_loads} B loaded")
    if capability in tuple(spec.require_wgmma_on) and not res.wgmma:
        problems.append("no wgmma in the PTX")
    for pattern in spec.forbid_ptx:
        hit = re.search(pattern, ptx)
        if hit:
            problems.append(f"forbidden PTX {hit.group(0)!r}")
    res.error = "; ".join(problems)
    res.ok = not problems
    return res


def _run_all(jobs: list[tuple[str, KernelSpec, int]], workers: int) -> list[Result]:
    if workers <= 1 or len(jobs) <= 1:
        return [compile_one(*j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    global _JOBS
    _JOBS = jobs  # inherited by the forked workers (jit functions do not pickle)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as ex:
        return list(ex.map(_compile_index, range(len(jobs))))


_JOBS: list = []


def _compile_index(i: int) -> Result:
    return compile_one(*_JOBS[i])


def format_table(results: list[Result]) -> str:
    head = ("kernel", "module", "target", "regs", "spills", "smem", "wgmma", "status")
    rows = []
    for r in results:
        spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        rows.append((r.spec, r.module, f"sm_{r.target}", "-" if r.regs is None else str(r.regs), spills,
                     "-" if r.shared is None else str(r.shared),
                     "-" if r.wgmma is None else ("yes" if r.wgmma else "no"),
                     "ok" if r.ok else f"FAIL {r.error}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m nf4kern.compile_gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--module", action="append", dest="modules",
                   help="a module holding COMPILE_SPECS (repeatable; default: every nf4kern.kernels module; "
                        "a bare name means nf4kern.kernels.NAME)")
    p.add_argument("--only", help="regex: compile only the specs whose name matches")
    p.add_argument("--target", type=int, action="append", dest="targets",
                   help="compute capability (repeatable; default 80 and 90)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="parallel compiles")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _interpreting():
        # Kernels imported here would be interpreter functions: compile in a clean process.
        env = {k: v for k, v in os.environ.items() if k != _INTERPRET_VAR}
        return subprocess.run([sys.executable, "-m", "nf4kern.compile_gate", *argv], env=env).returncode
    args = _parse(argv)
    modules = [m if "." in m else f"nf4kern.kernels.{m}" for m in (args.modules or kernel_modules())]
    try:
        specs = collect(modules, args.only)
    except Exception as e:  # noqa: BLE001
        print(f"compile gate: cannot collect specs: {type(e).__name__}: {e}")
        return 2
    targets = tuple(args.targets or TARGETS)
    jobs = [(m, s, cc) for m, s in specs for cc in targets]
    results = _run_all(jobs, args.jobs)
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)}/{len(results)} compiled clean "
          f"({len(specs)} specs x {len(targets)} targets, {len(modules)} modules)")
    if not specs:
        print("compile gate: no specs found")
        return 2
    if failed:
        print(f"compile gate: {len(failed)} FAILED")
        for r in failed:
            print(f"  {r.spec} sm_{r.target}: {r.error}")
        return 1
    return 0


if __name__ == "__main__":
    # Run the importable module's main so that kernel modules and the gate share one KernelSpec.
    from nf4kern.compile_gate import main as _main

    sys.exit(_main())
