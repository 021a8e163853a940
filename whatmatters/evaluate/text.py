"""Faithfulness of token importance for text models: ERASER comprehensiveness / sufficiency and their soft forms.

* :func:`eraser` (DeYoung et al. 2020): for each share ``q`` of a row's tokens (``levels``, default 1, 5, 10,
  20, 50 %), the top ``ceil(q * n_tokens)`` tokens by score are removed (comprehensiveness
  ``p(y|x) - p(y|x without them)``, higher is better) or kept alone (sufficiency ``p(y|x) - p(y|them)``,
  lower is better); AOPC is the mean over levels. For a causal LM ``p`` is the next-token probability of
  the target, so comprehensiveness is the probability drop when the top tokens are removed.
* :func:`soft_eraser` (Zhao & Aletras 2023): every element of a token's input embedding is kept with
  probability ``1 - s`` (soft comprehensiveness) or ``s`` (soft sufficiency), ``s`` the min-max normalised
  score, normalised by the empty input as Carton et al. (2020): Soft-NC ``= C / (1 - S(x, 0))``, Soft-NS
  ``= (S - S(x, 0)) / (1 - S(x, 0))``, with ``C = max(0, p(y|x) - p(y|x'))``, ``S = 1 - max(0, p(y|x) - p(y|x'))``.
* :func:`disagreement`: pairwise Spearman and top-k overlap of several methods' scores on the same rows.

Removal (``removal=``): ``"delete"`` (default) takes the tokens out of the sequence (the others close up,
left-padded for a causal LM, right-padded for a classifier, the attention mask shortens: as if the words were
deleted from the text);
``"mask"`` leaves them in place with attention mask 0 (positions unchanged); ``"replace"`` swaps them for
``replacement_id`` (a pad or ``[MASK]`` id). ``protected`` positions (e.g. ``[CLS]``/``[SEP]``: the
tokenizer's special tokens mask) are never removed and never counted. Every row needs at least 2 scorable tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from whatmatters.core import hf
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.fractions import whole
from whatmatters.core.importance import Importance
from whatmatters.core.state import preserved, require_eval
from whatmatters.core.token_outputs import (
    accepts,
    batched_logits,
    check_mask,
    check_target,
    positions,
    probability,
    reads_sequence,
    target_probs,
)
from whatmatters.evaluate.agreement import spearman, topk_overlap
from whatmatters.evaluate.metrics import metric

LEVELS = (0.01, 0.05, 0.1, 0.2, 0.5)
REMOVALS = ("delete", "mask", "replace")


@dataclass(frozen=True)
class Eraser:
    """ERASER scores of one importance: ``(n, len(levels))`` per level, ``(n,)`` AOPC and the full-input probability."""

    levels: tuple[float, ...]
    full: torch.Tensor
    comprehensiveness: torch.Tensor
    sufficiency: torch.Tensor

    @property
    def aopc_comprehensiveness(self) -> torch.Tensor:
        return self.comprehensiveness.mean(1)

    @property
    def aopc_sufficiency(self) -> torch.Tensor:
        return self.sufficiency.mean(1)


@dataclass
class _Rows:
    """Checked token rows: ids, mask, scores ``(n, L)``, scorable positions, target ids and their probabilities."""

    ids: torch.Tensor
    mask: torch.Tensor
    scores: torch.Tensor
    scorable: torch.Tensor
    target: torch.Tensor
    full: torch.Tensor
    causal: bool


def _score_tensor(scores: Any, shape: tuple[int, ...]) -> torch.Tensor:
    values = scores.values if isinstance(scores, Importance) else scores
    if isinstance(scores, Importance) and scores.unit != "token":
        raise InputError(f"token evaluation needs an Importance of unit 'token', got unit {scores.unit!r}")
    values = torch.as_tensor(values).detach()
    if tuple(values.shape) != shape:
        raise InputError(
            f"scores of shape {tuple(values.shape)} do not fit input_ids of shape {shape}; "
            "give one score per token, aligned to the padded input_ids"
        )
    if not values.is_floating_point():
        values = values.double()
    if values.isnan().any():
        raise InputError("scores contain NaN; they cannot be ranked")
    return values.double()


def _rows(
    model: nn.Module, input_ids: Any, scores: Any, target: Any, attention_mask: Any, protected: Any, batch_size: int
) -> _Rows:
    ids = hf.token_ids(input_ids, model)
    mask = check_mask(ids, attention_mask)
    values = _score_tensor(scores, tuple(ids.shape)).to(ids.device)
    keep = torch.zeros_like(mask, dtype=torch.bool) if protected is None else torch.as_tensor(protected).bool()
    if keep.shape != ids.shape:
        raise InputError(
            f"protected must be a mask of the input_ids' shape {tuple(ids.shape)}, got {tuple(keep.shape)}"
        )
    scorable = (mask == 1) & ~keep.to(ids.device)
    short = (scorable.sum(1) < 2).nonzero().flatten().tolist()
    if short:
        raise InputError(
            f"rows {short[:10]} have fewer than 2 scorable tokens (empty text, all padding or all protected); "
            "drop them before evaluating"
        )
    require_eval(model)
    if target is None and isinstance(scores, Importance):
        target = scores.target
    logits = batched_logits(model, mask, batch_size, input_ids=ids)
    if target is None or isinstance(target, str):
        target = logits.argmax(-1)
    target = check_target(target, len(ids), logits.shape[-1], ids.device)
    return _Rows(ids, mask, values, scorable, target, probability(logits, target), reads_sequence(model, ids))


def _check_levels(levels: Any) -> tuple[float, ...]:
    try:
        out = tuple(float(q) for q in levels)
    except (TypeError, ValueError):
        out = ()
    if not out or any(not (0 < q <= 1) or math.isnan(q) for q in out):
        raise InputError(f"levels must be shares of tokens in (0, 1], e.g. (0.1, 0.2, 0.5), got {levels!r}")
    return out


def top_tokens(scores: torch.Tensor, scorable: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """``(n, m, L)`` masks of each row's ``ceil(q * n_scorable)`` highest scorable tokens (1 to all but one)."""
    count = scorable.sum(1, keepdim=True)
    k = torch.ceil(torch.tensor(levels, dtype=torch.float64, device=scores.device)[None] * count)
    k = torch.minimum(k.clamp_min(1), count - 1).long()  # (n, m)
    order = scores.masked_fill(~scorable, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    )
    return rank[:, None, :] < k[..., None]


