"""Held-out perplexity of a causal LM on token windows (what the compress command line reports)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import InputError
from whatmatters.core.task import progress_bar


def held_out_windows(texts: Sequence[str], tokenizer: Any, n: int, seq_len: int) -> torch.Tensor:
    """``n`` evenly spaced, non-overlapping windows ``(n, seq_len)`` of the texts joined with blank lines."""
    ids = torch.as_tensor(tokenizer("\n\n".join(texts))["input_ids"], dtype=torch.long).reshape(-1)
    chunks = ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)
    if len(chunks) == 0:
        raise InputError(f"the held-out texts hold {len(ids)} tokens, fewer than one window of {seq_len}")
    pick = torch.linspace(0, len(chunks) - 1, min(n, len(chunks))).round().long()
    return chunks[pick]


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 4, progress: bool | None = None) -> float:
    """exp(mean next-token cross-entropy) of ``model`` over the windows ``ids`` ``(n, seq_len)``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    chunks = ids.split(batch_size)
    for chunk in progress_bar(chunks, len(chunks), "perplexity", progress):
        chunk = chunk.to(device)
        logits = model(chunk, use_cache=False).logits[:, :-1].float()
        targets = chunk[:, 1:].reshape(-1)
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum"))
        count += targets.numel()
    return float(torch.exp(torch.tensor(total / count)))
