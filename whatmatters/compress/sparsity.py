"""Sparsity masks from weight importance: patterns (unstructured, N:M), comparison groups, allocation.

A mask is a bool tensor ``(out_features, in_features)``, ``True`` = keep. Within a comparison group
the lowest-scored weights are pruned; exactly ``floor(group size x sparsity)`` of them (ties broken by
position, stably), so the achieved sparsity is exact even for quantized weights with many equal values.

* ``pattern="unstructured"``, ``group="row"``: each output row is its own group (Wanda's choice);
  ``group="layer"``: the whole layer (the usual magnitude baseline).
* ``pattern="N:M"`` (e.g. ``"2:4"``): ``N`` weights kept in every ``M`` consecutive inputs of each row
  (NVIDIA's convention; sparsity ``1 - N/M``). ``M`` must divide the layer's input size.
* ``allocation="uniform"``: every layer at the target sparsity; ``"global"``: one threshold over all
  layers' scores (meaningful when scores are comparable across layers, e.g. magnitude);
  ``"proportional"``: layer sparsity falls as the layer's mean score rises — density proportional to
  the mean score, bounded to ``target ± spread`` and shifted so the parameter-weighted mean sparsity
  equals the target.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from whatmatters.core.errors import InputError
from whatmatters.core.fractions import removed_share

PATTERNS = ("unstructured", "N:M")
ALLOCATIONS = ("uniform", "global", "proportional")
GROUPS = ("row", "layer")


def check_sparsity(sparsity: object) -> float:
    """``sparsity`` (the share of weights set to zero) as a float in [0, 1)."""
    return removed_share(sparsity, "sparsity", of="weights (set to zero)", example="0.5")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``None`` for unstructured, ``(n, m)`` for ``"n:m"`` (n kept of every m)."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if match is None:
        raise InputError(f"unknown sparsity pattern {pattern!r}; use 'unstructured' or 'N:M' such as '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n <= m:
        raise InputError(f"pattern {pattern!r}: N:M keeps N of every M weights, so it needs 1 <= N <= M")
    return n, m


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of a 2-D tensor pruning the ``k`` lowest entries of every row.

    The k-th value of each row is the threshold; entries equal to it are pruned left to right until
    ``k`` are gone, which is exactly what a stable sort would prune (and faster than sorting).
    """
    cols = scores.shape[1]
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.zeros_like(scores, dtype=torch.bool)
    s = scores.float()
    threshold = s.kthvalue(k, dim=1, keepdim=True).values
    below = s < threshold
    tie = s == threshold
    need = k - below.sum(1, keepdim=True)
    return ~(below | (tie & (tie.cumsum(1) <= need)))