def removed(
    ids: torch.Tensor,
    mask: torch.Tensor,
    drop: torch.Tensor,
    removal: str,
    replacement_id: int | None = None,
    *,
    causal: bool = False,
) -> dict[str, torch.Tensor]:
    """Model inputs with the ``drop`` tokens removed the ``removal`` way (``causal``: a causal LM's, left-padded)."""
    if removal == "replace":
        return {"input_ids": torch.where(drop, replacement_id, ids), "attention_mask": mask}
    keep = (mask == 1) & ~drop
    if removal == "mask":
        return {"input_ids": ids, "attention_mask": keep.long(), "position_ids": positions(mask)}
    # kept tokens in their order: last for a causal LM (left padding), first for a classifier (its [CLS] stays first)
    order = (keep if causal else ~keep).long().argsort(dim=1, stable=True)
    return {"input_ids": ids.gather(1, order), "attention_mask": keep.gather(1, order).long()}


def _check_removal(removal: Any, replacement_id: Any, model: nn.Module) -> None:
    if removal not in REMOVALS:
        raise InputError(f"removal must be one of {REMOVALS}, got {removal!r}")
    if removal == "replace":
        vocab = hf.vocab_size(model)
        ok = isinstance(replacement_id, int) and not isinstance(replacement_id, bool) and replacement_id >= 0
        if not ok or (vocab is not None and replacement_id >= vocab):
            raise InputError(
                f"removal='replace' needs replacement_id, a token id of the model's vocabulary (e.g. "
                f"tokenizer.pad_token_id or tokenizer.mask_token_id), got {replacement_id!r}"
            )


