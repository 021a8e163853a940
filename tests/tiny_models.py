"""Tiny random Hugging Face models for tests (no download): one builder for every architecture used.

``tiny_model(kind)`` builds a seeded, eval-mode model with hidden size 32 and 4 attention heads;
``tiny_batch(kind)`` gives matching inputs (token ids, or images for ViT).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

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
