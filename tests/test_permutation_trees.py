"""Permutation importance of tree ensembles run tree by tree: the same numbers as the stacked model calls."""

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_classification, make_regression
from sklearn.ensemble import (
    ExtraTreesRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
)
from sklearn.tree import DecisionTreeClassifier

import whatmatters as wm
from whatmatters.explain import permutation as perm_module

N_FEATURES = 10


def data(kind: str, classes: int = 2):
    # 3 informative columns of 10: shallow trees split on few columns, so the tree-by-tree path is taken
    if kind == "regression":
        return make_regression(n_samples=400, n_features=N_FEATURES, n_informative=3, noise=1.0, random_state=0)
    return make_classification(
        n_samples=400, n_features=N_FEATURES, n_informative=3, n_redundant=0, n_classes=classes, random_state=0
    )


MODELS = {
    "hgb binary": (lambda: HistGradientBoostingClassifier(max_iter=30, max_depth=2, random_state=0), "binary"),
    "hgb 3 classes": (lambda: HistGradientBoostingClassifier(max_iter=20, max_depth=2, random_state=0), "three"),
    "hgb regressor": (lambda: HistGradientBoostingRegressor(max_iter=30, max_depth=2, random_state=0), "regression"),
    "random forest": (lambda: RandomForestClassifier(20, max_depth=2, random_state=0), "binary"),
    "extra trees regressor": (lambda: ExtraTreesRegressor(20, max_depth=2, random_state=0), "regression"),
    "decision tree": (lambda: DecisionTreeClassifier(max_depth=3, random_state=0), "three"),
}


def fitted(name: str):
    make, kind = MODELS[name]
    X, y = data("regression") if kind == "regression" else data("classification", 3 if kind == "three" else 2)
    return make().fit(X, y), X, y


def stacked(monkeypatch, *args, **kwargs):
    """The same request with the tree-by-tree path switched off."""
    with monkeypatch.context() as m:
        m.setattr(perm_module, "tree_sum", lambda estimator: None)
        return wm.explain(*args, **kwargs)


@pytest.mark.parametrize("name", list(MODELS))
def test_tree_by_tree_equals_stacked_calls(monkeypatch, name):
    model, X, y = fitted(name)
    fast = wm.explain(model, X, "permutation", y=y, n_repeats=4, seed=3)
    slow = stacked(monkeypatch, model, X, y=y, method="permutation", n_repeats=4, seed=3)
    assert fast.extra["tree_sum"] and not slow.extra["tree_sum"]
    np.testing.assert_allclose(fast.extra["importances"], slow.extra["importances"], rtol=0, atol=1e-12)
    assert fast.extra["baseline_score"] == pytest.approx(model.score(X, y), abs=1e-12)


def test_column_no_tree_splits_on_scores_exactly_zero():
    model, X, y = fitted("hgb binary")
    used = set(np.concatenate([p.nodes["feature_idx"][p.nodes["is_leaf"] == 0] for (p,) in model._predictors]))
    unused = sorted(set(range(N_FEATURES)) - used)
    assert unused, "the test needs a column the model never splits on"
    imp = wm.explain(model, X, "permutation", y=y, n_repeats=3, seed=0)
    assert (imp.extra["importances"][:, unused] == 0).all()
    assert (imp.values.numpy()[sorted(used)] != 0).any()


def test_scorer_and_batch_size_give_the_same_numbers(monkeypatch):
    model, X, y = fitted("random forest")
    kwargs = {"y": y, "n_repeats": 3, "seed": 1, "scoring": "neg_log_loss", "batch_size": 500}
    fast = wm.explain(model, X, "permutation", **kwargs)
    slow = stacked(monkeypatch, model, X, method="permutation", **kwargs)
    assert fast.extra["tree_sum"]
    np.testing.assert_allclose(fast.extra["importances"], slow.extra["importances"], rtol=1e-10, atol=1e-12)


def test_model_fitted_on_a_frame(monkeypatch):
    X, y = data("classification")
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(N_FEATURES)])
    model = HistGradientBoostingClassifier(max_iter=20, max_depth=2, random_state=0).fit(frame, y)
    fast = wm.explain(model, frame, "permutation", y=y, n_repeats=3, seed=0)
    slow = stacked(monkeypatch, model, frame, method="permutation", y=y, n_repeats=3, seed=0)
    assert fast.extra["tree_sum"] and list(fast.names) == list(frame.columns)
    np.testing.assert_allclose(fast.extra["importances"], slow.extra["importances"], atol=1e-12)


class TemperedForest(RandomForestClassifier):
    """Changes its outputs after the trees: the sum of the trees no longer reproduces them."""

    def predict_proba(self, X):
        p = super().predict_proba(X) ** 2
        return p / p.sum(1, keepdims=True)


def test_a_model_the_tree_sum_does_not_reproduce_falls_back_to_its_own_calls():
    X, y = data("classification")
    model = TemperedForest(20, max_depth=2, random_state=0).fit(X, y)
    imp = wm.explain(model, X, "permutation", y=y, n_repeats=3, seed=0, scoring="neg_log_loss")
    assert not imp.extra["tree_sum"]
    assert imp.extra["baseline_score"] == pytest.approx(-_log_loss(y, model.predict_proba(X)), rel=1e-12)


def _log_loss(y, p):
    from sklearn.metrics import log_loss

    return log_loss(y, p)


def test_deep_forest_that_splits_on_every_column_uses_the_stacked_calls():
    X, y = data("classification")
    model = RandomForestClassifier(20, random_state=0).fit(X, y)  # unlimited depth: every tree uses most columns
    assert not wm.explain(model, X, "permutation", y=y, n_repeats=2, seed=0).extra["tree_sum"]
