"""QLoRA linear layer, forward + backward: nf4kern against PEFT + bitsandbytes and bf16 LoRA.

One layer of N = K = size, bf16 activations, for M in {512, 4096, 16384}, r in {8, 16, 64},
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

Grids: "full" (everything), "default" (full on CUDA; on the CPU M = 512, r in {8, 64}) and
"quick" (one M, r = 16; on the CPU dropout 0 only). Calls over a second (emulated bf16 on
some CPUs) are timed 3 times after one warm-up. Rows not run say "not measured": nothing is estimated.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import common

MS = (512, 4096, 16384)
RS = (8, 16, 64)
PS = (0.0, 0.1)
SIZE = 4096
ALPHA = 16
SLOW_MS = 1000.0
NOT_MEASURED = common.NOT_MEASURED
GOAL_TEXT = {
    "cuda": "GPU goals: >= 1.5x PEFT+bnb, and within 1.15x of bf16 LoRA at M = 4096.",
    "cpu": "CPU goal: >= 2x PEFT+bnb.",
}
HEADERS = ["M", "r", "dropout", "nf4kern ms", "PEFT+bnb ms", "bf16 LoRA ms", "speedup vs PEFT+bnb",
           "nf4kern / bf16 time", "saved MiB (nf4kern / bnb / bf16)", "peak MiB (nf4kern / bnb / bf16)", "goal"]


def grid(device: str, mode: str) -> tuple[list[tuple[int, int, float]], str]:
    """The (M, r, dropout) cases of a mode ("full", "default" or "quick") and its description."""
    full = [(M, r, p) for M in MS for r in RS for p in PS]
    if mode == "full" or (mode == "default" and device == "cuda"):
        return full, ""
    if mode == "default":
        return [c for c in full if c[0] == 512 and c[1] in (8, 64)], " (CPU subset: M = 512, r in {8, 64})"
    if device == "cuda":
        return [c for c in full if c[0] == 4096 and c[1] == 16], " (quick subset: M = 4096, r = 16)"
    return [(512, 16, 0.0)], " (quick subset: M = 512, r = 16, dropout 0)"


def _peers():
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
    from nf4kern.nn import LinearNF4
    from nf4kern.qlora import QLoRALinear

    bnb, peft = _peers()
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

    ms = common.time_ms(step, warmup=warmup, repeat=repeat, slow_ms=SLOW_MS)
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
        except Exception as e:
            results[name] = common.failure(e)
        shown = results[name] if isinstance(results[name], str) else f"{results[name]['ms']:.1f} ms"
        common.progress(f"  lora M={M} r={r} p={p} {name}: {shown}")
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


def placeholder(device: str) -> common.Section:
    return common.Section(f"QLoRA linear forward + backward ({device})", NOT_MEASURED, "")


def run(device: str, mode: str = "default", size: int = SIZE, repeat: int | None = None) -> common.Section:
    warmup, repeat = (3, repeat or 10) if device == "cuda" else (1, repeat or 5)
    cases, subset = grid(device, mode)
    results = {(M, r, p): run_case(M, r, p, size, device, warmup, repeat) for M, r, p in cases}
    intro = (f"QLoRA linear forward + backward, N = K = {size}, bf16 x, NF4 double quant, "
             f"median of {repeat} after {warmup} warm-up, {min(repeat, 3)} after 1 for calls over {SLOW_MS / 1000:.0f} s{subset}. "
             f"{GOAL_TEXT[device]}\n"
             + (f"{common.cpu_bf16_note()}\n" if device == "cpu" else "")
             + "saved MiB: activation bytes autograd keeps between forward and backward (each storage "
             "once; the layer's weights, adapter and quantization state excluded). "
             "peak MiB: CUDA max_memory_allocated above the resident state; not measured on the CPU.")
    return common.Section(f"QLoRA linear forward + backward ({device})", intro, common.table(HEADERS, rows_for(device, results)))
