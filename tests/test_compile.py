"""torch.compile: nf4kern's ops are registered custom ops with fake kernels and autograd, and a
model built from LinearNF4 / QLoRALinear compiles with fullgraph=True, zero graph breaks, and the
same results as eager (CPU inductor)."""
import pytest
import torch
import torch._dynamo as dynamo

import nf4kern
from nf4kern import ops
from nf4kern.nn import LinearNF4
from nf4kern.qlora import QLoRALinear


def _model(dropout: float, bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        LinearNF4.from_linear(torch.nn.Linear(96, 48, bias=bias)),
        torch.nn.GELU(),
        QLoRALinear(torch.nn.Linear(48, 33, bias=bias), r=5, lora_alpha=10, lora_dropout=dropout),
    )
    with torch.no_grad():
        model[2].lora_B.normal_()  # a trained adapter, so the LoRA path matters
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("train", [False, True])
def test_zero_graph_breaks(dropout, train):
    model = _model(dropout).train(train)
    dynamo.reset()
    explanation = dynamo.explain(model)(torch.randn(3, 7, 96, requires_grad=True))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fullgraph_compile_matches_eager_forward_and_backward(dtype):
    model = _model(0.0).to(dtype=dtype) if dtype != torch.float32 else _model(0.0)
    x = torch.randn(5, 96, dtype=dtype)
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for fn in (model, compiled):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.float().square().sum().backward()
        results.append((y.detach(), xi.grad, model[2].lora_A.grad.clone(), model[2].lora_B.grad.clone(), model[0].bias.grad.clone()))
        model.zero_grad(set_to_none=True)
    for eager, comp in zip(*results):
        if dtype == torch.float32:
            torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
        else:  # inductor keeps bf16 intermediates (GELU's backward) in fp32: compare RMS error
            ratio = (comp.float() - eager.float()).norm() / eager.float().norm()
            assert ratio < 1e-2, ratio


def test_compiled_dropout_follows_the_seed():
    model = _model(0.1).train()
    layer = model[2]
    x = torch.randn(4, 48)
    seed = torch.tensor(1234)

    def f(x):
        base = layer.base_layer
        return nf4kern.autograd.qlora_linear(x, base.weight, layer.lora_A, layer.lora_B, layer.scaling, base.bias, 0.1, seed=seed)

    dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def _weight(double_quant: bool):
    packed, state = nf4kern.quantize_4bit(torch.randn(17, 64), 32, "nf4", double_quant)
    return packed.reshape(-1), state


@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck_every_op(double_quant):
    packed, state = _weight(double_quant)
    absmax, nested, offset, N, K, blocksize, quant_type = ops.weight_args(state)
    x = torch.randn(3, K, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    A = torch.randn(4, K, requires_grad=True)
    B = torch.randn(N, 4, requires_grad=True)
    seed = torch.tensor(7)
    torch.library.opcheck(ops.quantize_4bit, (torch.randn(5, 64), 64, "nf4", double_quant))
    torch.library.opcheck(ops.dequantize_4bit, (packed, absmax, nested, offset, [N, K], blocksize, quant_type, torch.bfloat16))
    torch.library.opcheck(ops.nf4_matmul, (x, packed, absmax, nested, offset, bias, N, K, blocksize, quant_type))
    torch.library.opcheck(ops.nf4_matmul_dx, (torch.randn(3, N), packed, absmax, nested, offset, N, K, blocksize, quant_type))
    torch.library.opcheck(ops.lora_forward, (x, packed, absmax, nested, offset, bias, A, B, 2.0, 0.0, seed, N, K, blocksize, quant_type))
    S = torch.randn(3, 4)
    torch.library.opcheck(
        ops.lora_backward,
        (torch.randn(3, N), x.detach(), S, packed, absmax, nested, offset, A.detach(), B.detach(), 2.0, 0.1, seed, N, K, blocksize, quant_type, [True, True, True, True]),
    )


def test_ops_are_registered_under_the_nf4kern_namespace():
    for name in ("quantize_4bit", "dequantize_4bit", "nf4_matmul", "nf4_matmul_dx", "lora_forward", "lora_backward"):
        assert hasattr(torch.ops.nf4kern, name)
