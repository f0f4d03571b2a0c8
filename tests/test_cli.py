"""`nf4kern quantize` and `nf4kern inspect`, run as the command on real files."""
from __future__ import annotations

import io
import json
import math
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nf4kern
from nf4kern.checkpoint import quantized_entries
from tests.helpers import TINY_LLAMA, assert_bytes_equal, require_fixture

safetensors_torch = pytest.importorskip("safetensors.torch")
ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


def cli_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("NF4KERN_DEBUG", None)
    return env


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "nf4kern.cli", *map(str, args)], capture_output=True, text=True,
                          env=cli_env(), cwd=ROOT, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def sqnr(w, w_hat):
    w, w_hat = w.double(), w_hat.double()
    return 10 * math.log10(float(w.square().mean() / (w - w_hat).square().mean()))


def layer_tensors(seed, prefix="model.layers.0."):
    g = torch.Generator().manual_seed(seed)
    bf16 = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    return {
        prefix + "self_attn.q_proj.weight": bf16(96, 64),
        prefix + "self_attn.q_proj.bias": bf16(96),
        prefix + "mlp.up_proj.weight": (torch.randn(128, 64, generator=g) * 0.02).to(torch.float16),
        prefix + "input_layernorm.weight": torch.ones(64, dtype=torch.bfloat16),
        prefix + "rotary.inv_freq": torch.arange(8, dtype=torch.float32),
        prefix + "mlp.gate_proj.weight": torch.randn(64, 32, generator=g),
    }


def check_quantized(out: dict, original: dict, quantized: set, min_sqnr=15.0, nested=True):
    entries = quantized_entries(out)
    assert set(entries) == quantized
    for name, (packed, state) in entries.items():
        keys = [f"{name}.{s}" for s in SUFFIXES if nested or "nested" not in s]
        assert all(k in out for k in keys), keys
        assert state.shape == original[name].shape and state.dtype == original[name].dtype
        assert sqnr(original[name], nf4kern.dequantize_4bit(packed, state)) > min_sqnr
    for name, t in original.items():
        if name not in quantized:
            assert out[name].dtype == t.dtype and torch.equal(out[name], t), name


