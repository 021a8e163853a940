"""Rank statistics (average ranks, Spearman, Kendall, top-k overlap) and the agreement of two importances.

They live in core because ``Importance.agreement`` uses them; ``whatmatters.evaluate.agreement``
re-exports them for evaluation code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from whatmatters.core.errors import InputError

if TYPE_CHECKING:
    from whatmatters.core.importance import Importance

# Kendall's tau is computed from all unit pairs up to this many units, from scipy above it.
_PAIRWISE_LIMIT = 2000


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank) along the last axis."""
    x = x.double()
    order = x.argsort(dim=-1, stable=True)
    sorted_x = x.gather(-1, order)
    n = x.shape[-1]
    pos = torch.arange(n, dtype=torch.float64, device=x.device).expand_as(x)
    # start index of each run of equal values, and its end
    new_run = torch.ones_like(sorted_x, dtype=torch.bool)
    new_run[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    run_id = new_run.cumsum(-1) - 1
    first = torch.zeros_like(sorted_x).scatter_reduce(-1, run_id, pos, reduce="amin", include_self=False)
    last = torch.zeros_like(sorted_x).scatter_reduce(-1, run_id, pos, reduce="amax", include_self=False)
    mean_rank = ((first + last) / 2).gather(-1, run_id)
    return torch.empty_like(mean_rank).scatter_(-1, order, mean_rank)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row pair of ``a`` and ``b`` (shape ``(rows, units)``)."""
    ra, rb = ranks(a), ranks(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    den = (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-300)
    return (ra * rb).sum(-1) / den


def kendall(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b of each row pair."""
    if a.shape[-1] > _PAIRWISE_LIMIT:
        from scipy.stats import kendalltau

        return torch.tensor([kendalltau(x, y).statistic for x, y in zip(a.cpu().numpy(), b.cpu().numpy())])
    da = torch.sign(a.unsqueeze(-1) - a.unsqueeze(-2)).double()
    db = torch.sign(b.unsqueeze(-1) - b.unsqueeze(-2)).double()
    concord = (da * db).sum((-1, -2))
    den = ((da != 0).sum((-1, -2)).double() * (db != 0).sum((-1, -2)).double()).sqrt().clamp_min(1e-300)
    return concord / den


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of the ``k`` highest units of each row of ``a`` also among the ``k`` highest of ``b``."""
    ia = a.topk(k, dim=-1).indices
    ib = b.topk(k, dim=-1).indices
    hit = (ia.unsqueeze(-1) == ib.unsqueeze(-2)).any(-1)
    return hit.double().mean(-1)


def rank_agreement(a: Importance, b: Importance, k: int | None = None, by_abs: bool = True) -> dict[str, float]:
    """Spearman, Kendall and top-k overlap between two importances (averaged over samples)."""
    if a.unit_shape != b.unit_shape:
        raise InputError(f"cannot compare importances over units of shape {a.unit_shape} and {b.unit_shape}")
    if a.per_sample != b.per_sample or (a.per_sample and a.n_samples != b.n_samples):
        a, b = a.aggregate(), b.aggregate()
    fa, fb = a._flat().cpu(), b._flat().cpu()
    if by_abs:
        fa, fb = fa.abs(), fb.abs()
    n_units = fa.shape[1]
    k = max(1, round(0.1 * n_units)) if k is None else min(k, n_units)
    return {
        "spearman": float(spearman(fa, fb).mean()),
        "kendall": float(kendall(fa, fb).mean()),
        f"top{k}_overlap": float(topk_overlap(fa, fb, k).mean()),
    }
