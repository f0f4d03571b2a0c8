"""nf4kern.compile_gate: ahead-of-time compilation for sm_80 / sm_90 without a GPU.

The gate compiles in a subprocess (main() re-runs itself without TRITON_INTERPRET, which the test
session sets), so these tests drive main() and read its table from the captured output.
"""
from __future__ import annotations

import re
import textwrap

import pytest

from nf4kern import codebook as cb
from nf4kern import compile_gate
from nf4kern.kernels import quant


def _rows(text: str) -> dict[tuple[str, str], str]:
    """{(kernel, target): the rest of the table row}."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"(\S+)\s+\S+\s+(sm_\d+)\s+(.*)$", line)
        if m:
            rows[(m.group(1), m.group(2))] = m.group(3)
    return rows


def test_quant_kernels_compile_clean_for_sm80_and_sm90(capfd):
    """Every quant spec compiles for both targets with no spill and none of the PTX forbidden for
    bit-exactness (approximate division, flush-to-zero, fma)."""
    rc = compile_gate.main(["--module", "quant"])
    out = capfd.readouterr().out
    assert rc == 0, out[-4000:]
    rows = _rows(out)
    for spec in quant.COMPILE_SPECS:
        for target in ("sm_80", "sm_90"):
            row = rows.get((spec.name, target))
            assert row is not None, f"{spec.name} {target} missing from the table:\n{out[-3000:]}"
            regs, spills, smem, wgmma, status = row.split(None, 4)
            assert status == "ok" and spills == "0/0" and int(regs) > 0, row
    assert f"{2 * len(quant.COMPILE_SPECS)}/{2 * len(quant.COMPILE_SPECS)} compiled clean" in out


_FAILING_SPECS = textwrap.dedent('''
    import dataclasses

    import triton
    import triton.language as tl

    from nf4kern.compile_gate import KernelSpec
    from nf4kern.kernels import quant


    @triton.jit
    def _good_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2.0)


    @triton.jit
    def _broken_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs) + tl.arange(0, 2 * BLOCK))  # shape mismatch


    @triton.jit
    def _spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)  # every value stays live until the sum: 256 per thread
        tl.store(y_ptr + offs, x * tl.sum(x * x))


    SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"}
    nested = next(s for s in quant.COMPILE_SPECS if s.name == "dequantize_bf16_nested_bs64")
    COMPILE_SPECS = [
        KernelSpec("good", _good_kernel, SIG, {"BLOCK": 1024}, num_stages=1),
        KernelSpec("broken", _broken_kernel, SIG, {"BLOCK": 1024}, num_stages=1),
        KernelSpec("spill", _spill_kernel, SIG, {"BLOCK": 8192}, num_warps=1, num_stages=1, maxnreg=32),
        KernelSpec("no_wgmma", _good_kernel, SIG, {"BLOCK": 1024}, num_stages=1, require_wgmma_on=(90,)),
        # The nested scale f32(f32(dyn * nested) + offset) contracted into an fma: not bit-exact.
        dataclasses.replace(nested, name="fused_nested_scale", enable_fp_fusion=True),
        # A plain dict with the agreed keys is accepted too.
        dict(name="good_dict", fn=_good_kernel, signature=SIG, constexprs={"BLOCK": 256},
             num_warps=4, num_stages=1, require_wgmma_on=()),
    ]
''')


def test_failures_are_reported_and_fail_the_gate(tmp_path, monkeypatch, capfd):
    """A compile error, a spill, a missing required wgmma and a forbidden fma each fail their row
    and make the gate exit non-zero; clean specs still print ok."""
    pkg = tmp_path / "gate_fixture"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "specs.py").write_text(_FAILING_SPECS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    rc = compile_gate.main(["--module", "gate_fixture.specs"])
    out = capfd.readouterr().out
    assert rc == 1, out[-4000:]
    rows = _rows(out)
    for target in ("sm_80", "sm_90"):
        assert rows[("good", target)].endswith("ok")
        assert rows[("good_dict", target)].endswith("ok")
        assert "FAIL CompilationError" in rows[("broken", target)]
        assert re.search(r"FAIL spills \d+ B stored", rows[("spill", target)])
        assert "forbidden PTX 'fma." in rows[("fused_nested_scale", target)]
    assert "FAIL no wgmma" in rows[("no_wgmma", "sm_90")]
    assert rows[("no_wgmma", "sm_80")].endswith("ok")  # only required on sm_90
    assert "compile gate: 7 FAILED" in out


def test_gate_finds_every_kernel_module():
    modules = compile_gate.kernel_modules()
    assert "nf4kern.kernels.quant" in modules
    assert all(m.startswith("nf4kern.kernels.") for m in modules)


def test_no_specs_is_an_error(tmp_path, monkeypatch, capfd):
    pkg = tmp_path / "gate_empty"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "specs.py").write_text("COMPILE_SPECS = []\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert compile_gate.main(["--module", "gate_empty.specs"]) == 2


def test_quant_specs_cover_dtypes_quant_types_nesting_and_blocksizes():
    specs = {s.name: s for s in quant.COMPILE_SPECS}
    for dt in ("fp32", "fp16", "bf16"):
        for qt in ("nf4", "fp4"):
            assert f"quantize_{qt}_{dt}_bs64" in specs
        for tag in ("plain", "nested"):
            assert f"dequantize_{dt}_{tag}_bs64" in specs
    for bs in cb.BLOCKSIZES:  # bf16, QLoRA's dtype, at every blocksize
        for qt in ("nf4", "fp4"):
            assert f"quantize_{qt}_bf16_bs{bs}" in specs
        for tag in ("plain", "nested"):
            assert f"dequantize_bf16_{tag}_bs{bs}" in specs
    assert "quantize_nested" in specs
    for s in specs.values():
        assert list(s.signature) == list(s.fn.arg_names)
        assert {k for k, v in s.signature.items() if v == "constexpr"} == set(s.constexprs)
        assert not s.enable_fp_fusion and s.forbid_ptx


@pytest.mark.parametrize("log, expected", [
    ("ptxas info    : Function properties for k\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
     "ptxas info    : Used 40 registers, used 0 barriers", (40, 0, 0, 0)),
    ("    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\nptxas info    : Used 255 registers",
     (255, 16, 8, 12)),
])
def test_ptxas_log_parsing(log, expected):
    regs, spill = compile_gate._RE_REGS.search(log), compile_gate._RE_SPILL.search(log)
    assert (int(regs.group(1)), *map(int, spill.groups())) == expected
