"""LoRA ranks from any layer ``Importance`` under a total budget (AdaLoRA-style allocation, computed once).

AdaLoRA re-allocates during training and needs ``update_and_allocate`` every step and ``total_step`` up front
(peft #1327, #1801, #3373). Here the allocation is one call before ``get_peft_model``: ranks proportional to the
layer scores, between ``min_rank`` and ``max_rank``, summing to ``budget``, as a plain ``LoraConfig.rank_pattern``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from whatmatters.core.errors import InputError
from whatmatters.core.fractions import whole
from whatmatters.core.importance import Importance

_TAIL = re.compile(r"[A-Za-z_]\w*\.\d+$")


def _weights(importance: Importance) -> torch.Tensor:
    if importance.unit != "layer":
        raise InputError(f"rank allocation needs a layer Importance (unit 'layer'), got unit {importance.unit!r}")
    values = importance.values.detach().float().cpu()
    values = values.mean(0) if importance.per_sample else values
    if values.ndim != 1 or values.numel() < 1:
        raise InputError(f"layer scores must be one value per layer, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise InputError("the layer scores hold NaN or infinite values; fix the scores before allocating ranks")
    shifted = values - values.min()
    return shifted if shifted.sum() > 0 else torch.ones_like(values)


def allocate_ranks(importance: Importance, budget: int, *, min_rank: int = 1, max_rank: int | None = None) -> list[int]:
    """Ranks per layer: ``min_rank`` each, the rest of ``budget`` shared in proportion to the score above the lowest
    (largest remainders get the leftover units), none above ``max_rank``; they sum to ``budget``."""
    weights = _weights(importance)
    n = weights.numel()
    low = whole(min_rank, "min_rank", minimum=0, meaning="the smallest rank a layer gets")
    high = whole(max_rank if max_rank is not None else budget, "max_rank", minimum=max(low, 1))
    total = whole(budget, "budget", minimum=n * low, maximum=n * high, meaning=f"total rank over {n} layers")
    ranks = torch.full((n,), low, dtype=torch.long)
    free = torch.ones(n, dtype=torch.bool)
    left = total - low * n
    while left > 0:
        w = torch.where(free, weights, torch.zeros_like(weights))
        w = w if w.sum() > 0 else free.float()
        share = w / w.sum() * left
        add = share.floor().long().clamp(max=high - ranks)
        if add.sum() == 0:  # hand out single units by largest remainder
            order = torch.argsort(share - share.floor() + w * 1e-9, descending=True)
            add = torch.zeros_like(ranks)
            for i in order.tolist():
                if add.sum() == left:
                    break
                if free[i] and ranks[i] < high:
                    add[i] = 1
        ranks += add
        left -= int(add.sum())
        free &= ranks < high
    return ranks.tolist()


def rank_pattern(importance: Importance, budget: int, *, min_rank: int = 1, max_rank: int | None = None) -> dict:
    """``{regex: rank}`` for ``LoraConfig(rank_pattern=...)``: each layer's modules (``layer.3.*``) get its rank."""
    if importance.names is None:
        raise InputError("rank_pattern needs layer names on the Importance (names=...)")
    ranks = allocate_ranks(importance, budget, min_rank=min_rank, max_rank=max_rank)
    pattern = {}
    for name, rank in zip(importance.names, ranks):
        tail = _TAIL.search(name)
        if tail is None:
            raise InputError(f"layer name {name!r} does not end in a numbered layer like 'layer.3'")
        pattern[re.escape(tail.group()) + r"\..*"] = rank
    return pattern


def lora_config(
    importance: Importance, budget: int, *, min_rank: int = 1, max_rank: int | None = None, **lora: Any
) -> Any:
    """A peft ``LoraConfig`` whose ``rank_pattern`` spends ``budget`` total rank by layer importance.

    ``lora`` are further ``LoraConfig`` arguments (``target_modules``, ``lora_alpha``, ...); ``r`` defaults to the
    mean rank (used by modules outside the scored layers).
    """
    from peft import LoraConfig

    pattern = rank_pattern(importance, budget, min_rank=min_rank, max_rank=max_rank)
    lora.setdefault("r", max(1, round(budget / len(pattern))))
    return LoraConfig(rank_pattern=pattern, **lora)
