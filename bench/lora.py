"""QLoRA linear layer, forward + backward: nf4kern against PEFT + bitsandbytes and bf16 LoRA.

    python bench/lora.py [--full] [--size 4096] [--write-docs]

One layer of N = K = --size, bf16 activations, for M in {512, 4096, 16384}, r in {8, 16, 64},
LoRA dropout 0 and 0.1. Peers, measured in the same process on the same weight:

  nf4kern     QLoRALinear on a LinearNF4 (NF4, double quant, compute dtype bf16)
  PEFT+bnb    peft's lora.Linear4bit on bitsandbytes' Linear4bit (NF4, double quant, bf16)
  bf16 LoRA   peft's lora.Linear on a frozen bf16 nn.Linear

Time: median wall time of y = layer(x); y.backward(dy) (x requires grad). Memory:
  saved MiB  activation bytes autograd keeps between forward and backward: tensors saved during
             the forward (saved_tensors_hooks), each storage once, less those that are the layer's
             parameters, frozen weight or quantization state; exact on every device;
  peak MiB   on CUDA, torch.cuda.max_memory_allocated during forward + backward above what was
             allocated before it; on the CPU "not measured" (no allocator statistics there, and
             RSS deltas mostly show the allocator's caching).

On the CPU the default is a quick subset (M = 512, r in {8, 64}); --full runs the whole grid.
Rows not run say "not measured": nothing is estimated.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from nf4kern.nn import LinearNF4  # noqa: E402
from nf4kern.qlora import QLoRALinear  # noqa: E402

MS = (512, 4096, 16384)
RS = (8, 16, 64)
PS = (0.0, 0.1)
QUICK = {"M": (512,), "r": (8, 64)}
ALPHA = 16
NOT_MEASURED = "not measured"
GOAL_TEXT = {
    "cuda": "GPU goals: >= 1.5x PEFT+bnb, and within 1.15x of bf16 LoRA at M = 4096.",
    "cpu": "CPU goal: >= 2x PEFT+bnb.",
}


def cpu_bf16_note() -> str:
    """Whether the CPU multiplies bf16 natively: PEFT's bf16 matmuls (bitsandbytes dequantizes
    to bf16) are then about twice as fast as nf4kern's float32 ones."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "CPU bf16 instructions: unknown."
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if native:
        return f"This CPU multiplies bf16 natively ({', '.join(native)}): the peers' bf16 GEMMs run there, nf4kern's torch path multiplies in float32."
    return "This CPU has no native bf16 matmul (no avx512_bf16 / amx_bf16)."


def peers():
    """(bitsandbytes, peft) modules, or None where not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
    except ImportError:
        bnb = None
    try:
        import peft
    except ImportError:
        peft = None
    return bnb, peft


def build_layers(linear: nn.Linear, r: int, p: float, device: str) -> dict:
    """{peer name: layer in train mode, or the reason it is missing}."""
    bnb, peft = peers()
    layers = {}
    base = LinearNF4.from_linear(linear, compute_dtype=torch.bfloat16)
    layers["nf4kern"] = QLoRALinear(base, r, ALPHA, p).to(device).train()
    if peft is None:
        return layers | {"peft+bnb": "peft not installed", "bf16": "peft not installed"}
    config = peft.LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=p)
    if bnb is None:
        layers["peft+bnb"] = "bitsandbytes not installed"
    else:
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        q.load_state_dict(linear.state_dict())
        q = q.to(device)
        q.requires_grad_(False)
        layers["peft+bnb"] = PeftLinear4bit(q, "default", config=config, r=r, lora_alpha=ALPHA).train()
    from peft.tuners.lora.layer import Linear as PeftLinear

    dense = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        dense.weight.copy_(linear.weight)
    dense.requires_grad_(False)
    layers["bf16"] = PeftLinear(dense, "default", config=config, r=r, lora_alpha=ALPHA).to(device).train()
    return layers


def resident_storages(layer) -> set[int]:
    """Storages of the layer's parameters and 4-bit quantization state: resident anyway."""
    ptrs = set()
    for p in layer.parameters():
        ptrs.add(p.untyped_storage().data_ptr())
        state = getattr(p, "quant_state", None)
        while state is not None:
            for t in (state.absmax, state.code, getattr(state, "offset", None)):
                if isinstance(t, torch.Tensor):
                    ptrs.add(t.untyped_storage().data_ptr())
            state = getattr(state, "state2", None)
    return ptrs


def saved_activation_bytes(layer, x) -> int:
    """Bytes autograd keeps for backward beyond the layer's resident weights and adapter
    (saved tensors whose storage is not a parameter's or the quantization state's)."""
    resident = resident_storages(layer)
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in resident and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    return total


def measure(layer, x, dy, warmup: int, repeat: int) -> dict:
    def step():
        x.grad = None
        layer(x).backward(dy)

    ms = common.time_ms(step, warmup=warmup, repeat=repeat)
    out = {"ms": ms, "saved": saved_activation_bytes(layer, x), "peak": None}
    if x.is_cuda:
        torch.cuda.synchronize()
        x.grad = None
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated() - before
    return out


