"""QLoRA on a 4-bit base: the fused op against the float64 reference and against PEFT +
bitsandbytes, dropout semantics, what autograd saves, gradient checkpointing, QLoRALinear,
prepare_qlora, PEFT-format adapters and a short training run side by side with PEFT.

Small shapes throughout: the whole file runs in well under a minute on two slow cores.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import nf4kern
from nf4kern import lora, reference, torch_ops
from nf4kern.autograd import qlora_linear
from nf4kern.nn import Linear4bit, LinearNF4
from nf4kern.qlora import QLoRALinear, load_adapter, prepare_qlora, qlora_report, save_adapter
from tests.helpers import assert_bytes_equal

# RMS error ratio ||out - ref|| / ||ref|| allowed for a result rounded to each dtype.
RMS_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
FP32_TOL = 2e-6  # dA and dB: float32 whatever x's dtype


def rms_ratio(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double().cpu()
    return ((out.detach().double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(shape, g, scale=1.0, dtype=torch.float32):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def quantized(N: int, K: int, g, double_quant=True):
    w = rand((N, K), g, 0.05)
    return nf4kern.quantize_4bit(w, 64, "nf4", double_quant)


# -- the fused op against the float64 reference ---------------------------------------------------

# (rank, x shape, N): odd in/out features, 2-D and 3-D x, ranks that are not multiples of 16 and
# one (256) larger than M, K and N.
SHAPES = {
    1: ((7, 72), 40),
    3: ((2, 5, 33), 17),
    16: ((9, 64), 48),
    17: ((3, 4, 50), 31),
    64: ((6, 40), 24),
    256: ((3, 24), 20),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("r", sorted(SHAPES))
def test_op_matches_reference(r, p, dtype):
    (x_shape, N) = SHAPES[r]
    K = x_shape[-1]
    case = r + int(p * 10) + len(str(dtype))
    use_bias, rslora = case % 2 == 0, case % 3 == 0
    g = gen(r * 100 + int(p * 10))
    packed, state = quantized(N, K, g, double_quant=r % 2 == 1)
    x = rand(x_shape, g, dtype=dtype).requires_grad_(True)
    A = rand((r, K), g, 1 / math.sqrt(K)).requires_grad_(True)
    B = rand((N, r), g, 0.5).requires_grad_(True)
    bias = rand((N,), g, dtype=dtype).requires_grad_(True) if use_bias else None
    scale = 16 / (math.sqrt(r) if rslora else r)
    seed = 1000 + r

    y = qlora_linear(x, packed, A, B, scale, bias, p, state, seed=seed)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], N)
    dy = rand(y.shape, g, dtype=dtype)
    y.backward(dy)

    x2, dy2 = x.detach().reshape(-1, K), dy.reshape(-1, N)
    keep = lora.keep_multiplier(seed, tuple(x2.shape), p, "cpu")
    y_ref, S_ref = reference.lora_forward(x2, packed, state, bias, A, B, scale, keep)
    dx_ref, dA_ref, dB_ref, dbias_ref = reference.lora_backward(dy2, x2, packed, state, A, B, scale, keep)

    tol = RMS_TOL[dtype]
    assert rms_ratio(y.reshape(-1, N), y_ref) < tol
    assert x.grad.dtype == dtype and rms_ratio(x.grad.reshape(-1, K), dx_ref) < tol
    assert A.grad.dtype == torch.float32 and rms_ratio(A.grad, dA_ref) < FP32_TOL
    assert B.grad.dtype == torch.float32 and rms_ratio(B.grad, dB_ref) < FP32_TOL
    if use_bias:
        assert bias.grad.dtype == dtype and rms_ratio(bias.grad, dbias_ref) < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_torch_path_rounds_once(dtype, monkeypatch):
    """y = x W_hat^T + b + s S B^T and dx = dy W_hat + dS A come out of the CPU path rounded to
    x's dtype once, as the float64 reference rounds them (rounding the base product first, then
    again after the adapter, made 24% of y and 10% of dx differ by an ulp). The float32 product
    (no native bf16 GEMM); a short K keeps its accumulation near exact."""
    monkeypatch.setattr(torch_ops, "native_bf16_matmul", lambda: False)
    g = gen(8)
    N, K, r, M = 96, 16, 4, 64
    packed, state = quantized(N, K, g)
    x, dy = rand((M, K), g, dtype=dtype), rand((M, N), g, dtype=dtype)
    A, B, bias = rand((r, K), g, 0.25), rand((N, r), g, 0.5), rand((N,), g, dtype=dtype)
    y, S = lora.lora_forward(x, packed, state, bias, A, B, 2.0, 0.0, 0, backend="torch")
    dx = lora.lora_backward(dy, x, S, packed, state, A, B, 2.0, 0.0, 0, (True, False, False, False), backend="torch")[0]
    y_ref, _ = reference.lora_forward(x, packed, state, bias, A, B, 2.0, None)
    dx_ref = reference.lora_backward(dy, x, packed, state, A, B, 2.0, None)[0]
    assert y.dtype == dtype and (y != y_ref.to(dtype)).float().mean().item() < 0.01
    assert (dx.to(dtype) != dx_ref.to(dtype)).float().mean().item() < 0.01


def test_op_gradients_only_where_needed():
    g = gen(5)
    packed, state = quantized(24, 40, g)
    x = rand((6, 40), g)
    A = rand((4, 40), g, 0.2).requires_grad_(True)
    B = rand((24, 4), g, 0.2)
    bias = rand((24,), g)
    y = qlora_linear(x, packed, A, B, 2.0, bias, 0.1, state, seed=3)
    dy = rand(y.shape, g)
    (dA,) = torch.autograd.grad(y, [A], dy)
    keep = lora.keep_multiplier(3, (6, 40), 0.1, "cpu")
    assert rms_ratio(dA, reference.lora_backward(dy, x, packed, state, A, B, 2.0, keep)[1]) < FP32_TOL
    assert x.grad is None and B.grad is None


def test_op_rejects_bad_adapter_shapes():
    g = gen(6)
    packed, state = quantized(24, 40, g)
    x, A, B = rand((3, 40), g), rand((4, 40), g), rand((24, 4), g)
    with pytest.raises(ValueError, match=r"lora_A must have shape \[r, 40\]"):
        qlora_linear(x, packed, A[:, :39], B, 1.0, quant_state=state)
    with pytest.raises(ValueError, match=r"lora_B must have shape \[24, 4\]"):
        qlora_linear(x, packed, A, B[:, :3], 1.0, quant_state=state)
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        qlora_linear(x, packed, A, B, 1.0, dropout=1.0, quant_state=state)
    with pytest.raises(ValueError, match="no quant_state"):
        qlora_linear(x, packed, A, B, 1.0)


# -- against PEFT + bitsandbytes on the same bytes --------------------------------------------------


def bnb_linear4bit(linear: nn.Linear, compute_dtype=torch.float32):
    """A bitsandbytes NF4 double-quant Linear4bit holding `linear`'s weight, quantized on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def nf4kern_from_bnb(layer, compute_dtype=None) -> LinearNF4:
    """A LinearNF4 that loaded the bitsandbytes layer's state dict: the same bytes."""
    ours = LinearNF4(layer.in_features, layer.out_features, bias=layer.bias is not None, compute_dtype=compute_dtype)
    ours.load_state_dict(layer.state_dict())
    assert_bytes_equal(ours.weight.data, layer.weight.data, "packed weight")
    return ours


