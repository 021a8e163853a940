"""Ground truth: do the top-scored units coincide with the units known to matter?

``relevant`` names those units, in the same way for every function here:

* a list of unit indices (flat indices into the unit axis) or unit names (feature names), the same
  for every sample;
* a boolean mask of the unit shape (the same for every sample) or of shape ``(n, *unit_shape)``
  (one per sample, e.g. segmentation masks of objects in images); for scores of shape
  ``(C, H, W)`` an ``(H, W)`` or ``(n, H, W)`` pixel mask is repeated over the channels.

Integer arrays are read as indices, never as masks: pass ``dtype=bool`` for a mask.

Scores are ranked by absolute value by default (a feature that pushes the output down matters as
much as one that pushes it up); ``by_abs=False`` ranks by signed value. With ``aggregate=None``
(default) the importance is reduced over samples (mean absolute score, or mean with
``by_abs=False``) when the ground truth is the same for every sample, and scored sample by sample
when it is a per-sample mask. Ties are resolved fairly: tied units share their expected credit
instead of being ordered by index.

Scores are returned per sample (shape ``(n,)``) or as one value (shape ``()``) when aggregated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from whatmatters.core.errors import InputError
from whatmatters.core.importance import Importance
from whatmatters.core.task import Task
from whatmatters.evaluate.metrics import metric


def _over_channels(mask: np.ndarray, unit_shape: tuple[int, ...], n: int | None) -> np.ndarray:
    """A pixel mask ``(H, W)`` or ``(n, H, W)`` repeated over the channels of ``(C, H, W)`` scores."""
    if len(unit_shape) != 3 or mask.shape[-2:] != unit_shape[1:]:
        return mask
    if mask.shape == unit_shape[1:]:
        return np.broadcast_to(mask[None], unit_shape)
    if n is not None and mask.shape == (n, *unit_shape[1:]):
        return np.broadcast_to(mask[:, None], (n, *unit_shape))
    return mask


def relevant_mask(
    relevant: Any, unit_shape: Sequence[int], names: Sequence[str] | None = None, n: int | None = None
) -> tuple[torch.Tensor, bool]:
    """``(mask, per_sample)``: boolean ``(1 or n, n_units)`` mask of the relevant units (see the module docs).

    ``per_sample`` tells whether ``relevant`` was a per-sample mask of shape ``(n, *unit_shape)``.
    """
    unit_shape = tuple(unit_shape)
    d = int(np.prod(unit_shape)) if unit_shape else 1
    if isinstance(relevant, torch.Tensor):
        relevant = relevant.detach().cpu().numpy()
    if isinstance(relevant, (str, bytes)):
        relevant = [relevant]
    try:
        array = np.asarray(relevant)
    except ValueError as err:
        raise InputError(f"relevant is ragged or not array-like: {err}") from None
    if array.dtype == np.bool_:
        array = _over_channels(array, unit_shape, n)
        if array.shape == unit_shape:
            mask, per_sample = array.reshape(1, d), False
        elif n is not None and array.shape == (n, *unit_shape):
            mask, per_sample = array.reshape(n, d), True
        else:
            per_sample = f" or {(n, *unit_shape)}" if n is not None else ""
            raise InputError(
                f"relevant mask has shape {array.shape}; it must have the unit shape {unit_shape}{per_sample}"
            )
        if not mask.any(1).all():
            raise InputError("relevant marks no unit as relevant (in at least one sample); mark at least one")
        return torch.from_numpy(mask.copy()), per_sample
    flat = array.reshape(-1)
    if flat.size == 0:
        raise InputError("relevant is empty; give the indices, names or a boolean mask of the units that matter")
    if flat.dtype.kind in "USO":
        if names is None:
            raise InputError(
                "relevant units are given by name but the importance has no unit names; give indices instead"
            )
        lookup = {str(name): i for i, name in enumerate(names)}
        unknown = [str(v) for v in flat if str(v) not in lookup]
        if unknown:
            raise InputError(f"unknown unit name(s) {unknown} in relevant; the units are {list(names)}")
        index = np.array([lookup[str(v)] for v in flat])
    elif flat.dtype.kind in "iu" or (flat.dtype.kind == "f" and np.all(flat == np.round(flat))):
        index = flat.astype(np.int64)
        if (index < 0).any() or (index >= d).any():
            raise InputError(
                f"relevant unit index {int(index[(index < 0) | (index >= d)][0])} is out of range 0..{d - 1}"
            )
    else:
        raise InputError(
            f"relevant must be unit indices, unit names or a boolean mask, got values of dtype {flat.dtype}"
        )
    mask = torch.zeros(1, d, dtype=torch.bool)
    mask[0, torch.from_numpy(index)] = True
    return mask, False


def _prepare(
    importance: Importance, relevant: Any, aggregate: bool | None, by_abs: bool
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(scores (rows, d), mask (rows, d), aggregated)`` with scores made non-negative when ``by_abs``."""
    if not isinstance(importance, Importance):
        raise InputError(f"expected an Importance, got a {type(importance).__name__}")
    n = importance.n_samples
    mask, per_sample_truth = relevant_mask(relevant, importance.unit_shape, importance.names, n)
    if aggregate is None:
        aggregate = not per_sample_truth
    if aggregate and per_sample_truth:
        raise InputError("aggregate=True needs ground truth shared by all samples, but relevant is a per-sample mask")
    imp = importance.aggregate("mean_abs" if by_abs else "mean") if aggregate else importance
    scores = imp._flat().detach().to("cpu", torch.float64)
    if torch.isnan(scores).any():
        raise InputError(f"the {importance.method or 'given'} importance contains NaN scores")
    if by_abs:
        scores = scores.abs()
    return scores, mask.expand(scores.shape[0], -1), not imp.per_sample


