"""Feature selection from any :class:`~whatmatters.Importance`, and scoring features without a model.

* :func:`score_features` runs a method that fits its own model on ``(X, y)`` (``needs="fit"``,
  e.g. the ``kan_*`` selectors) and returns an :class:`Importance`; no model is needed.
* :func:`select_features` keeps the top features of any importance (a fraction, a count, or
  named features) and, given the data, returns it reduced to those columns in its own type.
* :func:`sequential_select` adds features in the importance's order (e.g. SHAP) while the
  cross-validated score of an estimator keeps improving: importance-guided forward selection.
"""

from __future__ import annotations

import difflib
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from whatmatters.core.adapters import to_tensor
from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.importance import Importance
from whatmatters.core.params import check_params
from whatmatters.core.registry import SCORERS, get_method
from whatmatters.core.task import Task

__all__ = ["Selection", "score_features", "select_features", "sequential_select"]


def score_features(
    X: Any,
    y: Any,
    method: str = "kan_l2",
    *,
    feature_names: list[str] | None = None,
    seed: int = 0,
    progress: bool | None = None,
    **params: Any,
) -> Importance:
    """Score the columns of ``X`` for predicting ``y`` with a method that fits its own model.

    ``method`` is one of ``whatmatters.methods()`` whose ``needs`` is ``"fit"`` (the ``kan_*``
    selectors); ``**params`` are its parameters (``whatmatters.describe(method)``). A DataFrame's
    columns name the features. Returns an aggregated :class:`Importance` (one score per feature).
    """
    info = get_method(method)
    if info.needs != "fit" or info.verb != "explain":
        fitting = sorted(m.name for m in SCORERS.entries.values() if m.needs == "fit")
        raise MethodError(
            f"{info.name} explains a model, so it needs one: use whatmatters.explain(model, X, {info.name!r}). "
            f"Methods that score features from (X, y) alone: {', '.join(fitting) or 'none'}"
        )
    params = check_params(info.name, params, info.defaults, fn=info.fn)
    inputs, names = to_tensor(X, "X")
    if inputs.ndim != 2:
        raise InputError(f"X must be tabular (n, features), got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        inputs = inputs.to(torch.float64)
    if y is None:
        raise InputError(f"{info.name} fits a model to the labels: pass y (one label per row of X)")
    labels = to_tensor(y, "y")[0]
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (len(inputs),):
        raise InputError(f"y must hold one label per row of X ({len(inputs)}), got shape {tuple(labels.shape)}")
    names = list(feature_names) if feature_names is not None else names
    if names is not None and len(names) != inputs.shape[1]:
        raise InputError(f"{len(names)} feature names for {inputs.shape[1]} columns")
    # ``needs="fit"`` methods fit their own model: they read only inputs, labels, names and seed.
    task = Task(
        model=None,  # type: ignore[arg-type]
        inputs=inputs,
        target=torch.zeros(len(inputs), dtype=torch.long),
        y=labels,
        names=names,
        seed=seed,
        progress=progress,
    )
    start = time.perf_counter()
    out = info.fn(task, **params)
    seconds = time.perf_counter() - start
    return info.to_importance(out, unit="feature", names=names, params=params, seed=seed, seconds=seconds)


@dataclass(frozen=True)
class Selection:
    """The features kept by :func:`select_features`, in their original column order.

    ``indices``: column positions; ``names``: their names (``None`` when the importance has none
    and no DataFrame was given); ``scores``: the aggregated scores used to rank; ``rank``: each
    kept feature's rank among all features (0 = most important); ``data``: the given data reduced
    to the kept columns, in its own type (``None`` when no data was given); ``curve``: for
    :func:`sequential_select`, the cross-validated score after adding each feature in rank order.
    """

    indices: list[int]
    names: list[str] | None
    scores: list[float]
    rank: list[int]
    n_features: int
    data: Any = None
    curve: list[float] | None = None

    @property
    def mask(self) -> np.ndarray:
        """Boolean mask over all features, True where kept (like scikit-learn's ``get_support()``)."""
        mask = np.zeros(self.n_features, dtype=bool)
        mask[self.indices] = True
        return mask

    def __len__(self) -> int:
        return len(self.indices)


def _count(keep: Any, d: int) -> int:
    if isinstance(keep, (bool, np.bool_)):
        raise InputError(f"keep={keep!r} is a bool; give a fraction in (0, 1], a count, or a list of features")
    if isinstance(keep, numbers.Integral):
        if not 1 <= keep <= d:
            raise InputError(f"keep={keep} features is out of range: choose a count from 1 to {d} (or a fraction)")
        return int(keep)
    if isinstance(keep, numbers.Real):
        if not (0 < keep <= 1) or math.isnan(keep):
            raise InputError(
                f"keep={keep!r} is not a fraction in (0, 1]; give a fraction (0.4 keeps 40 %), "
                f"an int count from 1 to {d}, or a list of feature names"
            )
        return max(1, math.ceil(keep * d - 1e-9))
    raise InputError(
        f"keep must be a fraction in (0, 1], an int count or a list of feature names/indices, got {type(keep).__name__}"
    )


def _chosen(keep: Sequence[Any], names: list[str] | None, d: int) -> list[int]:
    items = list(keep)
    if not items:
        raise InputError("keep is an empty list; name at least one feature")
    if all(isinstance(k, str) for k in items):
        if names is None:
            raise InputError("keep lists names, but the features have none; pass indices or a DataFrame as data")
        lookup = {n: i for i, n in enumerate(names)}
        unknown = [k for k in items if k not in lookup]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise InputError(f"unknown feature(s) {unknown}.{hint}")
        idx = [lookup[k] for k in items]
    elif all(isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_)) for k in items):
        idx = [int(k) for k in items]
        bad = [i for i in idx if not 0 <= i < d]
        if bad:
            raise InputError(f"feature indices {bad} are out of range 0..{d - 1}")
    else:
        raise InputError("keep must list feature names (str) or column indices (int), not a mix")
    if len(set(idx)) != len(idx):
        raise InputError(f"keep lists a feature twice: {items}")
    return idx