def peft_lora_bnb(layer, r, lora_alpha, use_rslora=False):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, use_rslora=use_rslora)
    return PeftLinear4bit(layer, "default", config=config, r=r, lora_alpha=lora_alpha)


# In-features avoid bitsandbytes' CPU dequantize defect (docs/format.md section 10: a K that is a
# multiple of 16 but not of the blocksize decodes rows > 0 with the wrong absmax, e.g. K = 96).
@pytest.mark.parametrize(
    "M,K,N,r,use_bias,rslora,dtype",
    [
        (7, 72, 40, 8, True, False, torch.float32),
        (2 * 5, 95, 33, 17, False, True, torch.float32),
        (5, 64, 48, 64, True, False, torch.float32),
        (6, 64, 40, 4, True, False, torch.bfloat16),
    ],
    ids=["r8-bias", "r17-rslora", "r64", "bf16"],
)
def test_matches_peft_bnb(M, K, N, r, use_bias, rslora, dtype):
    torch.manual_seed(M * K + r)
    linear = nn.Linear(K, N, bias=use_bias)
    theirs = peft_lora_bnb(bnb_linear4bit(linear, dtype), r, 2 * r, rslora)
    ours = QLoRALinear(nf4kern_from_bnb(theirs.base_layer, dtype), r, 2 * r, 0.0, rslora)
    assert ours.scaling == theirs.scaling["default"]
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_(0, 0.3)  # PEFT starts B at zero: make the path count
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
    if use_bias:
        ours.base_layer.bias.requires_grad_(True)
        theirs.base_layer.bias.requires_grad_(True)
    g = gen(M + K)
    x = rand((M, K), g, dtype=dtype)
    if M == 10:
        x = x.reshape(2, 5, K)
    dy = rand((*x.shape[:-1], N), g, dtype=dtype)

    results = {}
    for name, layer in (("nf4kern", ours), ("peft", theirs)):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(dy)
        base = layer.base_layer
        A = layer.lora_A if name == "nf4kern" else layer.lora_A["default"].weight
        B = layer.lora_B if name == "nf4kern" else layer.lora_B["default"].weight
        results[name] = {"y": y, "dx": xi.grad, "dA": A.grad, "dB": B.grad}
        if use_bias:
            results[name]["dbias"] = base.bias.grad
    # bitsandbytes rounds the dequantized weight to compute_dtype; nf4kern keeps W_hat in float32.
    tol = 2e-6 if dtype == torch.float32 else 1.5e-2
    ratios = {k: rms_ratio(results["nf4kern"][k], results["peft"][k]) for k in results["peft"]}
    print(f"\nPEFT+bnb agreement (RMS ratio) M={M} K={K} N={N} r={r} {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in ratios.items()))
    for k, v in ratios.items():
        assert results["nf4kern"][k].shape == results["peft"][k].shape, k
        assert v < tol, (k, v)


# -- dropout semantics -----------------------------------------------------------------------------


def test_dropout_expectation_equals_eval():
    """E[y] over seeds is the dropout-free output: check the mean of n draws against the exact
    per-element variance s^2 p/(1-p) sum_k (x_mk (BA)_nk)^2, and the sample variance against it."""
    g = gen(11)
    M, K, N, r, p, s = 4, 32, 24, 8, 0.3, 2.0
    packed, state = quantized(N, K, g)
    x, A, B, bias = rand((M, K), g), rand((r, K), g, 0.3), rand((N, r), g, 0.3), rand((N,), g)
    with torch.no_grad():
        y_eval = qlora_linear(x, packed, A, B, s, bias, 0.0, state).double()
        n = 2000
        ys = torch.stack([qlora_linear(x, packed, A, B, s, bias, p, state, seed=seed) for seed in range(n)]).double()
    BA = B.double() @ A.double()
    var = s**2 * p / (1 - p) * ((x.double()[:, None, :] * BA[None, :, :]) ** 2).sum(-1)
    z = (ys.mean(0) - y_eval) / (var / n).sqrt()
    assert z.abs().max() < 5.0, z.abs().max()
    var_ratio = (ys.var(0) / var).mean().item()
    assert 0.9 < var_ratio < 1.1, var_ratio


def test_keep_multiplier():
    p = 0.25
    keep = lora.keep_multiplier(42, (300, 100), p, "cpu")
    assert keep.dtype == torch.float32 and keep.shape == (300, 100)
    values = set(keep.unique().tolist())
    assert values == {0.0, torch.tensor(1 / (1 - p), dtype=torch.float32).item()}
    kept = (keep > 0).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.numel())
    assert torch.equal(keep, lora.keep_multiplier(42, (300, 100), p, "cpu"))
    assert not torch.equal(keep, lora.keep_multiplier(43, (300, 100), p, "cpu"))
    assert lora.keep_multiplier(42, (3, 4), 0.0, "cpu") is None


