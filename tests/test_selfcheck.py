"""nf4kern.selfcheck, the on-device kernel check, run here in Triton's interpreter: every case
passes on correct kernels, and a broken kernel is reported as a failed case."""
import io

import pytest
import torch

pytest.importorskip("triton")

from nf4kern import selfcheck  # noqa: E402


def test_every_case_passes_in_the_interpreter():
    out = io.StringIO()
    failures = selfcheck.run("cpu", out=out)
    lines = out.getvalue().splitlines()
    assert failures == 0, "\n".join(line for line in lines if line.startswith("FAIL"))
    assert len(lines) == len(selfcheck.cases("cpu", large=False))
    for kind in ("quant nf4", "quant fp4", "nf4_linear nf4", "nf4_linear fp4", "qlora_linear",
                 "candidates fwd", "candidates dx"):
        assert any(kind in line for line in lines), kind
    # Each candidate case timed (and checked) several launches.
    assert all(" 1 timed" not in line and " 0 timed" not in line for line in lines if "candidates" in line)


def test_a_wrong_candidate_fails_its_case(monkeypatch):
    """A split-K size the tuner may pick, broken, fails the candidate check though the default
    launch is right."""
    from nf4kern.kernels import matmul as kernels

    real = kernels._per_split
    monkeypatch.setattr(kernels, "_per_split", lambda red, step, split:
                        real(red, step, split) if split != 2 else (1, step))  # drops all but one split
    result = selfcheck.check_candidates("fwd", 1, 33, 1024, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
    assert not result.ok and "#" in result.detail
    assert selfcheck.check_linear(1, 33, 1024, 64, "nf4", torch.bfloat16, "cpu", torch.Generator().manual_seed(0)).ok


def test_a_wrong_kernel_fails_its_cases(monkeypatch):
    from nf4kern.kernels import matmul as kernels

    real = kernels.nf4_matmul_dx
    monkeypatch.setattr(kernels, "nf4_matmul_dx", lambda *a, **k: real(*a, **k) * 1.01)
    result = selfcheck.check_linear(3, 17, 130, 64, "nf4", torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert not result.ok and "dx" in result.detail


def test_a_changed_byte_fails_the_quant_case(monkeypatch):
    from nf4kern.kernels import quant as kernels

    real = kernels.quantize_blocks

    def off_by_one(*args, **kwargs):
        packed, absmax = real(*args, **kwargs)
        packed = packed.clone()
        packed[0] ^= 1
        return packed, absmax

    monkeypatch.setattr(kernels, "quantize_blocks", off_by_one)
    result = selfcheck.check_quant((33, 200), 64, "nf4", False, torch.float16, "cpu", torch.Generator().manual_seed(0))
    assert not result.ok and "packed" in result.detail and "dequantized" in result.detail


def test_main_reports_and_sets_the_exit_status(monkeypatch, capsys):
    monkeypatch.setattr(selfcheck, "cases", lambda device, large: [
        (lambda gen: selfcheck.Result("good", True, ""), ()),
        (lambda gen: selfcheck.Result("bad", False, "why"), ()),
    ])
    assert selfcheck.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "ok    good" in out and "FAIL  bad" in out and "1 of 2 cases passed on cpu" in out


def test_huge_cases_at_a_small_size():
    """The past-2**31 cases (GPU only, with --large) check the right tail: run here on small
    sizes they pass, and only on a GPU do they join the list."""
    gen = torch.Generator().manual_seed(0)
    for n in (64 * 9 + 7, 64 * 3):
        assert selfcheck.check_huge_quant(n, torch.bfloat16, "cpu", gen).ok
    for M in (1, 17, 70):
        result = selfcheck.check_huge_linear(40, 128, M, torch.bfloat16, "cpu", gen)
        assert result.ok, result.detail
    assert not any(fn in (selfcheck.check_huge_quant, selfcheck.check_huge_linear)
                   for fn, _ in selfcheck.cases("cpu", large=True))
    huge = [args for fn, args in selfcheck.cases("cuda", large=True)
            if fn in (selfcheck.check_huge_quant, selfcheck.check_huge_linear)]
    assert huge[0][0] > 2**31 and all(N * K > 2**31 for N, K, *_ in huge[1:])


def test_a_huge_case_fails_on_a_wrong_tail(monkeypatch):
    from nf4kern.kernels import quant as kernels

    real = kernels.dequantize

    def last_value_off(*args, **kwargs):
        out = real(*args, **kwargs)
        out[-1] += 1
        return out

    monkeypatch.setattr(kernels, "dequantize", last_value_off)
    result = selfcheck.check_huge_quant(64 * 9 + 7, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
    assert not result.ok and "dequantized" in result.detail