def _count(n: int, sparsity: float) -> int:
    return min(n, int(n * sparsity + 1e-9))


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Prune ``floor(group size x sparsity)`` lowest weights per output row (``"row"``) or per layer."""
    if group not in GROUPS:
        raise InputError(f"unknown comparison group {group!r}; choose one of {', '.join(GROUPS)}")
    if group == "row":
        return _prune_lowest(scores, _count(scores.shape[1], sparsity))
    return _prune_lowest(scores.reshape(1, -1), _count(scores.numel(), sparsity)).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int, name: str = "layer") -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive inputs in each output row."""
    rows, cols = scores.shape
    if cols % m:
        raise InputError(
            f"{name} has {cols} inputs, not divisible by M={m}, so an {n}:{m} pattern does not fit; "
            f"choose an M that divides {cols} or leave the layer out with layers='regex'"
        )
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.float().topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def layer_sparsities(
    scores: Mapping[str, torch.Tensor], sparsity: float, allocation: str = "uniform", *, spread: float = 0.1
) -> dict[str, float]:
    """Target sparsity of every layer under ``uniform`` or ``proportional`` allocation."""
    if allocation == "uniform":
        return dict.fromkeys(scores, sparsity)
    if allocation != "proportional":
        raise InputError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if not 0 <= spread <= 1:
        raise InputError(f"spread must be in [0, 1], got {spread!r}")
    names = list(scores)
    sizes = torch.tensor([scores[n].numel() for n in names], dtype=torch.float64)
    means = torch.stack([scores[n].double().mean().cpu() for n in names])
    weighted = (sizes * means).sum() / sizes.sum()
    density = 1.0 - sparsity
    rel = means / weighted if float(weighted) > 0 else torch.ones_like(means)
    lo = torch.full_like(rel, max(density - spread, 0.0))
    hi = torch.full_like(rel, min(density + spread, 1.0))

    def total(shift: float) -> torch.Tensor:
        return (sizes * (density * rel + shift).clamp(lo, hi)).sum() / sizes.sum()

    # total(shift) rises monotonically from all-at-lower-bound to all-at-upper-bound: bisect the shift
    a, b = -(density * float(rel.max()) + 1.0), 1.0 + density
    for _ in range(100):
        mid = (a + b) / 2
        a, b = (mid, b) if float(total(mid)) < density else (a, mid)
    dens = (density * rel + (a + b) / 2).clamp(lo, hi)
    return {n: float(min(max(1.0 - d, 0.0), 0.999999)) for n, d in zip(names, dens.tolist())}


def _global_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all layers; exactly ``floor(total x sparsity)`` weights pruned (ties by order)."""
    total = sum(s.numel() for s in scores.values())
    k = _count(total, sparsity)
    if k == 0:
        return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    flat = torch.cat([s.reshape(-1).float().cpu() for s in scores.values()])
    threshold = flat.kthvalue(k).values
    below = int((flat < threshold).sum())
    ties_left = k - below  # weights equal to the threshold that still have to go, first come first pruned
    masks = {}
    for n, s in scores.items():
        s = s.float()
        keep = s > threshold
        tie = s == threshold
        n_tie = int(tie.sum())
        if n_tie and ties_left > 0:
            take = min(ties_left, n_tie)
            tie_flat = tie.reshape(-1)
            idx = tie_flat.nonzero().squeeze(1)[take:]
            keep_flat = keep.reshape(-1).clone()
            keep_flat[idx] = True
            keep = keep_flat.reshape(s.shape)
            ties_left -= take
        else:
            keep = keep | tie
        masks[n] = keep
    return masks


def masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float | None = None,
    pattern: str = "unstructured",
    allocation: str = "uniform",
    *,
    group: str = "row",
    spread: float = 0.1,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Keep-masks ``{layer: (out, in) bool}`` and the target sparsity of each layer.

    ``scores`` maps layer names to ``(out, in)`` score tensors (a ``ModelImportance``'s values).
    ``sparsity`` defaults to 0.5 (unstructured) or ``1 - N/M``; for N:M a different value is an error.
    """
    if allocation not in ALLOCATIONS:
        raise InputError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    nm = parse_pattern(pattern)
    if nm is not None:
        n, m = nm
        implied = 1 - n / m
        if sparsity is not None and not math.isclose(check_sparsity(sparsity), implied, abs_tol=1e-9):
            raise InputError(
                f"pattern {pattern!r} fixes the sparsity at {implied:g}; drop sparsity= or use 'unstructured'"
            )
        if allocation != "uniform":
            raise InputError(f"pattern {pattern!r} fixes every layer's sparsity; use allocation='uniform'")
        return {name: nm_mask(s, n, m, name) for name, s in scores.items()}, dict.fromkeys(scores, implied)
    target = check_sparsity(0.5 if sparsity is None else sparsity)
    if allocation == "global":
        return _global_masks(scores, target), dict.fromkeys(scores, target)
    per_layer = layer_sparsities(scores, target, allocation, spread=spread)
    return {name: unstructured_mask(s, per_layer[name], group) for name, s in scores.items()}, per_layer