def test_dropout_seed_determines_mask():
    g = gen(12)
    packed, state = quantized(24, 40, g)
    x, A, B = rand((6, 40), g), rand((4, 40), g), rand((24, 4), g)
    y1 = qlora_linear(x, packed, A, B, 1.0, None, 0.5, state, seed=9)
    assert torch.equal(y1, qlora_linear(x, packed, A, B, 1.0, None, 0.5, state, seed=9))
    assert not torch.equal(y1, qlora_linear(x, packed, A, B, 1.0, None, 0.5, state, seed=10))
    # Without a seed, it comes from torch's global generator.
    torch.manual_seed(0)
    y2 = qlora_linear(x, packed, A, B, 1.0, None, 0.5, state)
    torch.manual_seed(0)
    assert torch.equal(y2, qlora_linear(x, packed, A, B, 1.0, None, 0.5, state))


def test_backward_regenerates_the_mask():
    """Backward runs after other draws from every generator and still uses keep_multiplier(seed)."""
    g = gen(13)
    packed, state = quantized(24, 40, g)
    x = rand((6, 40), g).requires_grad_(True)
    A, B = rand((4, 40), g).requires_grad_(True), rand((24, 4), g).requires_grad_(True)
    y = qlora_linear(x, packed, A, B, 1.5, None, 0.4, state, seed=77)
    torch.rand(1000)  # disturb the global generator between forward and backward
    dy = rand(y.shape, g)
    y.backward(dy)
    keep = lora.keep_multiplier(77, (6, 40), 0.4, "cpu")
    dx_ref, dA_ref, _, _ = reference.lora_backward(dy, x, packed, state, A, B, 1.5, keep)
    assert rms_ratio(x.grad, dx_ref) < FP32_TOL
    assert rms_ratio(A.grad, dA_ref) < FP32_TOL
    no_drop = reference.lora_backward(dy, x, packed, state, A, B, 1.5, None)[0]
    assert rms_ratio(x.grad, no_drop) > 1e-3  # the mask did act