def run_case(M: int, r: int, p: float, size: int, device: str, warmup: int, repeat: int) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(size, size, bias=False).to(torch.bfloat16)
    nn.init.normal_(linear.weight, std=0.02)
    layers = build_layers(linear, r, p, device)
    x = torch.randn(M, size, dtype=torch.bfloat16, device=device, requires_grad=True)
    dy = torch.randn(M, size, dtype=torch.bfloat16, device=device)
    results = {}
    for name, layer in layers.items():
        if isinstance(layer, str):
            results[name] = layer
            continue
        try:
            results[name] = measure(layer, x, dy, warmup, repeat)
        except Exception as e:  # a peer that fails is reported, never estimated
            results[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        shown = results[name] if isinstance(results[name], str) else f"{results[name]['ms']:.1f} ms"
        print(f"  M={M} r={r} p={p} {name}: {shown}", flush=True)
    del layers, x, dy
    return results


def _mib(n) -> str:
    return NOT_MEASURED if n is None else f"{n / 2**20:.1f}"


def _cell(result, key, fmt=_mib) -> str:
    if result is None:
        return NOT_MEASURED
    if isinstance(result, str):
        return result
    return fmt(result[key])


def verdict(device: str, M: int, res: dict) -> str:
    ours, bnb, bf16 = res.get("nf4kern"), res.get("peft+bnb"), res.get("bf16")
    if not isinstance(ours, dict):
        return ""
    notes = []
    if isinstance(bnb, dict):
        goal = 1.5 if device == "cuda" else 2.0
        notes.append(("meets" if bnb["ms"] / ours["ms"] >= goal else "misses") + f" {goal}x vs PEFT+bnb")
    if device == "cuda" and M == 4096 and isinstance(bf16, dict):
        notes.append(("meets" if ours["ms"] / bf16["ms"] <= 1.15 else "misses") + " 1.15x of bf16")
    return "; ".join(notes)


def rows_for(device: str, results: dict) -> list[list]:
    rows = []
    for M in MS:
        for r in RS:
            for p in PS:
                res = results.get((M, r, p))
                if res is None:
                    rows.append([M, r, p] + [NOT_MEASURED] * 8 + [""])
                    continue
                ours, bnb, bf16 = (res.get(k) for k in ("nf4kern", "peft+bnb", "bf16"))
                ms = lambda v: f"{v:.1f}"  # noqa: E731
                speed = f"{bnb['ms'] / ours['ms']:.2f}x" if isinstance(ours, dict) and isinstance(bnb, dict) else "-"
                vs_bf16 = f"{ours['ms'] / bf16['ms']:.2f}x" if isinstance(ours, dict) and isinstance(bf16, dict) else "-"
                saved = " / ".join(_cell(v, "saved") for v in (ours, bnb, bf16))
                peak = " / ".join(_cell(v, "peak") for v in (ours, bnb, bf16)) if device == "cuda" else NOT_MEASURED
                rows.append([M, r, p, _cell(ours, "ms", ms), _cell(bnb, "ms", ms), _cell(bf16, "ms", ms), speed, vs_bf16,
                             saved, peak, verdict(device, M, res)])
    return rows


HEADERS = ["M", "r", "dropout", "nf4kern ms", "PEFT+bnb ms", "bf16 LoRA ms", "speedup vs PEFT+bnb",
           "nf4kern / bf16 time", "saved MiB (nf4kern / bnb / bf16)", "peak MiB (nf4kern / bnb / bf16)", "goal"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="N = K (default 4096)")
    parser.add_argument("--full", action="store_true", help="the whole grid on the CPU too (default there: a quick subset)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats (default 10 on CUDA, 5 on the CPU)")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    device = common.device_kind()
    if device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    quick = device == "cpu" and not args.full
    warmup, repeat = (3, args.repeat or 10) if device == "cuda" else (1, args.repeat or 5)
    grid = [(M, r, p) for M in MS for r in RS for p in PS
            if not quick or (M in QUICK["M"] and r in QUICK["r"])]
    results = {}
    for M, r, p in grid:
        results[(M, r, p)] = run_case(M, r, p, args.size, device, warmup, repeat)
    table = common.table(HEADERS, rows_for(device, results))
    subset = " (quick CPU subset: M = 512, r in {8, 64}; --full for the rest)" if quick else ""
    intro = (f"QLoRA linear forward + backward, N = K = {args.size}, bf16 x, NF4 double quant, "
             f"median of {repeat} after {warmup} warm-up{subset}. {GOAL_TEXT[device]}\n"
             + (f"{cpu_bf16_note()}\n" if device == "cpu" else "")
             + "saved MiB: activation bytes autograd keeps between forward and backward (each storage "
             "once; the layer's weights, adapter and quantization state excluded). "
             "peak MiB: CUDA max_memory_allocated above the resident state; not measured on the CPU.\n")
    print(f"{device}: {intro}\n{table}")
    if args.write_docs:
        body = f"## QLoRA linear forward + backward ({device})\n\n{common.stamp(common.command_line())}\n{intro}\n{table}\n"
        other = "cpu" if device == "cuda" else "cuda"
        placeholder = f"## QLoRA linear forward + backward ({other})\n\nnot measured\n"
        common.write_section(f"lora:{device}", body, {f"lora:{other}": placeholder})


if __name__ == "__main__":
    main()
