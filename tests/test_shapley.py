"""Shapley estimators: parity with shap's exact explainer, efficiency, convergence."""

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification, make_friedman1
from sklearn.linear_model import LinearRegression
from sklearn.neural_network import MLPClassifier

import whatmatters as wm


@pytest.fixture(scope="module")
def nonlinear():
    X, y = make_classification(n_samples=300, n_features=6, n_informative=4, random_state=0)
    model = MLPClassifier((16,), max_iter=600, random_state=0).fit(X, y)
    return X, model


@pytest.fixture(scope="module")
def linear():
    X, y = make_friedman1(n_samples=200, n_features=6, random_state=0)
    return X, LinearRegression().fit(X, y)


@pytest.mark.parametrize("case", ["linear", "nonlinear"])
def test_exact_matches_shap_exact_explainer(case, request):
    shap = pytest.importorskip("shap")
    X, model = request.getfixturevalue(case)
    f = model.predict if case == "linear" else (lambda a: model.predict_proba(a)[:, 1])
    background, xs = X[:25], X[100:103]
    ours = wm.explain(f, xs, "shapley_exact", background=background)
    ref = shap.explainers.ExactExplainer(f, shap.maskers.Independent(background, max_samples=100))(xs)
    np.testing.assert_allclose(ours.numpy(), ref.values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.extra["base_value"], ref.base_values, atol=1e-6)


def test_linear_model_shapley_is_coefficient_times_centered_input(linear):
    X, model = linear
    background, xs = X[:50], X[60:65]
    phi = wm.explain(model, xs, "shapley_exact", background=background).numpy()
    expected = model.coef_ * (xs - background.mean(0))
    np.testing.assert_allclose(phi, expected, atol=1e-9)


@pytest.mark.parametrize("method", ["shapley_exact", "kernel_shap", "shapley_sampling"])
def test_efficiency(method, nonlinear):
    X, model = nonlinear
    imp = (
        wm.explain(model, X[:5], method, background=X[50:80], target=1, max_evals=64)
        if method != "shapley_exact"
        else (wm.explain(model, X[:5], method, background=X[50:80], target=1))
    )
    fx = model.predict_proba(X[:5])[:, 1]
    np.testing.assert_allclose(imp.numpy().sum(1), fx - np.asarray(imp.extra["base_value"]), atol=1e-8)


def _relative_error(est, exact):
    return float(np.mean(np.linalg.norm(est - exact, axis=1) / np.linalg.norm(exact, axis=1)))


@pytest.mark.parametrize("method", ["kernel_shap", "shapley_sampling"])
def test_sampling_estimators_converge(method, nonlinear):
    X, model = nonlinear
    kw = {"background": X[50:80], "target": 1}
    exact = wm.explain(model, X[:8], "shapley_exact", **kw).numpy()
    errors = [
        np.mean(
            [
                _relative_error(wm.explain(model, X[:8], method, max_evals=b, seed=s, **kw).numpy(), exact)
                for s in range(3)
            ]
        )
        for b in (22, 62)
    ]
    assert errors[1] < errors[0]
    # a random answer with the right efficiency sum is far off; the estimate is close
    rng = np.random.default_rng(0)
    noise = rng.normal(size=exact.shape)
    random_answer = exact.sum(1, keepdims=True) * noise / noise.sum(1, keepdims=True)
    assert errors[1] < 0.25 < _relative_error(random_answer, exact)


def test_kernel_with_full_budget_is_exact(nonlinear):
    X, model = nonlinear
    kw = {"background": X[50:80], "target": 1}
    exact = wm.explain(model, X[:4], "shapley_exact", **kw).numpy()
    full = wm.explain(model, X[:4], "kernel_shap", max_evals=2**6, **kw).numpy()
    np.testing.assert_allclose(full, exact, atol=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_kernel_orders_recover_additive_game(order):
    # a purely additive model: every order recovers the exact values from few coalitions
    w = torch.arange(1.0, 9.0, dtype=torch.float64)
    X = np.random.default_rng(1).normal(size=(30, 8))
    f = lambda a: a @ w.numpy()  # noqa: E731
    exact = wm.explain(f, X[:3], "shapley_exact", background=X[10:]).numpy()
    est = wm.explain(f, X[:3], "kernel_shap", background=X[10:], max_evals=200, order=order).numpy()
    np.testing.assert_allclose(est, exact, atol=1e-8)


def test_exact_refuses_many_features():
    X = np.zeros((2, 20))
    with pytest.raises(wm.InputError, match="kernel_shap"):
        wm.explain(lambda a: a.sum(1), X, "shapley_exact")


def test_budget_errors_are_clear():
    X = np.random.default_rng(0).normal(size=(5, 10))
    with pytest.raises(wm.InputError, match="max_evals"):
        wm.explain(lambda a: a.sum(1), X, "kernel_shap", max_evals=5)
    with pytest.raises(wm.InputError, match="max_evals"):
        wm.explain(lambda a: a.sum(1), X, "shapley_sampling", max_evals=5)


def test_tree_shap_equals_exact_on_same_background():
    pytest.importorskip("shap")
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    X, y = make_classification(n_samples=200, n_features=5, n_informative=3, random_state=0)
    for model, target in (
        (RandomForestClassifier(20, max_depth=4, random_state=0).fit(X, y), 1),
        (RandomForestRegressor(20, max_depth=4, random_state=0).fit(X, y.astype(float)), 0),
    ):
        kw = {"background": X[:30], "target": target}
        tree = wm.explain(model, X[50:55], "tree_shap", **kw)
        exact = wm.explain(model, X[50:55], "shapley_exact", **kw)
        np.testing.assert_allclose(tree.numpy(), exact.numpy(), atol=1e-6)


def test_tree_shap_refuses_a_callable():
    pytest.importorskip("shap")
    with pytest.raises(wm.ModelError, match="tree ensemble"):
        wm.explain(lambda a: a.sum(1), np.ones((2, 3)), "tree_shap")