# -- what autograd keeps ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_for_backward(dtype, p):
    """Saved: x (itself, not a copy), S [M, r] float32, the frozen weight (packed bytes and its
    scales), A, B and the int64 seed. No mask, no dequantized weight, nothing else M-sized."""
    torch.manual_seed(0)
    M, K, N, r = 64, 48, 40, 4
    layer = QLoRALinear(nn.Linear(K, N), r, 8, p).train()
    x = torch.randn(4, M // 4, K, dtype=dtype, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None

    weight = layer.base_layer.weight
    state = weight.quant_state
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    expected = {
        "x": nbytes(x),
        "S": M * r * 4,
        "packed": nbytes(weight),
        "scales": nbytes(state.absmax) + nbytes(state.state2.absmax) + nbytes(state.offset),
        "A": r * K * 4,
        "B": N * r * 4,
        "seed": 8,
    }
    assert sum(nbytes(t) for t in saved) == sum(expected.values()), ([nbytes(t) for t in saved], expected)
    activation = min(M * K, M * N)
    big = [t for t in saved if t.numel() >= activation]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr() and big[0].dtype == dtype
    assert any(t.shape == (M, r) and t.dtype == torch.float32 for t in saved)
    assert not any(t.is_floating_point() and t.shape in ((N, K), (K, N)) for t in saved)  # no dequantized W


# -- gradient checkpointing ------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_recomputes_same_mask(use_reentrant):
    torch.manual_seed(0)
    l1 = QLoRALinear(nn.Linear(40, 56), 4, 8, 0.2).train()
    l2 = QLoRALinear(nn.Linear(56, 24), 8, 8, 0.3).train()
    for layer in (l1, l2):
        nn.init.normal_(layer.lora_B, std=0.2)
    params = [l1.lora_A, l1.lora_B, l2.lora_A, l2.lora_B]
    x0 = torch.randn(3, 5, 40)

    def block(x):
        return l2(torch.nn.functional.gelu(l1(x)))

    def grads(seed, ckpt):
        for q in params:
            q.grad = None
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(seed)
        y = checkpoint(block, x, use_reentrant=use_reentrant) if ckpt else block(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        return [x.grad] + [q.grad.clone() for q in params]

    plain = grads(123, ckpt=False)
    checkpointed = grads(123, ckpt=True)
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)
    other = grads(124, ckpt=False)
    assert not torch.equal(plain[1], other[1])  # dropout is live: the seed matters


# -- QLoRALinear ---------------------------------------------------------------------------------


def make_layer(K=96, N=40, r=8, alpha=16, p=0.0, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    return QLoRALinear(nn.Linear(K, N, bias=bias), r, alpha, p, **kwargs)


def test_layer_shapes_and_default_init():
    layer = make_layer(K=256, N=48, r=16)
    assert isinstance(layer.base_layer, LinearNF4) and layer.base_layer.weight.quant_type == "nf4"
    assert layer.lora_A.shape == (16, 256) and layer.lora_B.shape == (48, 16)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert layer.scaling == 16 / 16
    # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear and PEFT.
    bound = 1 / math.sqrt(256)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.95 * bound
    assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert torch.count_nonzero(layer.lora_B) == 0
    assert make_layer(r=16, alpha=16, use_rslora=True).scaling == 16 / 4


def test_layer_gaussian_init():
    layer = make_layer(K=512, N=40, r=8, init="gaussian")
    assert abs(layer.lora_A.std().item() - 1 / 8) < 0.05 / 8
    assert abs(layer.lora_A.mean().item()) < 0.01
    assert torch.count_nonzero(layer.lora_B) == 0


def test_layer_zero_B_is_the_base_layer():
    layer = make_layer()
    x = torch.randn(5, 96)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_layer_disable_enable_adapter():
    layer = make_layer()
    nn.init.normal_(layer.lora_B, std=0.5)
    x = torch.randn(2, 3, 96)
    y = layer(x)
    layer.disable_adapter()
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.enable_adapter()
    assert torch.equal(layer(x), y)
    assert rms_ratio(y, layer.base_layer(x)) > 0.01


def test_layer_eval_mode_has_no_dropout():
    layer = make_layer(p=0.5)
    nn.init.normal_(layer.lora_B, std=0.5)
    x = torch.randn(4, 96)
    layer.eval()
    y = layer(x)
    assert torch.equal(y, layer(x))
    layer.train()
    assert not torch.equal(y, layer(x))


def test_layer_merge_unmerge():
    layer = make_layer(K=128, N=48, r=8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    base = layer.base_layer
    old_weight, old_state = base.weight, base.weight.quant_state
    old_bytes, old_absmax = base.weight.data.clone(), old_state.absmax.clone()
    x = torch.randn(6, 128)
    y = layer(x)

    layer.merge()
    assert layer.merged and base.weight is not old_weight
    y_merged = layer(x)
    # Exactly the re-quantized sum: dequantize, add scaling B A in float32, quantize again.
    w_sum = nf4kern.dequantize_4bit(old_bytes, old_state, dtype=torch.float32) + layer.delta_weight()
    w_new = nf4kern.dequantize_4bit(*nf4kern.quantize_4bit(w_sum, 64, "nf4", True), dtype=torch.float32)
    assert rms_ratio(y_merged, x.double() @ w_new.double().T + base.bias.double()) < FP32_TOL
    # Within the 4-bit re-quantization error of the unmerged output: a per-element bound ...
    err = (w_new - w_sum).double()
    assert ((y_merged - y).double().abs() <= x.double().abs() @ err.abs().T + 1e-4).all()
    # ... that is a 4-bit-sized error, far below the adapter's own contribution.
    assert rms_ratio(y_merged, y) < 0.15
    delta_out = x @ layer.delta_weight().T
    assert (y_merged - y).norm() < 0.5 * delta_out.norm()
    layer.merge()  # a second merge does nothing
    assert torch.equal(layer(x), y_merged)

    layer.unmerge()
    assert not layer.merged and base.weight is old_weight and base.weight.quant_state is old_state
    assert_bytes_equal(base.weight.data, old_bytes, "weight after unmerge")
    assert torch.equal(base.weight.quant_state.absmax, old_absmax)
    assert torch.equal(layer(x), y)
    layer.unmerge()
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_merged_linear(dtype):
    layer = make_layer(K=128, N=48)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(6, 128)
    y = layer(x)
    linear = layer.merged_linear(dtype)
    assert type(linear) is nn.Linear and linear.weight.dtype == dtype and linear.bias is not None
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert rms_ratio(linear(x.to(dtype)), y) < tol
    layer.merge()  # merged already: the copy holds the merged 4-bit weight
    assert rms_ratio(layer.merged_linear(torch.float32)(x), layer(x)) < 1e-5


def test_layer_over_a_quantized_linear4bit():
    base = LinearNF4(64, 32, bias=False).to("cpu")
    layer = QLoRALinear(base, 4, 8)
    assert layer.base_layer is base and layer(torch.randn(2, 64)).shape == (2, 32)


@pytest.mark.parametrize("r", [0, -1, 1.5, True, "8"])
def test_layer_bad_r(r):
    with pytest.raises(ValueError, match="r must be a positive int"):
        QLoRALinear(nn.Linear(8, 8), r, 8)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_layer_bad_dropout(p):
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        QLoRALinear(nn.Linear(8, 8), 2, 8, p)


def test_layer_bad_init_and_base():
    with pytest.raises(ValueError, match="init must be one of"):
        QLoRALinear(nn.Linear(8, 8), 2, 8, init="xavier")
    with pytest.raises(TypeError, match="base must be a Linear4bit or an nn.Linear"):
        QLoRALinear(nn.Conv1d(8, 8, 1), 2, 8)
    with pytest.raises(TypeError, match="base must be a Linear4bit or an nn.Linear"):
        QLoRALinear(nn.Embedding(8, 8), 2, 8)
    with pytest.raises(ValueError, match="not quantized yet"):
        QLoRALinear(LinearNF4(8, 8), 2, 8)


# -- prepare_qlora and PEFT-format adapters on a tiny Llama ----------------------------------------

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def peft_model(model, **config):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**config))


def adapters(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}


TARGETS = {
    "all-linear": ("all-linear", 14),
    "names": (["q_proj", "v_proj", "down_proj"], 6),
    "regex": (r"model\.layers\.1\.(self_attn\.[qk]_proj|mlp\.up_proj)", 3),
}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_prepare_qlora_targets(target):
    target_modules, count = TARGETS[target]
    model = prepare_qlora(tiny_llama(), r=4, lora_alpha=8, target_modules=target_modules, verbose=False)
    found = adapters(model)
    assert len(found) == count
    assert type(model.lm_head) is nn.Linear and "lm_head" not in found
    for name, module in found.items():
        assert isinstance(module.base_layer, Linear4bit) and module.base_layer.weight.quant_state.nested
    for name, param in model.named_parameters():
        assert param.requires_grad == (".lora_A" in name or ".lora_B" in name), name
    if target == "names":
        assert {n.rsplit(".", 1)[1] for n in found} == {"q_proj", "v_proj", "down_proj"}

    theirs = peft_model(tiny_llama(), r=4, lora_alpha=8, target_modules=target_modules)
    assert qlora_report(model)["trainable_params"] == theirs.get_nb_trainable_parameters()[0]
    ids = torch.randint(0, 128, (2, 8))
    assert model(input_ids=ids).logits.shape == (2, 8, 128)


def test_prepare_qlora_no_match():
    with pytest.raises(ValueError, match="matches no Linear layer"):
        prepare_qlora(tiny_llama(), target_modules=["nonexistent"], verbose=False)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_save_adapter_loads_in_peft(tmp_path, use_rslora):
    peft = pytest.importorskip("peft")
    model = prepare_qlora(tiny_llama(), r=4, lora_alpha=12, lora_dropout=0.05, use_rslora=use_rslora,
                          target_modules=["q_proj", "v_proj", "up_proj"], verbose=False)
    torch.manual_seed(1)
    for module in adapters(model).values():
        nn.init.normal_(module.lora_B, std=0.1)
    save_adapter(model, tmp_path)
    ours = adapters(model)
    assert len(ours) == 6
    # PEFT's base: the unquantized model with each targeted weight set to nf4kern's dequantized
    # 4-bit weight, so the two models must agree to float32 rounding.
    base = tiny_llama()
    with torch.no_grad():
        for name, module in ours.items():
            w = module.base_layer.weight
            base.get_submodule(name).weight.copy_(nf4kern.dequantize_4bit(w.data, w.quant_state, dtype=torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    for name, module in ours.items():
        theirs = loaded.base_model.model.get_submodule(name)
        assert torch.equal(theirs.lora_A["default"].weight, module.lora_A)
        assert torch.equal(theirs.lora_B["default"].weight, module.lora_B)
        assert theirs.scaling["default"] == module.scaling
        assert theirs.lora_dropout["default"].p == module.lora_dropout
    ids = torch.randint(0, 128, (2, 8))
    model.eval()
    with torch.no_grad():
        ratio = rms_ratio(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
        assert ratio < 1e-5, ratio


def test_load_adapter_reads_peft(tmp_path):
    theirs = peft_model(tiny_llama(), r=6, lora_alpha=9, lora_dropout=0.1, use_rslora=True,
                        target_modules=["k_proj", "o_proj", "gate_proj"], init_lora_weights="gaussian")
    torch.manual_seed(2)
    for name, module in theirs.named_modules():
        if name.endswith(("k_proj", "o_proj", "gate_proj")) and hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    theirs.save_pretrained(tmp_path)
    model = load_adapter(tiny_llama(), tmp_path)
    ours = adapters(model)
    assert len(ours) == 6
    for name, module in ours.items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert torch.equal(module.lora_A, peft_layer.lora_A["default"].weight)
        assert torch.equal(module.lora_B, peft_layer.lora_B["default"].weight)
        assert (module.r, module.lora_alpha, module.lora_dropout, module.use_rslora) == (6, 9, 0.1, True)
        assert module.scaling == peft_layer.scaling["default"]
    # Round trip: save_adapter writes the same tensors back.
    save_adapter(model, tmp_path / "again")
    reloaded = load_adapter(tiny_llama(), tmp_path / "again")
    for name, module in adapters(reloaded).items():
        assert torch.equal(module.lora_A, ours[name].lora_A) and torch.equal(module.lora_B, ours[name].lora_B)


def test_load_adapter_refuses_alpha_pattern(tmp_path):
    """PEFT's per-layer lora_alpha would silently give the wrong scaling: refused. (rank_pattern
    needs nothing: each layer's r comes from its tensors' shapes.)"""
    theirs = peft_model(tiny_llama(), r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 64})
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="alpha_pattern"):
        load_adapter(tiny_llama(), tmp_path)
    theirs = peft_model(tiny_llama(), r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4})
    theirs.save_pretrained(tmp_path / "ranks")
    for name, module in adapters(load_adapter(tiny_llama(), tmp_path / "ranks")).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert module.r == peft_layer.r["default"] and module.scaling == peft_layer.scaling["default"]


def test_load_adapter_into_prepared_model_takes_the_adapters_scaling(tmp_path):
    """Loading into layers that are already QLoRALinear applies the adapter's alpha, dropout and
    rsLoRA (the layer's own were those of prepare_qlora), and refuses a wrong r or a merged layer."""
    theirs = peft_model(tiny_llama(), r=4, lora_alpha=64, lora_dropout=0.2, use_rslora=True, target_modules=["q_proj"])
    theirs.save_pretrained(tmp_path)
    model = prepare_qlora(tiny_llama(), r=4, lora_alpha=16, target_modules=["q_proj"], verbose=False)
    for name, module in adapters(load_adapter(model, tmp_path)).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert (module.lora_alpha, module.lora_dropout, module.use_rslora) == (64, 0.2, True)
        assert module.scaling == peft_layer.scaling["default"] == 32.0
    wrong_r = prepare_qlora(tiny_llama(), r=8, lora_alpha=16, target_modules=["q_proj"], verbose=False)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(wrong_r, tmp_path)
    assert all(m.lora_alpha == 16 for m in adapters(wrong_r).values())  # left as it was
    merged = prepare_qlora(tiny_llama(), r=4, lora_alpha=16, target_modules=["q_proj"], verbose=False)
    next(iter(adapters(merged).values())).merge()
    with pytest.raises(ValueError, match="unmerge"):
        load_adapter(merged, tmp_path)


def test_new_layers_keep_the_models_mode(tmp_path):
    """prepare_qlora and load_adapter put each QLoRALinear in the mode of the layer it replaces:
    an adapter loaded into a model in eval mode must not apply dropout."""
    model = prepare_qlora(tiny_llama().train(), r=4, lora_alpha=8, lora_dropout=0.5, verbose=False)
    assert all(m.training and m.base_layer.training for m in adapters(model).values())
    for module in adapters(model).values():
        nn.init.normal_(module.lora_B, std=0.1)
    save_adapter(model, tmp_path)
    assert not tiny_llama().training  # eval mode, as from_pretrained returns a model
    loaded = load_adapter(tiny_llama(), tmp_path)
    assert not any(m.training for m in loaded.modules())
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert not any(m.training for m in prepare_qlora(tiny_llama(), verbose=False).modules())


# -- a short training run, nf4kern and PEFT + bitsandbytes on the same bytes -----------------------


def replace_linears(model, make, kind=nn.Linear):
    for name, module in list(model.named_modules()):
        if type(module) is kind and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))
    return model


