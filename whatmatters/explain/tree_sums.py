"""Fitted tree ensembles as sums of trees, so that shuffling one feature re-runs only the trees that split on it.

A scikit-learn forest (``RandomForest*``, ``ExtraTrees*``, a single ``DecisionTree*``) or
``HistGradientBoosting*`` model predicts ``link(base + sum_t tree_t(x))``. A tree that never splits on column
``j`` gives the same output whatever column ``j`` holds, so the prediction on data with column ``j`` shuffled
is the sum of the other trees on the original rows plus the trees that use ``j`` on the shuffled rows.
:func:`tree_sum` reads that structure from the fitted model (forests through their
public ``estimators_`` and ``tree_``; gradient boosting through its ``_predictors``, ``_baseline_prediction``
and ``_loss``, private attributes); the caller checks it against the model's own outputs before use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

TreeFn = Callable[[np.ndarray], np.ndarray]  # prepared rows (n, d) -> raw outputs of one tree, (n, k) or (n,)


@dataclass
class TreeSum:
    """``outputs(x) = link(base + sum_t trees[t](prepare(x)))``. ``features[t]``: the columns tree ``t`` splits
    on; ``columns[t]``: the raw output column a ``(n,)`` tree adds to (None: the tree gives all ``k``)."""

    trees: list[TreeFn]
    features: list[np.ndarray]
    columns: list[int | None]
    base: np.ndarray  # (k,) raw offset
    link: Callable[[np.ndarray], np.ndarray]  # (n, k) raw sums -> the model's outputs (n, outputs)
    prepare: Callable[[Any], np.ndarray]

    def users(self, d: int) -> list[list[int]]:
        """For each of the ``d`` columns, the trees that split on it."""
        out: list[list[int]] = [[] for _ in range(d)]
        for t, columns in enumerate(self.features):
            for j in columns:
                out[int(j)].append(t)
        return out

    def add(self, t: int, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out += `` tree ``t``'s raw output on prepared rows ``x`` (``out``: ``(len(x), k)``); returns ``out``."""
        column = self.columns[t]
        if column is None:
            out += self.trees[t](x)
        else:
            out[:, column] += self.trees[t](x)
        return out


def tree_sum(estimator: Any) -> TreeSum | None:
    """The tree-sum form of a fitted forest or histogram gradient boosting model; None for anything else."""
    if getattr(estimator, "n_outputs_", None) == 1 and getattr(estimator, "categorical_features", None) is None:
        trees = list(getattr(estimator, "estimators_", [estimator] if hasattr(estimator, "tree_") else []))
        if trees and all(hasattr(t, "tree_") for t in trees):
            return _forest(estimator, trees)
    if all(hasattr(estimator, a) for a in ("_predictors", "_baseline_prediction", "_loss", "_bin_mapper")):
        return _histogram_boosting(estimator)
    return None


def _forest(estimator: Any, trees: list[Any]) -> TreeSum:
    proba = hasattr(estimator, "predict_proba")
    k = int(np.atleast_1d(getattr(estimator, "n_classes_", 1))[0]) if proba else 1

    def fn(tree: Any) -> TreeFn:
        if proba:
            return lambda x: tree.predict_proba(x, check_input=False)
        return lambda x: tree.predict(x, check_input=False)

    def features(tree: Any) -> np.ndarray:
        return np.unique(tree.tree_.feature[tree.tree_.feature >= 0])

    scale = 1.0 / len(trees)
    return TreeSum(
        trees=[fn(t) for t in trees],
        features=[features(t) for t in trees],
        columns=[None if proba else 0] * len(trees),
        base=np.zeros(k),
        link=lambda raw: raw * scale,
        prepare=lambda x: np.ascontiguousarray(x, dtype=np.float32),
    )


def _histogram_boosting(estimator: Any) -> TreeSum:
    from sklearn.utils._openmp_helpers import _openmp_effective_n_threads

    bitsets, f_idx_map = estimator._bin_mapper.make_known_categories_bitsets()
    threads = _openmp_effective_n_threads()

    def fn(predictor: Any) -> TreeFn:
        return lambda x: predictor.predict(x, bitsets, f_idx_map, threads)

    trees, features, columns = [], [], []
    for iteration in estimator._predictors:
        for column, predictor in enumerate(iteration):
            nodes = predictor.nodes
            trees.append(fn(predictor))
            features.append(np.unique(nodes["feature_idx"][nodes["is_leaf"] == 0]))
            columns.append(column)
    loss = estimator._loss
    if hasattr(estimator, "predict_proba"):
        link = loss.predict_proba
    else:

        def link(raw: np.ndarray) -> np.ndarray:
            return loss.link.inverse(raw.ravel())

    return TreeSum(
        trees=trees,
        features=features,
        columns=columns,
        base=np.asarray(estimator._baseline_prediction, dtype=np.float64).reshape(-1),
        link=link,
        prepare=lambda x: estimator._preprocess_X(x, reset=False),
    )
