"""Shared test helpers: tiny random Hugging Face models (no download), a tiny CNN, an HTML tag reader."""

from __future__ import annotations

import importlib.util
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn


def small_cnn(width: int = 4, classes: int = 3, seed: int = 0) -> nn.Module:
    """Two 3x3 convs with ReLU, pooled to 2x2, then a linear head; eval mode, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    ).eval()


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))


def html_tags(text: str, name: str | None = None) -> list[dict]:
    """Attributes of every start tag (or of every ``name`` tag) in ``text``."""
    parser = _Tags()
    parser.feed(text)
    return [attrs for tag, attrs in parser.tags if name is None or tag == name]


KINDS = ("bert", "gpt2", "llama", "qwen2", "qwen3", "vit")


def tiny_model(
    kind: str,
    *,
    layers: int = 2,
    vocab: int = 60,
    kv_heads: int = 2,
    intermediate: int = 64,
    positions: int | None = 32,
    attn: str | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """A seeded tiny ``kind`` model (``KINDS``): 4 query heads of size 8, ``kv_heads`` key/value heads."""
    t = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    extra: dict[str, Any] = {} if attn is None else {"attn_implementation": attn}
    if kind == "gpt2":
        if positions is not None:
            extra["n_positions"] = positions
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, **extra)).eval()
    common = {"num_hidden_layers": layers, "num_attention_heads": 4, "intermediate_size": intermediate, **extra}
    if kind == "vit":
        return t.ViTForImageClassification(
            t.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_labels=5, **common)
        ).eval()
    if positions is not None:
        common["max_position_embeddings"] = positions
    if kind == "bert":
        return t.BertForSequenceClassification(t.BertConfig(vocab_size=vocab, hidden_size=32, **common)).eval()
    config, model = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM),
    }[kind]
    head = {"head_dim": 8} if kind == "qwen3" else {}
    return model(config(vocab_size=vocab, hidden_size=32, num_key_value_heads=kv_heads, **head, **common)).eval()


def tiny_batch(kind: str, n: int = 6, length: int = 10, vocab: int = 60) -> torch.Tensor:
    """Inputs for :func:`tiny_model`: ``(n, 3, 16, 16)`` images for ViT, else ``(n, length)`` token ids."""
    if kind == "vit":
        return torch.randn(n, 3, 16, 16)
    return torch.randint(0, vocab, (n, length))


def benchmark_script(name: str) -> ModuleType:
    """The module ``benchmarks/<name>.py`` (e.g. a golden-array maker whose fixture model a test reuses)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