def _out(values: torch.Tensor, aggregated: bool) -> torch.Tensor:
    return values[0] if aggregated else values


def precision_at_k(
    importance: Importance,
    relevant: Any,
    k: int | None = None,
    *,
    aggregate: bool | None = None,
    by_abs: bool = True,
) -> torch.Tensor:
    """Fraction of the ``k`` top-scored units that are relevant (``k`` defaults to the number of relevant units).

    With the default ``k`` this is also the recall of the relevant units. Units tied at the k-th
    score share the remaining places in proportion, so a constant scorer gets the expected
    precision of a random order, ``|relevant| / n_units``.
    """
    scores, mask, aggregated = _prepare(importance, relevant, aggregate, by_abs)
    rows, d = scores.shape
    if k is None:
        kk = mask.sum(1)
    else:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= d:
            raise InputError(f"k must be an integer between 1 and the number of units ({d}), got {k!r}")
        kk = torch.full((rows,), int(k))
    kth = scores.sort(1, descending=True).values.gather(1, (kk - 1).unsqueeze(1))
    above, tied = scores > kth, scores == kth
    hits = (above & mask).sum(1).double() + (kk - above.sum(1)).double() * (tied & mask).sum(1) / tied.sum(1)
    return _out(hits / kk, aggregated)


def relevance_mass(
    importance: Importance, relevant: Any, *, aggregate: bool | None = None, by_abs: bool = True
) -> torch.Tensor:
    """Share of the total importance that falls on relevant units (Arras et al., 2022), in [0, 1].

    ``by_abs=False`` counts positive scores only (negative ones set to 0), as in the paper. Samples
    whose scores are all zero give NaN.
    """
    scores, mask, aggregated = _prepare(importance, relevant, aggregate, by_abs)
    scores = scores.clamp_min(0)
    total = scores.sum(1)
    inside = (scores * mask).sum(1)
    mass = torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), float("nan"))
    return _out(mass, aggregated)


def pointing_game(
    importance: Importance, relevant: Any, *, aggregate: bool | None = None, by_abs: bool = True
) -> torch.Tensor:
    """1 when the top-scored unit is relevant, else 0 (Zhang et al., 2018), on flattened units.

    Several units tied at the top score give the fraction of them that are relevant. No tolerance
    margin is applied: dilate the mask first to reproduce the paper's 15-pixel tolerance.
    """
    scores, mask, aggregated = _prepare(importance, relevant, aggregate, by_abs)
    top = scores == scores.amax(1, keepdim=True)
    return _out((top & mask).sum(1).double() / top.sum(1), aggregated)


def _with_names(importance: Importance, names: Sequence[str] | None) -> Importance:
    """The importance named after the data's columns when it has no names of its own."""
    if importance.names is None and names is not None and importance.unit_shape == (len(names),):
        from dataclasses import replace

        return replace(importance, names=tuple(names))
    return importance


@metric(
    "precision@k",
    category="localization",
    higher_is_better=True,
    units=("feature", "pixel", "token"),
    needs="relevant",
    aliases=("precision_at_k",),
)
def _precision_metric(
    task: Task,
    importance: Importance,
    *,
    relevant: Any,
    k: int | None = None,
    aggregate: bool | None = None,
    by_abs: bool = True,
) -> torch.Tensor:
    """Precision@k: fraction of the k top-scored units that are known to be relevant (k: number of relevant units).

    Ranks by absolute score (``by_abs``); aggregates over samples when the ground truth is shared.
    A random order scores ``|relevant| / n_units`` on average.
    """
    return precision_at_k(_with_names(importance, task.names), relevant, k, aggregate=aggregate, by_abs=by_abs)


def _localization_metric(score: Callable[..., torch.Tensor], doc: str) -> Callable[..., torch.Tensor]:
    def localization(
        task: Task,
        importance: Importance,
        *,
        relevant: Any,
        aggregate: bool | None = None,
        by_abs: bool = True,
    ) -> torch.Tensor:
        return score(_with_names(importance, task.names), relevant, aggregate=aggregate, by_abs=by_abs)

    localization.__name__ = localization.__qualname__ = f"_{score.__name__}_metric"
    localization.__doc__ = doc
    return localization


_LOCALIZATION = {"category": "localization", "higher_is_better": True, "units": ("feature", "pixel", "token")}
metric("relevance_mass", needs="relevant", **_LOCALIZATION)(
    _localization_metric(
        relevance_mass, "Relevance mass: share of the total (absolute) importance on the relevant units."
    )
)
metric("pointing_game", needs="relevant", **_LOCALIZATION)(
    _localization_metric(pointing_game, "Pointing game: is the top-scored unit a relevant one (1) or not (0).")
)
