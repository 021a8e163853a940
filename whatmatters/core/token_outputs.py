"""What a text model says about its target, read in batches: a classifier's class or a causal LM's next token.

Shared by token attribution (``explain.reagent``) and text evaluation (``evaluate.text``). A model is called
as ``model(input_ids=..., attention_mask=...)`` (or ``inputs_embeds=``) and returns ``.logits``: ``(b, C)``
for a classifier, ``(b, L, V)`` for a causal LM, whose prediction is read at each row's last real token.
Position ids follow the attention mask (``cumsum - 1``), so left- and right-padded rows read the same.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import InputError, ModelError


def accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name`` (or ``**kwargs``)."""
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of the real tokens counted from each row's first one (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_real(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real (attended) token."""
    steps = torch.arange(1, attention_mask.shape[-1] + 1, device=attention_mask.device)
    return (attention_mask.long() * steps).argmax(-1)


def check_mask(input_ids: torch.Tensor, attention_mask: Any, *, min_tokens: int = 1) -> torch.Tensor:
    """``attention_mask`` as a 0/1 long tensor of the ids' shape (all ones when None); rows need ``min_tokens``."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise InputError(
            f"attention_mask must be a tensor of the input_ids' shape {tuple(input_ids.shape)}, got {shape}; "
            "pass the tokenizer's attention_mask"
        )
    if attention_mask.is_floating_point() and not torch.isin(attention_mask, torch.tensor([0.0, 1.0])).all():
        raise InputError("attention_mask must hold 0 (padding) and 1 (real token) only")
    mask = attention_mask.long()
    if ((mask != 0) & (mask != 1)).any():
        raise InputError("attention_mask must hold 0 (padding) and 1 (real token) only")
    short = (mask.sum(-1) < min_tokens).nonzero().flatten().tolist()
    if short:
        raise InputError(
            f"rows {short[:10]} have fewer than {min_tokens} real token(s) (empty text or all padding); "
            "drop empty texts before explaining or evaluating them"
        )
    return mask.to(input_ids.device)


def check_target(target: Any, n: int, size: int, device: torch.device) -> torch.Tensor:
    """``target`` as ``n`` indices into the model's ``size`` outputs (one int broadcasts), else ``InputError``."""
    try:
        t = torch.as_tensor(target, device=device)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise InputError(f"target must be integer output ids (one per row, or one for all), got {target!r}") from None
    if t.is_floating_point() or t.dtype == torch.bool or t.ndim > 1:
        raise InputError(f"target must be integer output ids (one per row, or one for all), got {t.dtype} {t.shape}")
    t = t.long().expand(n) if t.ndim == 0 else t.long()
    if t.numel() != n:
        raise InputError(f"target has {t.numel()} ids for {n} rows; give one per row")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= size:
        raise InputError(f"target ids must lie in [0, {size}) (the model's outputs), got ids from {lo} to {hi}")
    return t


def read_logits(model: nn.Module, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
    """Logits ``(b, C)`` of one forward pass: a classifier's, or a causal LM's at each row's last real token."""
    if accepts(model, "position_ids") and "position_ids" not in inputs:
        inputs["position_ids"] = positions(attention_mask)
    last = last_real(attention_mask)
    # a causal LM whose rows all end at the last position computes the vocabulary head there only
    if (
        bool((last == attention_mask.shape[-1] - 1).all())
        and "logits_to_keep" in inspect.signature(model.forward).parameters
    ):
        inputs["logits_to_keep"] = 1
        last = torch.zeros_like(last)
    out = model(attention_mask=attention_mask, **inputs)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    if not isinstance(logits, torch.Tensor) or logits.ndim not in (2, 3):
        raise ModelError("the model must return logits (b, classes) or (b, seq_len, vocab), e.g. a transformers model")
    if logits.ndim == 3:
        logits = logits[torch.arange(len(logits), device=logits.device), last]
    return logits.float()


@torch.no_grad()
def reads_sequence(model: nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether the model returns per-position logits (a causal LM) rather than one row of class logits."""
    out = model(input_ids=input_ids[:1, :2])
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    return isinstance(logits, torch.Tensor) and logits.ndim == 3


@torch.no_grad()
def batched_logits(
    model: nn.Module, attention_mask: torch.Tensor, batch_size: int, **inputs: torch.Tensor
) -> torch.Tensor:
    """:func:`read_logits` of all rows, ``batch_size`` rows per forward pass."""
    return torch.cat(
        [
            read_logits(
                model, attention_mask[s : s + batch_size], **{k: v[s : s + batch_size] for k, v in inputs.items()}
            )
            for s in range(0, len(attention_mask), batch_size)
        ]
    )


def target_probs(
    model: nn.Module,
    target: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    batch_size: int = 32,
    **inputs: torch.Tensor,
) -> torch.Tensor:
    """Softmax probability of ``target`` for every row, ``batch_size`` rows per forward pass."""
    return probability(batched_logits(model, attention_mask, batch_size, **inputs), target)


def probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax probability ``(b,)`` of each row's ``target`` in ``logits`` ``(b, C)``."""
    return logits.softmax(-1).gather(1, target[:, None]).squeeze(1)