def _reduce(data: Any, idx: list[int], names: list[str] | None, d: int) -> Any:
    if hasattr(data, "iloc") and hasattr(data, "columns"):
        if data.shape[1] != d:
            raise InputError(f"data has {data.shape[1]} columns but the importance scores {d} features")
        columns = [str(c) for c in data.columns]
        if names is not None and sorted(columns) == sorted(names) and columns != names:
            pos = {c: i for i, c in enumerate(columns)}
            return data.iloc[:, sorted(pos[names[i]] for i in idx)].copy()
        if names is not None and columns != names:
            raise InputError(
                f"the DataFrame's columns {columns[:5]}... differ from the importance's feature names {names[:5]}...; "
                "pass the data the importance was computed on"
            )
        return data.iloc[:, idx].copy()
    if isinstance(data, torch.Tensor):
        if data.ndim != 2 or data.shape[1] != d:
            raise InputError(f"data has shape {tuple(data.shape)}; need (n, {d})")
        return data[:, torch.as_tensor(idx, device=data.device)].clone()
    array = np.asarray(data)
    if array.ndim != 2 or array.shape[1] != d:
        raise InputError(f"data has shape {array.shape}; need (n, {d})")
    return array[:, idx]


def select_features(importance: Importance, keep: Any = 0.4, data: Any = None) -> Selection:
    """Keep the most important features.

    Args:
        importance: any :class:`Importance` over a one-dimensional unit axis (features); per-sample
            scores are aggregated by mean absolute value first. Features are ranked by absolute
            score (ties: the earlier column first).
        keep: a float in ``(0, 1]`` keeps that fraction of the features (rounded up, at least
            one: 0.4 of 30 keeps 12); an int keeps that many; a list keeps the named features
            (names or column indices).
        data: optional ``(n, features)`` DataFrame, NumPy array or tensor; returned reduced to the
            kept columns, in the same type (a DataFrame is matched by column names when the
            importance has names). The input is never modified.

    Returns:
        A :class:`Selection` (indices, names, scores, rank, and the reduced data).
    """
    if not isinstance(importance, Importance):
        raise InputError(f"select_features needs an Importance, got {type(importance).__name__}")
    if len(importance.unit_shape) != 1:
        raise InputError(
            f"select_features needs one score per feature; this importance has unit shape {importance.unit_shape}"
        )
    agg = importance.aggregate("mean_abs") if importance.per_sample else importance
    scores = agg.values.detach().cpu().double().abs()
    if not bool(torch.isfinite(scores).all()):
        raise InputError("the importance has NaN or infinite scores; cannot rank features")
    d = int(scores.shape[0])
    names = list(agg.names) if agg.names is not None else None
    if names is None and data is not None and hasattr(data, "columns"):
        names = [str(c) for c in data.columns] if len(data.columns) == d else None
    order = torch.argsort(-scores, stable=True)
    rank = torch.empty(d, dtype=torch.long)
    rank[order] = torch.arange(d)
    if isinstance(keep, (str, bytes)):
        raise InputError(f"keep={keep!r}: to keep one named feature, pass a list: keep=[{keep!r}]")
    if isinstance(keep, (list, tuple, np.ndarray, torch.Tensor)):
        idx = sorted(_chosen(keep.tolist() if hasattr(keep, "tolist") else keep, names, d))
    else:
        idx = sorted(order[: _count(keep, d)].tolist())
    return Selection(
        indices=idx,
        names=[names[i] for i in idx] if names is not None else None,
        scores=[float(scores[i]) for i in idx],
        rank=[int(rank[i]) for i in idx],
        n_features=d,
        data=_reduce(data, idx, names, d) if data is not None else None,
    )