def test_quantize_file(tmp_path):
    tensors = {"embed_tokens.weight": torch.randn(50, 64).to(torch.bfloat16), "lm_head.weight": torch.randn(50, 64),
               **layer_tensors(0)}
    safetensors_torch.save_file(tensors, tmp_path / "in.safetensors")
    proc = run("quantize", tmp_path / "in.safetensors", tmp_path / "out.safetensors")
    quantized = {k for k in tensors if k.startswith("model.") and k.endswith("proj.weight")}
    out = safetensors_torch.load_file(tmp_path / "out.safetensors")
    check_quantized(out, tensors, quantized)
    assert "3 quantized, 5 copied" in proc.stdout and "bits/param" in proc.stdout and "SQNR dB: min" in proc.stdout
    # Our writer's header: 8-byte length, JSON padded to a multiple of 8, metadata format pt.
    raw = (tmp_path / "out.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and json.loads(raw[8 : 8 + n])["__metadata__"] == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]  # no temporaries

    # The entries bitsandbytes makes of the same tensor, byte for byte.
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    name = "model.layers.0.self_attn.q_proj.weight"
    bpacked, bstate = bnb_functional.quantize_4bit(tensors[name], blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = {name: bpacked, **{f"{name}.{k}": v for k, v in bstate.as_dict(packed=True).items()}}
    assert {k for k in out if k.startswith(name)} == set(theirs)
    for key in theirs:
        if key != f"{name}.absmax":
            assert_bytes_equal(out[key], theirs[key], key)
    # bitsandbytes' CPU nested quantizer uses a lookup table: codes may be one step off ours.
    assert (out[f"{name}.absmax"].int() - theirs[f"{name}.absmax"].int()).abs().max() <= 1


def test_quantize_options_and_skip(tmp_path):
    tensors = layer_tensors(1)
    safetensors_torch.save_file(tensors, tmp_path / "in.safetensors")
    run("quantize", tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--quant-type", "fp4", "--blocksize", "128",
        "--no-double-quant", "--quant-storage", "bfloat16", "--skip", "gate_proj")
    out = safetensors_torch.load_file(tmp_path / "out.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert out[name].dtype == torch.bfloat16 and out[name].shape == (96 * 64 // 4, 1)
    assert f"{name}.quant_state.bitsandbytes__fp4" in out and f"{name}.nested_absmax" not in out
    assert out[f"{name}.absmax"].dtype == torch.float32
    state = quantized_entries(out)[name][1]
    assert (state.quant_type, state.blocksize, state.nested) == ("fp4", 128, False)
    assert torch.equal(out["model.layers.0.mlp.gate_proj.weight"], tensors["model.layers.0.mlp.gate_proj.weight"])
    assert set(quantized_entries(out)) == {name, "model.layers.0.mlp.up_proj.weight"}


def make_sharded(folder: Path) -> dict:
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": layer_tensors(2, "model.layers.0."),
              "model-00002-of-00002.safetensors": {**layer_tensors(3, "model.layers.1."),
                                                   "lm_head.weight": torch.randn(40, 64).to(torch.bfloat16)}}
    weight_map = {}
    for shard, tensors in shards.items():
        safetensors_torch.save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    # A model type transformers does not know: weights are chosen by name.
    (folder / "config.json").write_text(json.dumps({"model_type": "nf4kern-test", "hidden_size": 64}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not copied")
    return shards


def test_quantize_sharded_folder(tmp_path):
    shards = make_sharded(tmp_path / "in")
    proc = run("quantize", tmp_path / "in", tmp_path / "out", "--compute-dtype", "float16")
    assert "in 2 shards" in proc.stdout and "by name (transformers cannot build the model" in proc.stdout
    assert proc.stderr.startswith("nf4kern: warning: weights chosen by name") and len(proc.stderr.splitlines()) == 1
    out_dir = tmp_path / "out"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*shards, "model.safetensors.index.json", "config.json",
                                                               "tokenizer.json"])
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    total = 0
    for shard, tensors in shards.items():
        out = safetensors_torch.load_file(out_dir / shard)
        check_quantized(out, tensors, {k for k in tensors if k.endswith("proj.weight")})
        assert all(index["weight_map"][k] == shard for k in out)
        total += sum(t.numel() * t.element_size() for t in out.values())
    assert len(index["weight_map"]) == sum(len(safetensors_torch.load_file(out_dir / s)) for s in shards)
    assert index["metadata"]["total_size"] == total
    config = json.loads((out_dir / "config.json").read_text())
    assert config["hidden_size"] == 64
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] and qc["bnb_4bit_compute_dtype"] == "float16"
    assert qc["bnb_4bit_quant_storage"] == "uint8" and qc["llm_int8_skip_modules"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]

    # A --skip that holds back Linear weights lists every unquantized module (the list replaces
    # transformers' defaults, so lm_head is on it too).
    from nf4kern import cli

    assert cli.main(["quantize", str(tmp_path / "in"), str(tmp_path / "out2"), "--skip", "up_proj|lm_head"]) == 0
    qc = json.loads((tmp_path / "out2" / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]


def float_tiny_llama(folder: Path, fixture: Path) -> None:
    """The fixture's model as a bf16 checkpoint: its dequantized weights and its float tensors."""
    folder.mkdir()
    saved = safetensors_torch.load_file(fixture / "model.safetensors")
    reference = safetensors_torch.load_file(fixture / "reference.safetensors")
    tensors = {k: v for k, v in saved.items() if v.dtype == torch.bfloat16}
    tensors.update({k.replace(".dequantized", ".weight"): v for k, v in reference.items() if k.endswith(".dequantized")})
    safetensors_torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fixture / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_bytes((fixture / "generation_config.json").read_bytes())


def test_tiny_llama_round_trip(tmp_path):
    """Re-quantizing the fixture's dequantized weights reproduces the checkpoint transformers and
    bitsandbytes saved: same keys, config and float tensors, byte-identical 4-bit codes."""
    fixture = require_fixture(TINY_LLAMA)
    float_tiny_llama(tmp_path / "float", fixture)
    run("quantize", tmp_path / "float", tmp_path / "q")
    ours = safetensors_torch.load_file(tmp_path / "q" / "model.safetensors")
    theirs = safetensors_torch.load_file(fixture / "model.safetensors")
    assert json.loads((tmp_path / "q" / "config.json").read_text()) == json.loads((fixture / "config.json").read_text())
    assert set(ours) == set(theirs)
    for key, t in theirs.items():
        if ".quant_state." in key:  # JSON; the mean of the absmax (nested_offset) moves a little
            mine, saved = (json.loads(bytes(x.tolist())) for x in (ours[key], t))
            assert math.isclose(mine.pop("nested_offset"), saved.pop("nested_offset"), rel_tol=1e-3) and mine == saved
            continue
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape, key
        if key.endswith((".weight", "quant_map")):
            assert_bytes_equal(ours[key], t, key)  # packed codes, float tensors and tables
        elif key.endswith(".absmax"):
            # The float absmax re-derived from bf16-rounded weights differs slightly from the original
            # (and the fixture was saved by bitsandbytes' CPU nested quantizer, a lookup table): the
            # 8-bit codes stay within two steps; bitsandbytes re-quantizing these weights does the same.
            assert (ours[key].int() - t.int()).abs().max() <= 2, key
    reference = safetensors_torch.load_file(fixture / "reference.safetensors")
    for name, (packed, state) in quantized_entries(ours).items():
        expected = reference[name.removesuffix(".weight") + ".dequantized"]
        assert sqnr(expected, nf4kern.dequantize_4bit(packed, state)) > 50, name

    # transformers loads it with bitsandbytes on the CPU (pre-quantized: Params4bit.from_prequantized).
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    import bitsandbytes as bnb

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(linears) == 14 and getattr(model, "is_loaded_in_4bit", False)
    for name, module in linears.items():
        assert_bytes_equal(module.weight.data, theirs[name + ".weight"], name)
        state = nf4kern.QuantState.from_dict(module.weight.quant_state.as_dict(packed=True))
        assert torch.equal(nf4kern.dequantize_4bit(module.weight.data, state),
                           nf4kern.dequantize_4bit(*quantized_entries(ours)[name + ".weight"]))
    assert torch.equal(model.lm_head.weight, theirs["lm_head.weight"])


def tiny_transformers_model(kind: str, folder: Path):
    """A tiny random GPT-2 (Conv1D layers, stored [in, out]) or T5 (embeddings shaped like
    Linear weights, `wo` kept in float32) saved by transformers; its class and example inputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)
        cls, inputs = transformers.GPT2LMHeadModel, {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])}
    else:
        # d_kv 32: every Linear takes >= 64 inputs. On AVX512-BF16 CPUs bitsandbytes repacks a
        # 4-bit weight into in_features // blocksize rows, which fails below one block.
        config = transformers.T5Config(vocab_size=64, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_decoder_layers=1,
                                       num_heads=2, decoder_start_token_id=0)
        cls, inputs = transformers.T5ForConditionalGeneration, {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]),
                                                                 "decoder_input_ids": torch.tensor([[0, 6, 7]])}
    cls(config).save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return cls, inputs


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """{kind: (folder, class, inputs, (exit status, stderr, seconds, stdout) of quantizing it into
    folder/q)} for the tiny GPT-2 and T5, and "gpt2 --skip c_fc" into gpt2/q-skip, quantized by one
    runner that imported transformers once."""
    root = tmp_path_factory.mktemp("tiny")
    models = {kind: (root / kind, *tiny_transformers_model(kind, root / kind / "float")) for kind in ("gpt2", "t5")}
    cases = {kind: ["quantize", folder / "float", folder / "q", "--compute-dtype", "float32"]
             for kind, (folder, _, _) in models.items()}
    cases["gpt2 --skip c_fc"] = ["quantize", root / "gpt2" / "float", root / "gpt2" / "q-skip", "--skip", r"\.c_fc\."]
    results = run_each(cases, root / "streams", preload=["transformers"])
    models["gpt2 --skip c_fc"] = models["gpt2"]
    return {kind: (*models[kind], results[kind]) for kind in models}


@pytest.mark.parametrize("kind, quantized, transposed", [("gpt2", 4, 4), ("t5", 14, 0)])
def test_transformers_loads_what_bitsandbytes_would_quantize(tiny_models, kind, quantized, transposed):
    """`nf4kern quantize` of a transformers folder quantizes exactly the modules transformers loads
    as Linear4bit (GPT-2's Conv1D transposed; not T5's embeddings or its float32 `wo`), and the
    model loaded from it computes what the float model quantized by bitsandbytes at load does."""
    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    folder, cls, inputs, (status, stderr, _, stdout) = tiny_models[kind]
    assert status == 0 and not stderr, stderr
    assert f"in {cls.__name__} (from config.json)" in stdout
    assert f"{quantized} quantized" + (f" ({transposed} Conv1D" if transposed else ",") in stdout

    ours = cls.from_pretrained(folder / "q", device_map="cpu").eval()
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                             bnb_4bit_compute_dtype=torch.float32)
    theirs = cls.from_pretrained(folder / "float", device_map="cpu", quantization_config=config).eval()
    fp32 = cls.from_pretrained(folder / "float").eval()
    linear4bit = {n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert {n for n, m in ours.named_modules() if isinstance(m, bnb.nn.Linear4bit)} == linear4bit
    out = safetensors_torch.load_file(folder / "q" / "model.safetensors")
    assert {k.removesuffix(".weight") for k in quantized_entries(out)} == linear4bit and len(linear4bit) == quantized
    with torch.no_grad():
        logits = [m(**inputs).logits.float() for m in (ours, theirs, fp32)]
    nf4_error = (logits[1] - logits[2]).abs().max()
    # The same codes up to the nested absmax (bitsandbytes' CPU lookup table): far below the NF4
    # error itself. A weight quantized in the wrong orientation gives several times the NF4 error.
    assert nf4_error > 0 and (logits[0] - logits[1]).abs().max() <= 0.1 * nf4_error


def test_skip_with_a_model_lists_what_transformers_must_not_convert(tiny_models):
    """--skip holds back a module transformers would convert: config.json then lists it, with
    transformers' own defaults (a list replaces them), and transformers loads it as a float Conv1D."""
    bnb = pytest.importorskip("bitsandbytes")
    folder, cls, inputs, (status, stderr, _, stdout) = tiny_models["gpt2 --skip c_fc"]
    assert status == 0 and not stderr, stderr
    assert "3 quantized (3 Conv1D" in stdout
    skip = json.loads((folder / "q-skip" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert skip == ["lm_head", "transformer.h.0.mlp.c_fc", "transformer.ln_f.bias", "transformer.wte"]
    model = cls.from_pretrained(folder / "q-skip", device_map="cpu").eval()
    fp32 = cls.from_pretrained(folder / "float").eval()
    c_fc = model.transformer.h[0].mlp.c_fc
    assert not isinstance(c_fc, bnb.nn.Linear4bit) and torch.equal(c_fc.weight, fp32.transformer.h[0].mlp.c_fc.weight)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 3 and not isinstance(model.lm_head, bnb.nn.Linear4bit)
    with torch.no_grad():
        assert (model(**inputs).logits - fp32(**inputs).logits).abs().max() < 0.1


def test_inspect_float_and_quantized(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tensors = layer_tensors(4)
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = 1.0  # one outlier
    safetensors_torch.save_file(tensors, tmp_path / "in.safetensors")
    proc = run("inspect", tmp_path / "in.safetensors", "--plot", tmp_path / "err.png", "--top", "2")
    lines = proc.stdout.splitlines()
    assert "top 2 of 3" in proc.stdout and "SQNR dB" in proc.stdout
    rows = [line.split() for line in lines if line.startswith("model.")]
    assert len(rows) == 2 and float(rows[0][3]) <= float(rows[1][3])  # lowest SQNR first
    assert rows[0][0] == "model.layers.0.self_attn.q_proj.weight" and rows[0][-2] == "1"  # the outlier
    assert all(float(r[3]) > 10 for r in rows)
    assert (tmp_path / "err.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "summary: 3 tensors" in proc.stdout

    from nf4kern import cli

    assert cli.main(["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "q.safetensors"), "--no-double-quant"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "q.safetensors")]) == 0
    stdout = capsys.readouterr().out
    assert "already quantized (bitsandbytes layout): 3 tensors" in stdout
    row = next(line.split() for line in stdout.splitlines() if line.startswith("model.layers.0.mlp.up_proj.weight"))
    # 4 bits + 32/64 for the absmax + the maps and state of a small tensor
    assert row[2:6] == ["nf4", "64", "off", "uint8"] and 4.5 < float(row[6]) < 4.7


def test_quantize_names_a_non_finite_weight_in_command_line_terms(tmp_path):
    """quantize refuses a weight with NaN or inf: one line naming it, how many and where, without
    the Python API's allow_nonfinite hint; OUT is not written."""
    tensors = layer_tensors(9)
    bad = "model.layers.0.mlp.up_proj.weight"
    tensors[bad][3, 5] = float("nan")
    tensors[bad][7, 0] = float("inf")
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    safetensors_torch.save_file(tensors, path)
    proc = run("quantize", path, out, check=False)
    assert proc.returncode == 1 and not out.exists() and proc.stdout == ""
    assert proc.stderr == f"nf4kern: error: cannot quantize {bad}: 2 NaN/inf value(s), the first at [3, 5]; " \
                          "4-bit blocks cannot hold them\n"


def test_inspect_reports_a_non_finite_tensor_and_fails_at_the_end(tmp_path, capsys):
    """A weight with NaN or inf gets a row saying so, the others are reported as usual, and the
    command exits 1 after the whole report, with one line on stderr."""
    tensors = layer_tensors(9)
    bad = "model.layers.0.mlp.up_proj.weight"
    tensors[bad][3, 5] = float("nan")
    tensors[bad][7, 0] = float("-inf")
    path = tmp_path / "in.safetensors"
    safetensors_torch.save_file(tensors, path)
    proc = run("inspect", path, check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"nf4kern: error: {path}: 1 tensor(s) hold NaN or inf, which quantize refuses: {bad}\n"
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("model.")}
    assert set(rows) == {k for k in tensors if k.endswith("proj.weight")}
    assert rows[bad].split()[1:3] == ["128x64", "F16"]
    assert rows[bad].endswith("not finite: 2 NaN/inf value(s), the first at [3, 5]; not quantized")
    assert all(float(row.split()[3]) > 15 for name, row in rows.items() if name != bad)
    assert "summary: 3 tensors (1 not finite, not quantized), SQNR dB min" in proc.stdout
    assert "not inspected: 3 tensors" in proc.stdout  # the report went on to its end

    # --top: a tensor without SQNR comes before the lowest SQNR
    from nf4kern import cli

    assert cli.main(["inspect", str(path), "--top", "1", "--no-progress"]) == 1
    out = capsys.readouterr()
    assert [line.split()[0] for line in out.out.splitlines() if line.startswith("model.")] == [bad]
    assert len(out.err.splitlines()) == 1


def test_quantize_refuses_a_checkpoint_already_quantized(tmp_path):
    """Nothing left to quantize: a file, a folder whose config.json says so and one without
    config.json are refused alike, in one line naming IN, and OUT is not written."""
    from nf4kern import cli

    folder = tmp_path / "cases"
    folder.mkdir()
    safetensors_torch.save_file(layer_tensors(10), tmp_path / "float.safetensors")
    assert cli.main(["quantize", str(tmp_path / "float.safetensors"), str(folder / "q.safetensors"), "--no-progress"]) == 0
    for name, config in (("with-config", {"quantization_config": {"quant_method": "bitsandbytes"}}), ("bare", None)):
        (folder / name).mkdir()
        (folder / name / "model.safetensors").write_bytes((folder / "q.safetensors").read_bytes())
        if config is not None:
            (folder / name / "config.json").write_text(json.dumps(config))
    cases = {"file": ["quantize", folder / "q.safetensors", folder / "o.safetensors"],
             "folder with quantization_config": ["quantize", folder / "with-config", folder / "o"],
             "folder without config.json": ["quantize", folder / "bare", folder / "o"]}
    before = {p.name for p in folder.iterdir()}
    results = run_each(cases, tmp_path / "streams")
    for returncode, stderr, _, _ in results.values():
        _assert_clean_failure(returncode, stderr, before, folder)
    messages = {case: stderr for case, (_, stderr, _, _) in results.items()}
    assert messages["file"] == (f"nf4kern: error: {folder / 'q.safetensors'} is already quantized (3 weights in "
                                "bitsandbytes' 4-bit layout, none left to quantize)\n")
    assert messages["folder with quantization_config"].startswith(
        f"nf4kern: error: {folder / 'with-config'} is already quantized (config.json has a quantization_config")
    assert messages["folder without config.json"].startswith(f"nf4kern: error: {folder / 'bare'} is already quantized (3")


def test_quantize_partly_quantized_file_keeps_the_quantized_entries(tmp_path):
    """Weights left in float are quantized; those already 4-bit pass through byte for byte."""
    from nf4kern import cli

    tensors = layer_tensors(11)
    safetensors_torch.save_file(tensors, tmp_path / "in.safetensors")
    part, full = tmp_path / "part.safetensors", tmp_path / "full.safetensors"
    assert cli.main(["quantize", str(tmp_path / "in.safetensors"), str(part), "--skip", "gate_proj", "--no-progress"]) == 0
    proc = run("quantize", part, full)
    assert "tensors: 1 quantized, 15 copied unchanged" in proc.stdout
    before, after = safetensors_torch.load_file(part), safetensors_torch.load_file(full)
    gate = "model.layers.0.mlp.gate_proj.weight"
    for key, t in before.items():
        if key != gate:
            assert after[key].dtype == t.dtype and after[key].shape == t.shape, key
            assert_bytes_equal(after[key], t, key)
    check_quantized(after, tensors, {k for k in tensors if k.endswith("proj.weight")})


def test_a_reader_leaving_early_stops_the_command_quietly(tmp_path):
    """`nf4kern inspect ... | head -1`: the pipe closes while the table is written (more than a
    pipe buffer of it); the command stops with the shell's SIGPIPE status, no error, no traceback."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.proj.weight": torch.randn(2, 64, generator=g) for i in range(1500)}
    safetensors_torch.save_file(tensors, tmp_path / "many.safetensors")
    proc = subprocess.Popen([sys.executable, "-m", "nf4kern.cli", "inspect", tmp_path / "many.safetensors", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=ROOT)
    assert proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "error" not in stderr and "Broken pipe" not in stderr, stderr


def _error_cases(folder: Path):
    good = folder / "good.safetensors"
    safetensors_torch.save_file(layer_tensors(6), good)
    (folder / "random.safetensors").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    (folder / "notes.txt").write_text("not a checkpoint\n")
    (folder / "afile").write_text("")
    (folder / "truncated.safetensors").write_bytes(good.read_bytes()[:-100])
    (folder / "empty_dir").mkdir()
    (folder / "model").mkdir()
    safetensors_torch.save_file(layer_tensors(5), folder / "model" / "model.safetensors")
    os.mkfifo(folder / "fifo")  # an OUT that exists but is not a regular file (like a device)
    nan = layer_tensors(7)
    nan["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    safetensors_torch.save_file(nan, folder / "nan.safetensors")
    return {
        "missing": ["quantize", folder / "missing.safetensors", folder / "o.safetensors"],
        "random bytes": ["quantize", folder / "random.safetensors", folder / "o.safetensors"],
        "text file": ["quantize", folder / "notes.txt", folder / "o.safetensors"],
        "truncated": ["quantize", folder / "truncated.safetensors", folder / "o.safetensors"],
        "folder without model": ["quantize", folder / "empty_dir", folder / "o"],
        "file as a folder": ["quantize", good, folder / "afile" / "o.safetensors"],
        "file as a grandparent": ["quantize", good, folder / "afile" / "sub" / "o.safetensors"],
        "missing parent": ["quantize", good, folder / "nowhere" / "o.safetensors"],
        # Unwritable even for root (CI): /proc accepts no new files, and its folders are not created.
        "out in /proc": ["quantize", good, "/proc/nf4kern-test.safetensors"],
        "out in a missing /proc folder": ["quantize", good, "/proc/nf4kern-test/out.safetensors"],
        "folder out in /proc": ["quantize", folder / "model", "/proc/nf4kern-test"],
        "out is a fifo": ["quantize", good, folder / "fifo"],
        "folder out is a fifo": ["quantize", folder / "model", folder / "fifo"],
        "bad blocksize": ["quantize", good, folder / "o.safetensors", "--blocksize", "100"],
        "bad quant type": ["quantize", good, folder / "o.safetensors", "--quant-type", "int4"],
        "bad regex": ["quantize", good, folder / "o.safetensors", "--skip", "("],
        "nan weight": ["quantize", folder / "nan.safetensors", folder / "o.safetensors"],
        "inspect random bytes": ["inspect", folder / "random.safetensors"],
        "inspect bad top": ["inspect", good, "--top", "0"],
        "plot in /proc": ["inspect", good, "--plot", "/proc/nf4kern-test.png"],
        "plot is a fifo": ["inspect", good, "--plot", folder / "fifo"],
        "demo out under a file": ["demo", "--out", folder / "afile" / "out"],
        "bench bad shape": ["bench", "--shapes", "4096"],
        "bench bad only": ["bench", "--only", "gemm"],
        "bench shapes for lora": ["bench", "--only", "lora", "--m", "8"],
    }


# Runs each case in its own process, forked from one that imported nf4kern (and the modules named
# after its first argument) once: a fresh interpreter per case costs seconds of imports, and a
# second to shut down with torch loaded.
# The child runs the module as `python -m nf4kern.cli` does, with stdout and stderr in files, and
# ends as the interpreter would (SystemExit's code or message; a traceback and 1 for any other
# exception), but through os._exit.
_FORKING_RUNNER = """
import importlib, json, os, runpy, sys, time
import nf4kern.benchmarks, nf4kern.convert, nf4kern.demo  # what nf4kern.cli imports (not itself: runpy runs it)
for name in sys.argv[2:]:
    importlib.import_module(name)

def run_cli(argv):
    sys.argv = ["nf4kern", *argv]
    try:
        runpy.run_module("nf4kern.cli", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1

streams, results = sys.argv[1], []
for i, argv in enumerate(json.load(sys.stdin)):
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        for fd, suffix in ((1, "out"), (2, "err")):
            os.dup2(os.open(os.path.join(streams, f"{i}.{suffix}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        status = run_cli(argv)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    results.append([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), time.monotonic() - start])
print(json.dumps(results))
"""


def run_each(cases: dict[str, list], streams: Path, preload=()) -> dict[str, tuple[int, str, float, str]]:
    """{case: (exit status, stderr, seconds, stdout)} of the command line run once per case."""
    streams.mkdir()
    argvs = [[str(a) for a in args] for args in cases.values()]
    proc = subprocess.run([sys.executable, "-c", _FORKING_RUNNER, str(streams), *preload], input=json.dumps(argvs),
                          capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    return {case: (status, (streams / f"{i}.err").read_text(), seconds, (streams / f"{i}.out").read_text())
            for i, (case, (status, seconds)) in enumerate(zip(cases, results))}


def _assert_clean_failure(returncode, stderr: str, before: set, folder: Path):
    assert returncode != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nf4kern: error:"), stderr
    assert "Traceback" not in stderr
    assert {p.name for p in folder.iterdir()} == before  # no OUT, no temporaries


def test_errors_are_one_line_and_leave_nothing(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    cases = _error_cases(folder)
    before = {p.name for p in folder.iterdir()}
    results = run_each(cases, tmp_path / "streams")
    for case, (returncode, stderr, _, _) in results.items():
        _assert_clean_failure(returncode, stderr, before, folder)
        assert ".tmp" not in stderr, (case, stderr)  # errors name the user's path, not a temporary
    messages = {case: stderr for case, (_, stderr, _, _) in results.items()}
    assert "nan" in messages["nan weight"].lower() and "truncated" in messages["truncated"]
    assert "not a safetensors file" in messages["random bytes"] and "not a safetensors file" in messages["text file"]
    assert "--blocksize" in messages["bad blocksize"] and "no such file" in messages["missing"]
    assert "NxK" in messages["bench bad shape"] and "--only" in messages["bench bad only"]
    assert messages["file as a grandparent"].endswith(f"{folder / 'afile'} is not a folder\n")
    assert messages["out in /proc"] == \
        "nf4kern: error: cannot write /proc/nf4kern-test.safetensors: nothing can be created in /proc\n"
    assert messages["out in a missing /proc folder"].endswith("folder /proc/nf4kern-test does not exist\n")
    assert messages["folder out in /proc"] == "nf4kern: error: cannot write /proc/nf4kern-test: nothing can be created in /proc\n"
    assert messages["out is a fifo"].endswith("it exists and is not a regular file\n")
    assert messages["folder out is a fifo"].endswith("it exists and is not a folder\n")
    assert messages["plot in /proc"].startswith("nf4kern: error: --plot: cannot write /proc/nf4kern-test.png")
    assert messages["plot is a fifo"].startswith(f"nf4kern: error: --plot: cannot write {folder / 'fifo'}: it exists")
    assert stat.S_ISFIFO((folder / "fifo").stat().st_mode)  # not replaced
    # The demo checks --out before loading the model and training (minutes) and fails in one line.
    assert messages["demo out under a file"] == \
        f"nf4kern: error: cannot write {folder / 'afile' / 'out'}: {folder / 'afile'} is not a folder\n"
    assert results["demo out under a file"][2] < 20


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path):
    safetensors_torch.save_file(layer_tensors(8), tmp_path / "in.safetensors")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc = run("quantize", tmp_path / "in.safetensors", locked / "o.safetensors", check=False)
        _assert_clean_failure(proc.returncode, proc.stderr, set(), locked)
    finally:
        locked.chmod(0o755)


def test_failure_in_second_shard_leaves_no_folder(tmp_path, capsys):
    shards = make_sharded(tmp_path / "in")
    second = list(shards)[1]
    tensors = shards[second]
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    safetensors_torch.save_file(tensors, tmp_path / "in" / second)
    from nf4kern import cli

    status = cli.main(["quantize", str(tmp_path / "in"), str(tmp_path / "out")])
    _assert_clean_failure(status, capsys.readouterr().err, {"in"}, tmp_path)
    # An existing non-empty OUT folder is refused, and left as it was.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    capsys.readouterr()
    status = cli.main(["quantize", str(tmp_path / "in"), str(tmp_path / "out")])
    _assert_clean_failure(status, capsys.readouterr().err, {"in", "out"}, tmp_path)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"]


def test_interrupt_cleans_up(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a folder: exit 130, one line, no OUT and no temporaries."""
    from nf4kern import cli, convert

    make_sharded(tmp_path / "in")
    calls = []
    real = convert.quantize_entries

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "quantize_entries", interrupted)
    monkeypatch.delenv("NF4KERN_DEBUG", raising=False)
    assert cli.main(["quantize", str(tmp_path / "in"), str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.startswith("nf4kern: error: interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert cli.main(["quantize", str(tmp_path / "in" / "model-00001-of-00002.safetensors"), str(tmp_path / "o.safetensors")]) == 0
    calls.clear()
    capsys.readouterr()
    monkeypatch.setattr(convert, "quantize_entries", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(["quantize", str(tmp_path / "in" / "model-00001-of-00002.safetensors"), str(tmp_path / "o2.safetensors")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "o.safetensors"]


def _read_terminal(master: int) -> str:
    """All a child wrote to the terminal, until it closed it."""
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: every end of the terminal's other side is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return b"".join(chunks).decode()


def test_progress_bar_on_a_terminal(tmp_path):
    """With stderr on a terminal, quantize draws a progress bar there (tqdm's, told to redraw on
    every update, or nf4kern's) that reaches 100% and is cleared at the end; stdout is unchanged."""
    pty = pytest.importorskip("pty")
    fcntl = pytest.importorskip("fcntl")
    termios = pytest.importorskip("termios")
    safetensors_torch.save_file(layer_tensors(10), tmp_path / "in.safetensors")
    try:
        master, terminal = pty.openpty()
    except OSError as e:
        pytest.skip(f"no pseudo-terminal: {e}")
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws nothing 0 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "nf4kern.cli", "quantize", tmp_path / "in.safetensors", tmp_path / "o.safetensors"],
                            stdout=subprocess.PIPE, stderr=terminal, env={**cli_env(), "TQDM_MININTERVAL": "0"}, cwd=ROOT)
    os.close(terminal)
    drawn = _read_terminal(master)
    stdout = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0 and "3 quantized" in stdout
    assert "quantize" in drawn and "100%" in drawn and "Traceback" not in drawn
    assert drawn.rstrip(" ").endswith("\r"), repr(drawn[-80:])  # the bar's line is cleared


def test_fallback_progress_bar(monkeypatch):
    """Without tqdm: one line redrawn in place at most every 0.1 s and at the end, cleared on close;
    nothing at all when disabled."""
    from nf4kern.convert import Progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    quiet = Progress(300, "quantize", enabled=False)
    quiet.update(300, "a.weight")
    quiet.close()
    assert sys.stderr.getvalue() == ""
    bar = Progress(3 * 1024, "quantize", enabled=True)
    bar.update(1024, "model.layers.0.q_proj.weight")
    first = sys.stderr.getvalue()
    assert first.startswith("\rquantize [##########                    ]  33% 1.00 KB/3.00 KB model.layers.0.q_proj.weight")
    bar.update(1024, "b.weight")  # within 0.1 s of the last draw: not drawn
    assert sys.stderr.getvalue() == first
    bar.update(1024, "c.weight")  # the end is always drawn
    last = sys.stderr.getvalue()[len(first):]
    assert last.startswith("\rquantize [" + "#" * 30 + "] 100% 3.00 KB/3.00 KB c.weight")
    bar.close()
    assert sys.stderr.getvalue()[len(first) + len(last):] == "\r" + " " * 120 + "\r"


def test_programming_errors_are_not_swallowed(tmp_path, monkeypatch):
    from nf4kern import cli, convert

    safetensors_torch.save_file(layer_tensors(9), tmp_path / "in.safetensors")
    monkeypatch.setattr(convert, "error_stats", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]  # still cleaned up


def test_report_subcommand_prints_the_quantization_table():
    result = subprocess.run([sys.executable, "-m", "nf4kern.cli", "report", "--size", "64"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "bits/param" in result.stdout and "heavy-tailed" in result.stdout and "Traceback" not in result.stderr


def test_bench_matmul_quick_prints_peers_and_ratios():
    """`nf4kern bench --quick --only matmul` on a tiny shape: one row per peer and pass, each
    with a time, throughput and roofline share, and nf4kern's speedup over it (the peer's time
    over nf4kern's, as printed)."""
    from nf4kern.benchmarks.matmul import PEERS

    proc = run("bench", "--quick", "--only", "matmul", "--shapes", "128x128", "--m", "1")
    lines = proc.stdout.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| pass")).split("|")[1:-1]]
    assert header[:9] == ["pass", "M", "N x K", "peer", "ms", "TFLOP/s", "GB/s", "% roofline", "nf4kern speedup"]
    rows = [dict(zip(header, (c.strip() for c in line.split("|")[1:-1]))) for line in lines if line.startswith("| fwd")]
    assert sorted((r["pass"], r["peer"]) for r in rows) == sorted((p, peer) for p in ("fwd", "fwd+bwd") for peer in PEERS)
    for pass_ in ("fwd", "fwd+bwd"):
        by_peer = {r["peer"]: r for r in rows if r["pass"] == pass_}
        ours = float(by_peer["nf4kern"]["ms"])
        assert ours > 0 and by_peer["nf4kern"]["% roofline"].endswith("%")
        for peer in ("bf16", "bitsandbytes", "dequant+matmul"):
            r = by_peer[peer]
            if peer == "bitsandbytes" and r["ms"] == "bitsandbytes not installed":
                continue
            assert r["nf4kern speedup"].endswith("x"), r
            assert math.isclose(float(r["nf4kern speedup"][:-1]), float(r["ms"]) / ours, rel_tol=0.02, abs_tol=0.01), r
    assert "Roofline: copy bandwidth" in proc.stdout and "Not measured" in proc.stdout
