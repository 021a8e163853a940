"""Driveability segmentation losses: soft ordinal labels and safety-weighted pixels, as ``torch.nn`` modules.

Classes are ordered levels (e.g. 0 = not driveable, 1 = with care, 2 = driveable). A pixel of level ``k`` gets the
soft target ``softmax(-scale * distance[k])`` over the levels, so confusing road with sidewalk costs less than road
with a wall. The safety weight map gives more weight to the pixels where a mistake is dangerous: boundaries between
driveable and non-driveable, the region in front of the vehicle and rare dangerous classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core.errors import InputError
from whatmatters.core.fractions import kept_share


def ordinal_distances(levels: int) -> torch.Tensor:
    """``|i - j|`` for ``levels`` ordered levels."""
    idx = torch.arange(levels, dtype=torch.float32)
    return (idx[:, None] - idx[None, :]).abs()


def check_ordinal(distances: torch.Tensor) -> torch.Tensor:
    """``distances`` if it is an ordinal distance matrix: square, finite, zero diagonal, symmetric, growing away
    from the diagonal along every row; ``InputError`` naming what fails otherwise."""
    d = torch.as_tensor(distances, dtype=torch.float32)
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 2:
        raise InputError(f"class distances must be a square matrix over 2 or more levels, got {tuple(d.shape)}")
    if not torch.isfinite(d).all() or (d < 0).any():
        raise InputError("class distances must be finite and non-negative")
    if d.diagonal().abs().max() > 0 or not torch.allclose(d, d.T):
        raise InputError("class distances must be 0 on the diagonal and symmetric (distance(i, j) = distance(j, i))")
    step = d.diff(dim=1)  # step[i, j] = d[i, j + 1] - d[i, j]
    i = torch.arange(d.shape[0])[:, None]
    j = torch.arange(d.shape[1] - 1)[None, :]
    ordinal = torch.where(j >= i, step >= 0, step <= 0)  # growing right of the diagonal, shrinking left of it
    if not ordinal.all():
        raise InputError(
            "class distances are not ordinal: along each row they must grow away from the diagonal "
            "(levels ordered, e.g. |i - j|); reorder the levels or fix the matrix"
        )
    return d


def soft_ordinal_targets(labels: torch.Tensor, distances: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Soft targets ``(N, K, ...)`` for integer ``labels`` ``(N, ...)``: ``softmax(-scale * distances[label])``."""
    d = check_ordinal(distances).to(labels.device)
    soft = torch.softmax(-scale * d, dim=1)[labels.long()]  # (N, ..., K)
    return soft.movedim(-1, 1)


class SoftOrdinalLoss(nn.Module):
    """Cross-entropy against soft ordinal targets, averaged over pixels (optionally with a weight map).

    Args:
        levels: the number of ordered levels, or a ``(K, K)`` ordinal distance matrix.
        scale: sharpness of the soft target (large: one-hot).
    """

    def __init__(self, levels: int | torch.Tensor = 3, scale: float = 2.0) -> None:
        super().__init__()
        d = ordinal_distances(levels) if isinstance(levels, int) else check_ordinal(levels)
        if not scale > 0:
            raise InputError(f"scale must be > 0, got {scale!r}")
        self.register_buffer("distances", d)
        self.scale = float(scale)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if logits.shape[1] != self.distances.shape[0]:
            raise InputError(f"logits have {logits.shape[1]} channels for {self.distances.shape[0]} ordinal levels")
        target = soft_ordinal_targets(labels, self.distances, self.scale).to(logits.dtype)
        per_pixel = -(target * F.log_softmax(logits, dim=1)).sum(1)
        return _weighted_mean(per_pixel, weight)


def _weighted_mean(per_pixel: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_pixel.mean()
    if weight.shape != per_pixel.shape or not torch.isfinite(weight).all() or (weight < 0).any():
        raise InputError(f"the weight map must be finite, >= 0 and of shape {tuple(per_pixel.shape)}")
    return (weight * per_pixel).sum() / weight.sum().clamp_min(1e-12)


def safety_weights(
    levels: torch.Tensor,
    classes: torch.Tensor | None = None,
    *,
    driveable: int = 2,
    boundary: float = 2.0,
    front: float = 1.0,
    front_rows: float = 0.35,
    front_cols: float = 0.5,
    danger: float = 2.0,
    danger_classes: tuple[int, ...] = (),
) -> torch.Tensor:
    """Per-pixel weights ``(N, H, W)``: 1, plus ``boundary`` within one pixel of a driveable / non-driveable edge
    (``levels >= driveable`` is driveable), plus ``front`` in the bottom ``front_rows`` x central ``front_cols`` of
    the image (in front of the vehicle), plus ``danger`` on pixels whose ``classes`` are in ``danger_classes``."""
    if levels.ndim != 3:
        raise InputError(f"levels must be a (N, H, W) map, got shape {tuple(levels.shape)}")
    rows, cols = kept_share(front_rows, "front_rows", of="rows"), kept_share(front_cols, "front_cols", of="columns")
    drive = (levels >= driveable).float().unsqueeze(1)
    edge = (F.max_pool2d(drive, 3, 1, 1) != -F.max_pool2d(-drive, 3, 1, 1)).squeeze(1)
    n, h, w = levels.shape
    ys = torch.arange(h, device=levels.device)[:, None]
    xs = torch.arange(w, device=levels.device)[None, :]
    ahead = (ys >= h * (1 - rows)) & ((xs - (w - 1) / 2).abs() <= w * cols / 2)
    weight = 1 + boundary * edge.float() + front * ahead.float().expand(n, h, w)
    if danger_classes:
        if classes is None or classes.shape != levels.shape:
            raise InputError("danger_classes need the class map `classes` of the same shape as `levels`")
        weight = weight + danger * torch.isin(classes, torch.tensor(danger_classes, device=classes.device)).float()
    return weight


class SafetyWeightedLoss(nn.Module):
    """A pixel loss (default :class:`SoftOrdinalLoss`) weighted by :func:`safety_weights`.

    ``forward(logits, levels, classes=None)``; ``weights`` are the keyword arguments of :func:`safety_weights`.
    """

    def __init__(self, base: nn.Module | None = None, **weights: float | int | tuple) -> None:
        super().__init__()
        self.base = base if base is not None else SoftOrdinalLoss()
        self.weights = weights

    def forward(self, logits: torch.Tensor, levels: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return self.base(logits, levels, safety_weights(levels, classes, **self.weights))
