"""QLoRA: the adapter layer on a 4-bit base, model preparation, and PEFT-format adapters."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from .autograd import qlora_linear
from .functional import dequantize_4bit, quantize_4bit
from .nn import Linear4bit, LinearNF4, Params4bit

INITS = ("default", "gaussian")


class QLoRALinear(nn.Module):
    """y = base(x) + scaling * lora_B(lora_A(dropout(x))), fused into the 4-bit base matmul.

    lora_A is [r, in_features] and lora_B [out_features, r] (PEFT's shapes), float32;
    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
    """

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False, init: str = "default"):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if isinstance(base, Linear4bit):
            if not base.weight.bnb_quantized:
                raise ValueError("base Linear4bit is not quantized yet: move it to a device first")
        elif type(base) is nn.Linear:
            base = LinearNF4.from_linear(base)
        else:
            raise TypeError(f"base must be a Linear4bit or an nn.Linear, got {type(base).__name__}")
        base.requires_grad_(False)
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.merged = r, False
        self.set_hyperparameters(lora_alpha, lora_dropout, use_rslora)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.reset_lora_parameters(init)
        self.adapter_enabled = True
        self._unmerged_weight: Params4bit | None = None

    def set_hyperparameters(self, lora_alpha: float, lora_dropout: float, use_rslora: bool) -> None:
        """lora_alpha, dropout and rsLoRA, and the scaling they give (not while merged: the merged
        weight holds the old scaling)."""
        if self.merged:
            raise ValueError("unmerge() the adapter before changing its hyperparameters")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.lora_alpha, self.lora_dropout, self.use_rslora = lora_alpha, lora_dropout, use_rslora
        self.scaling = lora_alpha / (math.sqrt(self.r) if use_rslora else self.r)

    def reset_lora_parameters(self, init: str = "default") -> None:
        """PEFT's initialisations: A kaiming-uniform (a = sqrt(5)) or N(0, 1/r); B zero."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_layer(x)
        base = self.base_layer
        state = base._quant_state()
        inp_dtype = x.dtype
        if base.compute_dtype is not None:
            x = x.to(base.compute_dtype)
        bias = None if base.bias is None else base.bias.to(x.dtype)
        p = self.lora_dropout if self.training else 0.0
        y = qlora_linear(x, base.weight, self.lora_A, self.lora_B, self.scaling, bias, p, state)
        return y.to(inp_dtype)

    # -- adapter on/off and merging --------------------------------------------------------------

    def disable_adapter(self) -> None:
        self.adapter_enabled = False

    def enable_adapter(self) -> None:
        self.adapter_enabled = True

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in float32, [out_features, in_features]."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merge(self) -> None:
        """Fold the adapter into the 4-bit weight: dequantize, add scaling * B A in float32,
        re-quantize with the same settings (lossy, as any 4-bit merge). unmerge() restores the
        original bytes exactly."""
        if self.merged:
            return
        base = self.base_layer
        old = base.weight
        merged = dequantize_4bit(old.data, old.quant_state, dtype=torch.float32) + self.delta_weight()
        packed, state = quantize_4bit(merged, old.blocksize, old.quant_type, old.compress_statistics, old.quant_storage)
        state.dtype = old.quant_state.dtype
        self._unmerged_weight = old
        base.weight = Params4bit(packed, False, state, old.blocksize, old.compress_statistics, old.quant_type, old.quant_storage, base, True)
        base.quant_state = state
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.base_layer
        base.weight = self._unmerged_weight
        base.quant_state = self._unmerged_weight.quant_state
        self._unmerged_weight = None
        self.merged = False

    def merged_linear(self, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
        """A 16-bit nn.Linear holding dequantized base + scaling * B A (no re-quantization)."""
        base = self.base_layer
        w = dequantize_4bit(base.weight.data, base.weight.quant_state, dtype=torch.float32)
        if not self.merged:
            w = w + self.delta_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, merged={self.merged}"


# -- model preparation ---------------------------------------------------------------------------


def _output_head_names(model: nn.Module) -> set[str]:
    names = {"lm_head"}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        names |= {n for n, m in model.named_modules() if m is head}
    return names


def _is_target(name: str, module: nn.Module, target_modules, heads: set[str]) -> bool:
    if not (type(module) is nn.Linear or isinstance(module, Linear4bit)):
        return False
    if target_modules == "all-linear":
        return name not in heads and name.split(".")[-1] not in heads
    if isinstance(target_modules, str):  # a regular expression over the full module name
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def prepare_qlora(
    model: nn.Module,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules="all-linear",
    use_rslora: bool = False,
    init: str = "default",
    blocksize: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    verbose: bool = True,
) -> nn.Module:
    """Convert `model` in place and return it: every targeted Linear becomes a QLoRALinear on a
    frozen 4-bit base; every other parameter is frozen. target_modules: "all-linear" (every
    Linear but the output head), a list of names (a module matches its full name or a dotted
    suffix, as in PEFT) or a regular expression matched against full module names."""
    heads = _output_head_names(model)
    targets = [(n, m) for n, m in model.named_modules() if n and _is_target(n, m, target_modules, heads)]
    if not targets:
        raise ValueError(f"target_modules={target_modules!r} matches no Linear layer of the model")
    model.requires_grad_(False)
    for name, module in targets:
        if type(module) is nn.Linear:
            module = LinearNF4.from_linear(module, blocksize, double_quant, quant_type, compute_dtype)
        _set_submodule(model, name, QLoRALinear(module, r, lora_alpha, lora_dropout, use_rslora, init))
    if verbose:
        print(format_report(qlora_report(model)))
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of the submodule `name`, in that module's train/eval mode."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module.train(getattr(parent, child).training)
    setattr(parent, child, module)


def qlora_report(model: nn.Module) -> dict:
    """Trainable and total parameter counts and bytes (4-bit weights at their packed size,
    counted as the number of weights they hold)."""
    trainable = total = trainable_bytes = total_bytes = 0
    for p in model.parameters():
        nbytes = p.numel() * p.element_size()
        count = p.quant_state.numel if isinstance(p, Params4bit) and p.quant_state is not None else p.numel()
        total += count
        total_bytes += nbytes
        if p.requires_grad:
            trainable += count
            trainable_bytes += nbytes
    return {"trainable_params": trainable, "total_params": total, "trainable_bytes": trainable_bytes, "total_bytes": total_bytes}


def format_report(report: dict) -> str:
    share = 100 * report["trainable_params"] / max(report["total_params"], 1)
    return (
        f"trainable params: {report['trainable_params']:,} || all params: {report['total_params']:,} || "
        f"trainable: {share:.4f}% || bytes: {report['trainable_bytes']:,} trainable, {report['total_bytes']:,} in all"
    )


# -- PEFT-format adapters -----------------------------------------------------------------------

_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _adapters(model: nn.Module) -> list[tuple[str, QLoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]


def save_adapter(model: nn.Module, directory) -> None:
    """Write adapter_model.safetensors and adapter_config.json as PEFT does, so that
    peft.PeftModel.from_pretrained(base_model, directory) loads the adapter."""
    from safetensors.torch import save_file

    adapters = _adapters(model)
    if not adapters:
        raise ValueError("model has no QLoRALinear layers to save")
    first = adapters[0][1]
    for name, a in adapters:
        if (a.r, a.lora_alpha, a.lora_dropout, a.use_rslora) != (first.r, first.lora_alpha, first.lora_dropout, first.use_rslora):
            raise ValueError(f"{name}: adapters with different r/alpha/dropout/rslora cannot share one PEFT config")
    tensors = {}
    for name, a in adapters:
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.lora_A.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = a.lora_B.detach().contiguous().cpu()
    config = {
        "alpha_pattern": {},
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": first.lora_dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": first.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(name for name, _ in adapters),
        "task_type": None,
        "use_dora": False,
        "use_rslora": first.use_rslora,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / _WEIGHTS), metadata={"format": "pt"})
    (out / _CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load a LoRA adapter saved by PEFT (or save_adapter) into `model`: layers that are not yet
    QLoRALinear are converted (4-bit NF4 base) with the adapter's r, alpha, dropout and rslora;
    QLoRALinear layers take the adapter's alpha, dropout and rslora (and must have its r)."""
    from safetensors.torch import load_file

    path = Path(directory)
    for needed in (_CONFIG, _WEIGHTS):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"{path / needed} not found: not a PEFT adapter directory")
    config = json.loads((path / _CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path / _CONFIG}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise ValueError(f"{path / _CONFIG}: DoRA adapters are not supported")
    if config.get("alpha_pattern"):
        raise ValueError(f"{path / _CONFIG}: per-layer lora_alpha (alpha_pattern) is not supported")
    tensors = load_file(str(path / _WEIGHTS))
    hyper = (config["lora_alpha"], config.get("lora_dropout", 0.0), config.get("use_rslora", False))
    if not 0.0 <= hyper[1] < 1.0:
        raise ValueError(f"{path / _CONFIG}: lora_dropout must be in [0, 1), got {hyper[1]!r}")
    # Every layer is checked before any is changed: a bad adapter leaves the model as it was.
    layers = {name: _adapter_target(model, name, tensors, path) for name in sorted({_module_name(k) for k in tensors})}
    for name, (module, A, B) in layers.items():
        if isinstance(module, QLoRALinear):
            module.set_hyperparameters(*hyper)  # the adapter's scaling, not the layer's old one
        else:
            module = QLoRALinear(module, A.shape[0], *hyper)
            _set_submodule(model, name, module)
        with torch.no_grad():
            module.lora_A.copy_(A)
            module.lora_B.copy_(B)
    return model


def _adapter_target(model: nn.Module, name: str, tensors: dict, path: Path) -> tuple:
    """(the module `name` of `model`, the adapter's A, its B), after checking that they fit."""
    a_key, b_key = f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight"
    if a_key not in tensors or b_key not in tensors:
        raise ValueError(f"{path / _WEIGHTS}: {name} needs both lora_A and lora_B weights")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{path / _WEIGHTS}: the model has no module {name!r}") from None
    if not hasattr(module, "in_features"):
        raise ValueError(f"{path / _WEIGHTS}: {name} is a {type(module).__name__}, not a linear layer")
    r = int(tensors[a_key].shape[0])
    if isinstance(module, QLoRALinear):
        r = module.r
        if module.merged:
            raise ValueError(f"{name}: unmerge() the adapter before loading another into it")
    for key, shape in ((a_key, (r, module.in_features)), (b_key, (module.out_features, r))):
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{key}: shape {tuple(tensors[key].shape)} does not fit the layer's {shape}")
    return module, tensors[a_key], tensors[b_key]


def _module_name(key: str) -> str:
    match = re.fullmatch(r"base_model\.model\.(.+)\.lora_[AB](?:\.[^.]+)?\.weight", key)
    if not match:
        raise ValueError(f"unexpected adapter tensor {key!r}")
    return match.group(1)