def test_training_matches_peft_bnb():
    base = tiny_llama(seed=3)
    bnb_model = replace_linears(copy.deepcopy(base), bnb_linear4bit)
    bnb_model.is_loaded_in_4bit = True  # PEFT's dispatcher wraps bnb layers only then
    bnb = pytest.importorskip("bitsandbytes")
    ours = replace_linears(copy.deepcopy(bnb_model), nf4kern_from_bnb, bnb.nn.Linear4bit)
    del ours.is_loaded_in_4bit
    theirs = peft_model(bnb_model, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    ours = prepare_qlora(ours, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", verbose=False)

    found = adapters(ours)
    assert len(found) == 14
    with torch.no_grad():
        for name, module in found.items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            assert type(peft_layer).__module__ == "peft.tuners.lora.bnb"
            assert_bytes_equal(module.base_layer.weight.data, peft_layer.base_layer.weight.data, name)
            module.lora_A.copy_(peft_layer.lora_A["default"].weight)
            module.lora_B.copy_(peft_layer.lora_B["default"].weight)
    assert qlora_report(ours)["trainable_params"] == theirs.get_nb_trainable_parameters()[0]

    g = gen(4)
    data = torch.randint(0, 128, (2, 16), generator=g)
    batches = [data] * 10  # one batch, memorised: the loss must fall
    curves = {}
    for name, model in (("nf4kern", ours), ("peft", theirs)):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves[name] = losses
    rel = [abs(a - b) / abs(b) for a, b in zip(curves["nf4kern"], curves["peft"])]
    print(f"\ntraining losses nf4kern {curves['nf4kern']}\n                peft    {curves['peft']}\nmax relative difference {max(rel):.2e}")
    assert curves["nf4kern"][-1] < curves["nf4kern"][0] - 0.05  # it trains
    assert max(rel) < 1e-4