def _probabilities(model: nn.Module, rows: _Rows, inputs: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    mask = inputs.pop("attention_mask")
    target = rows.target.repeat_interleave(len(mask) // len(rows.ids))
    return target_probs(model, target, mask, batch_size=batch_size, **inputs)


def eraser(
    model: nn.Module,
    input_ids: Any,
    scores: Any,
    target: Any = None,
    *,
    attention_mask: Any = None,
    levels: Sequence[float] = LEVELS,
    removal: str = "delete",
    replacement_id: int | None = None,
    protected: Any = None,
    batch_size: int = 32,
) -> Eraser:
    """ERASER comprehensiveness and sufficiency of ``scores`` ``(n, seq_len)`` (a tensor or a token Importance).

    ``target``: class ids (classifier) or next-token ids (causal LM); default the importance's target, else
    the model's prediction. All rows and levels of both metrics go through the model in batches.
    """
    levels = _check_levels(levels)
    _check_removal(removal, replacement_id, model)
    batch_size = whole(batch_size, "batch_size")
    with preserved(model, weights=False), torch.no_grad():
        rows = _rows(model, input_ids, scores, target, attention_mask, protected, batch_size)
        n, m, length = len(rows.ids), len(levels), rows.ids.shape[1]
        top = top_tokens(rows.scores, rows.scorable, levels)  # (n, m, L)
        drop = torch.cat([top, rows.scorable[:, None] & ~top], 1).reshape(n * 2 * m, length)
        ids = rows.ids.repeat_interleave(2 * m, 0)
        mask = rows.mask.repeat_interleave(2 * m, 0)
        part = _probabilities(
            model, rows, removed(ids, mask, drop, removal, replacement_id, causal=rows.causal), batch_size
        )
    drops = rows.full[:, None] - part.reshape(n, 2 * m)
    return Eraser(levels, rows.full, drops[:, :m], drops[:, m:])


def soft_eraser(
    model: nn.Module,
    input_ids: Any,
    scores: Any,
    target: Any = None,
    *,
    attention_mask: Any = None,
    protected: Any = None,
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Soft-NC and Soft-NS ``(n,)`` of ``scores``, each the mean of ``samples`` random embedding masks.

    NaN where the empty input does not lower the target's probability (the normalisation is undefined).
    """
    samples = whole(samples, "samples")
    batch_size = whole(batch_size, "batch_size")
    if not accepts(model, "inputs_embeds") or not hasattr(model, "get_input_embeddings"):
        raise ModelError("soft comprehensiveness/sufficiency feed input embeddings: the model needs inputs_embeds=")
    with preserved(model, weights=False), torch.no_grad():
        rows = _rows(model, input_ids, scores, target, attention_mask, protected, batch_size)
        embeds = model.get_input_embeddings()(rows.ids)
        s = _minmax(rows.scores, rows.scorable).to(embeds.dtype)
        gen = torch.Generator().manual_seed(seed)
        n, length, d = embeds.shape
        u = torch.rand(n, 2 * samples, length, d, generator=gen, dtype=embeds.dtype).to(embeds.device)
        keep_p = torch.cat([(1 - s)[:, None].expand(n, samples, length), s[:, None].expand(n, samples, length)], 1)
        keep = (u < keep_p[..., None]) | ~rows.scorable[:, None, :, None]
        empty = rows.scorable[:, None, :, None].logical_not().expand(n, 1, length, d)
        masked = embeds[:, None] * torch.cat([keep, empty], 1)
        variants = masked.reshape(n * (2 * samples + 1), length, d)
        mask = rows.mask.repeat_interleave(2 * samples + 1, 0)
        prob = _probabilities(model, rows, {"inputs_embeds": variants, "attention_mask": mask}, batch_size)
    fall = (rows.full[:, None] - prob.reshape(n, 2 * samples + 1)).clamp_min(0)
    comp, suff = fall[:, :samples].mean(1), 1 - fall[:, samples : 2 * samples].mean(1)
    room = fall[:, -1]  # 1 - S(x, 0)
    nan = torch.full_like(room, float("nan"))
    ok = room > 1e-12
    return {
        "soft_nc": torch.where(ok, comp / room.clamp_min(1e-12), nan),
        "soft_ns": torch.where(ok, (suff - (1 - room)) / room.clamp_min(1e-12), nan),
    }


def _minmax(scores: torch.Tensor, scorable: torch.Tensor) -> torch.Tensor:
    lo = scores.masked_fill(~scorable, float("inf")).amin(1, keepdim=True)
    hi = scores.masked_fill(~scorable, float("-inf")).amax(1, keepdim=True)
    return ((scores - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1) * scorable


def disagreement(
    scores: Mapping[str, Any], attention_mask: Any = None, *, k: int = 5, protected: Any = None
) -> dict[str, Any]:
    """Pairwise Spearman and top-``k`` overlap ``(m, m)`` of ``m`` methods' token scores, averaged over rows.

    Only each row's real (and unprotected) tokens are compared. ``scores`` maps a method name to its
    ``(n, seq_len)`` scores (tensor or token Importance), all on the same rows.
    """
    if len(scores) < 2:
        raise InputError("disagreement needs the scores of at least 2 methods")
    names = list(scores)
    first = scores[names[0]]
    shape = tuple((first.values if isinstance(first, Importance) else torch.as_tensor(first)).shape)
    if len(shape) != 2:
        raise InputError(f"scores must be (n, seq_len) per method, got shape {shape}")
    k = whole(k, "k")
    stack = torch.stack([_score_tensor(scores[name], shape).cpu() for name in names])  # (m, n, L)
    mask = check_mask(torch.zeros(shape, dtype=torch.long), None if attention_mask is None else attention_mask.cpu())
    real = (mask == 1) if protected is None else (mask == 1) & ~torch.as_tensor(protected).bool().cpu()
    m, n = len(names), shape[0]
    rho, hit = torch.zeros(m, m, dtype=torch.float64), torch.zeros(m, m, dtype=torch.float64)
    counts = real.sum(1)
    for length in counts.unique().tolist():  # rows of one length are compared together
        rows = (counts == length).nonzero().flatten()
        order = (~real[rows]).long().argsort(dim=1, stable=True)[:, :length]
        group = stack[:, rows].gather(2, order.expand(m, -1, -1))  # (m, r, length)
        a, b = group[:, None].expand(m, m, -1, -1), group[None].expand(m, m, -1, -1)
        rho += spearman(a, b).sum(-1)
        hit += topk_overlap(a, b, min(k, length)).sum(-1)
    return {"methods": names, "spearman": rho / n, f"top{k}_overlap": hit / n}


# --------------------------------------------------------------------- registered metrics
def _eraser_metric(part: str, doc: str) -> Any:
    def eraser_metric(
        model: Any,
        data: Any,
        importance: Importance,
        *,
        target: Any = None,
        attention_mask: Any = None,
        levels: Any = LEVELS,
        removal: str = "delete",
        replacement_id: Any = None,
        protected: Any = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        res = eraser(model, data, importance, target, attention_mask=attention_mask, levels=levels,
                     removal=removal, replacement_id=replacement_id, protected=protected)  # fmt: skip
        per_level = getattr(res, part)
        return per_level.mean(1), {part: (torch.tensor(res.levels), per_level)}

    eraser_metric.__doc__ = doc
    eraser_metric.__name__ = part
    return eraser_metric


def _soft_metric(key: str, doc: str) -> Any:
    def soft_metric(
        model: Any,
        data: Any,
        importance: Importance,
        *,
        target: Any = None,
        attention_mask: Any = None,
        protected: Any = None,
        samples: int = 4,
        seed: int = 0,
    ) -> torch.Tensor:
        return soft_eraser(model, data, importance, target, attention_mask=attention_mask, protected=protected,
                           samples=samples, seed=seed)[key]  # fmt: skip

    soft_metric.__doc__ = doc
    soft_metric.__name__ = key
    return soft_metric


comprehensiveness = metric("comprehensiveness", category="faithfulness", higher_is_better=True, units="token")(
    _eraser_metric(
        "comprehensiveness",
        "ERASER comprehensiveness AOPC: mean fall of the target's probability when the top tokens are removed.",
    )
)
sufficiency = metric("sufficiency", category="faithfulness", higher_is_better=False, units="token")(
    _eraser_metric(
        "sufficiency",
        "ERASER sufficiency AOPC: mean fall of the target's probability when only the top tokens are kept.",
    )
)
soft_comprehensiveness = metric(
    "soft_comprehensiveness", category="faithfulness", higher_is_better=True, units="token", aliases=("soft_nc",)
)(
    _soft_metric(
        "soft_nc", "Soft-NC (Zhao & Aletras 2023): normalised fall of the target as embeddings drop out by score."
    )
)
soft_sufficiency = metric(
    "soft_sufficiency", category="faithfulness", higher_is_better=True, units="token", aliases=("soft_ns",)
)(
    _soft_metric(
        "soft_ns", "Soft-NS (Zhao & Aletras 2023): normalised sufficiency, embeddings kept with probability = score."
    )
)


__all__ = ["LEVELS", "Eraser", "disagreement", "eraser", "removed", "soft_eraser", "top_tokens"]