def sequential_select(
    importance: Importance,
    estimator: Any,
    X: Any,
    y: Any,
    *,
    cv: Any = 5,
    scoring: Any = None,
    tol: float = 1e-3,
    patience: int = 2,
    max_features: int | None = None,
) -> Selection:
    """Importance-guided forward selection: add features from most to least important while CV improves.

    Features are added one at a time in the order of ``importance`` (e.g. ``wm.explain(model, X,
    "tree_shap")``); after each, ``estimator`` (a fresh clone) is scored by scikit-learn's
    ``cross_val_score(..., cv=cv, scoring=scoring)``. The search stops once ``patience`` additions in a row
    fail to beat the best mean score by more than ``tol`` (or at ``max_features``); the smallest prefix
    with the best score is kept. One fit per fold and step: ``k`` steps cost ``k * cv`` fits, not the
    ``d^2 * cv`` of exhaustive forward selection. Returns a :class:`Selection` with ``curve`` (the score of
    every prefix tried) and ``data`` (``X`` reduced to the kept columns).
    """
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    ranked = select_features(importance, keep=1.0)
    d = ranked.n_features
    if not isinstance(patience, numbers.Integral) or isinstance(patience, bool) or patience < 1:
        raise InputError(f"patience must be a whole number >= 1, got {patience!r}")
    if not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
        raise InputError(f"tol must be a finite number >= 0, got {tol!r}")
    limit = d if max_features is None else _count(max_features, d)
    if getattr(X, "shape", (None, None))[1:2] != (d,):
        raise InputError(f"X must have one column per scored feature ({d}), got shape {getattr(X, 'shape', None)}")
    order = sorted(range(d), key=lambda i: ranked.rank[i])  # keep=1.0: indices are 0..d-1
    curve: list[float] = []
    best, best_k, stale = -math.inf, 0, 0
    for k in range(1, limit + 1):
        part = _reduce(X, sorted(order[:k]), ranked.names, d)
        score = float(np.mean(cross_val_score(clone(estimator), part, y, cv=cv, scoring=scoring)))
        if not math.isfinite(score):
            raise InputError(f"the cross-validated score is {score} with {k} features; check y and scoring")
        curve.append(score)
        if score > best + tol or best_k == 0:
            best, best_k, stale = max(best, score), k, 0
        else:
            stale += 1
            if stale >= patience:
                break
    kept = select_features(importance, keep=sorted(order[:best_k]), data=X)
    return Selection(**{**kept.__dict__, "curve": curve})
