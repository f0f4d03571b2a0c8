"""The CPU path imports and works on an install without triton."""
import subprocess
import sys
import textwrap


def test_cpu_path_without_triton():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch, nf4kern
        from nf4kern.nn import LinearNF4
        w = torch.randn(33, 70)
        packed, state = nf4kern.quantize_4bit(w, 64, double_quant=True)
        assert nf4kern.dequantize_4bit(packed, state).shape == (33, 70)
        layer = LinearNF4.from_linear(torch.nn.Linear(70, 33))
        x = torch.randn(3, 70, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad.shape == (3, 70)
        try:
            nf4kern.quantize_4bit(w, backend="triton")
        except (ImportError, RuntimeError) as e:
            print("forced triton:", e)
        else:
            raise AssertionError("backend='triton' without triton must fail clearly")
        print("ok")
        """
    )
    env = {"TRITON_INTERPRET": "1", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "forced triton: backend 'triton' needs the triton package" in result.stdout
    assert result.stdout.strip().endswith("ok")
