"""Shapley estimators: parity with shap's exact explainer, efficiency, exactness on low-order games,
convergence of the sampling estimators, budgets, and TreeSHAP."""

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import make_classification, make_friedman1
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neural_network import MLPClassifier

import whatmatters as wm

shapley = importlib.import_module("whatmatters.explain.shapley")
SAMPLERS = [("kernel_shap", {}), ("kernel_shap", {"estimator": "linear"}), ("shapley_sampling", {})]
SAMPLERS += [("shapley_sampling", {"control_variate": False})]


@pytest.fixture(scope="module")
def nonlinear():
    X, y = make_classification(n_samples=300, n_features=8, n_informative=5, random_state=0)
    model = MLPClassifier((16,), max_iter=600, random_state=0).fit(X, y)
    return X, model


@pytest.fixture(scope="module")
def nonlinear_exact(nonlinear):
    X, model = nonlinear
    kw = {"background": X[50:80], "target": 1}
    return wm.explain(model, X[:8], "shapley_exact", **kw).numpy(), kw


@pytest.fixture(scope="module")
def linear():
    X, y = make_friedman1(n_samples=200, n_features=7, random_state=0)
    return X, LinearRegression().fit(X, y)


def relative_error(est, exact):
    return float(np.mean(np.linalg.norm(est - exact, axis=1) / np.linalg.norm(exact, axis=1)))


@pytest.mark.parametrize("case", ["linear", "nonlinear"])
def test_exact_matches_shap_exact_explainer(case, request):
    shap = pytest.importorskip("shap")
    X, model = request.getfixturevalue(case)
    f = model.predict if case == "linear" else (lambda a: model.predict_proba(a)[:, 1])
    background, xs = X[:40], X[100:106]
    ours = wm.explain(f, xs, "shapley_exact", background=background)
    ref = shap.explainers.ExactExplainer(f, shap.maskers.Independent(background, max_samples=100))(xs)
    np.testing.assert_allclose(ours.numpy(), ref.values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.extra["base_value"], ref.base_values, atol=1e-6)


def test_linear_model_shapley_is_coefficient_times_centered_input(linear):
    X, model = linear
    background, xs = X[:50], X[60:65]
    phi = wm.explain(model, xs, "shapley_exact", background=background).numpy()
    np.testing.assert_allclose(phi, model.coef_ * (xs - background.mean(0)), atol=1e-9)


@pytest.mark.parametrize(("method", "params"), [("shapley_exact", {}), *SAMPLERS])
def test_efficiency(method, params, nonlinear):
    X, model = nonlinear
    budget = {} if method == "shapley_exact" else {"max_evals": 64}
    imp = wm.explain(model, X[:5], method, background=X[50:80], target=1, **budget, **params)
    fx = model.predict_proba(X[:5])[:, 1]
    base = np.asarray(imp.extra["base_value"])
    np.testing.assert_allclose(base, model.predict_proba(X[50:80])[:, 1].mean(), atol=1e-12)
    np.testing.assert_allclose(imp.numpy().sum(1), fx - base, atol=1e-8)


@pytest.mark.parametrize(("method", "params"), SAMPLERS)
def test_sampling_estimators_converge(method, params, nonlinear, nonlinear_exact):
    X, model = nonlinear
    exact, kw = nonlinear_exact
    budgets = (40, 80, 160)
    errors = [
        np.mean(
            [
                relative_error(wm.explain(model, X[:8], method, max_evals=b, seed=s, **kw, **params).numpy(), exact)
                for s in range(2)
            ]
        )
        for b in budgets
    ]
    assert errors[0] > errors[1] > errors[2]
    # a random answer with the right sum (efficiency) is far off; the estimate at 160 of 256 coalitions is close
    noise = np.random.default_rng(0).normal(size=exact.shape)
    random_answer = exact.sum(1, keepdims=True) * noise / noise.sum(1, keepdims=True)
    assert errors[2] < 0.1 < 0.5 < relative_error(random_answer, exact)


def test_interaction_estimator_beats_linear_kernelshap(nonlinear, nonlinear_exact):
    X, model = nonlinear
    exact, kw = nonlinear_exact
    errors = {
        est: np.mean(
            [
                relative_error(
                    wm.explain(model, X[:8], "kernel_shap", max_evals=80, estimator=est, seed=s, **kw).numpy(), exact
                )
                for s in range(3)
            ]
        )
        for est in ("interaction", "linear")
    }
    assert errors["interaction"] < errors["linear"]


@pytest.mark.parametrize(("method", "params"), SAMPLERS)
def test_full_budget_is_exact(method, params, nonlinear, nonlinear_exact):
    X, model = nonlinear
    exact, kw = nonlinear_exact
    imp = wm.explain(model, X[:8], method, max_evals=2**8, **kw, **params)
    np.testing.assert_allclose(imp.numpy(), exact, atol=1e-12)
    assert imp.extra["exact"] and imp.extra["evaluations"] == 2**8


@pytest.fixture(scope="module")
def pairwise_game():
    """A model with interactions of order two only: its interventional game has order two too."""
    rng = np.random.default_rng(1)
    d = 9
    a, b = rng.normal(size=d), np.triu(rng.normal(size=(d, d)), 1)
    X = rng.normal(size=(40, d))

    def f(x):
        return x @ a + np.einsum("ni,ij,nj->n", x, b, x)

    return X, f, wm.explain(f, X[:4], "shapley_exact", background=X[10:]).numpy()


@pytest.mark.parametrize(
    ("method", "params", "budget"), [*[(m, p, 100) for m, p in SAMPLERS], ("kernel_shap", {"estimator": "linear"}, 20)]
)
def test_exact_for_games_of_order_two(method, params, budget, pairwise_game):
    # paired KernelSHAP and antithetic permutations are exact on them; the interaction surrogate
    # fits them exactly once its pairwise terms are affordable (here 36 terms, 98 coalitions)
    X, f, exact = pairwise_game
    est = wm.explain(f, X[:4], method, background=X[10:], max_evals=budget, **params).numpy()
    np.testing.assert_allclose(est, exact, atol=1e-9)


def test_budget_is_honoured_in_model_rows():
    X = np.random.default_rng(0).normal(size=(50, 10))
    rows = []

    def f(x):
        rows.append(len(x))
        return np.tanh(x[:, 0] * x[:, 1]) + x[:, 2] * x[:, 3] * x[:, 4]

    n, nb = 3, 20
    for method in ("kernel_shap", "shapley_sampling"):
        for budget in (60, 200):
            rows.clear()
            imp = wm.explain(f, X[:n], method, background=X[-nb:], max_evals=budget)
            evals = imp.extra["evaluations"]
            assert evals <= budget and (method == "shapley_sampling" or evals == budget)
            # one prediction of the n samples resolves the target (and gives the output count: no probe row);
            # v(empty) and v(full) take one pass over the background and the samples; every other coalition
            # one pass over the background per sample
            assert sum(rows) - n - nb - n == n * (evals - 2) * nb


def test_seed_controls_the_draw(nonlinear):
    X, model = nonlinear
    run = lambda seed: wm.explain(model, X[:3], "kernel_shap", max_evals=60, seed=seed).numpy()  # noqa: E731
    np.testing.assert_array_equal(run(3), run(3))
    assert not np.allclose(run(3), run(4))


def test_background_is_subsampled_with_the_seed(nonlinear):
    X, model = nonlinear
    full = wm.explain(model, X[:3], "shapley_exact", background=X[50:80], target=1)
    same = wm.explain(model, X[:3], "shapley_exact", background=X[50:80], target=1, max_background=30)
    small = wm.explain(model, X[:3], "shapley_exact", background=X[50:80], target=1, max_background=10, seed=5)
    np.testing.assert_array_equal(full.numpy(), same.numpy())
    keep = torch.randperm(30, generator=torch.Generator().manual_seed(5))[:10].sort().values.numpy()
    expected = model.predict_proba(X[50:80][keep])[:, 1].mean()
    np.testing.assert_allclose(small.extra["base_value"], expected, atol=1e-12)


def test_torch_model_and_per_sample_targets():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).eval()
    x = torch.randn(40, 6)
    target = torch.tensor([0, 2, 1, 2])
    exact = wm.explain(net, x[:4], "shapley_exact", target=target, background=x[10:])
    for t in range(4):
        one = wm.explain(net, x[t : t + 1], "shapley_exact", target=int(target[t]), background=x[10:])
        np.testing.assert_allclose(exact.numpy()[t], one.numpy()[0], atol=1e-6)
    est = wm.explain(net, x[:4], "kernel_shap", target=target, background=x[10:], max_evals=40)
    with torch.no_grad():
        fx = net(x[:4]).gather(1, target[:, None]).squeeze(1).double()
    np.testing.assert_allclose(est.values.sum(1) + torch.as_tensor(est.extra["base_value"]), fx, atol=1e-5)
    assert relative_error(est.numpy(), exact.numpy()) < 0.1


def test_exact_refuses_many_features():
    with pytest.raises(wm.InputError, match="kernel_shap"):
        wm.explain(lambda a: a.sum(1), np.zeros((2, 20)), "shapley_exact")


def test_clear_errors():
    X = np.random.default_rng(0).normal(size=(5, 10))
    f = lambda a: a.sum(1)  # noqa: E731
    with pytest.raises(wm.InputError, match=r"max_evals >= 2 \* n_features \+ 2 = 22"):
        wm.explain(f, X, "kernel_shap", max_evals=5)
    with pytest.raises(wm.InputError, match=r"max_evals >= 4 \* n_features - 4 = 36"):
        wm.explain(f, X, "shapley_sampling", max_evals=30)
    with pytest.raises(wm.InputError, match="estimator"):
        wm.explain(f, X, "kernel_shap", estimator="kernel")
    with pytest.raises(wm.InputError, match="max_background"):
        wm.explain(f, X, "kernel_shap", max_background=0)


@settings(max_examples=15, deadline=None)
@given(
    budget=st.one_of(
        st.booleans(),
        st.floats(-10, 1e4).filter(lambda v: not v.is_integer() or v < 22),
        st.text(max_size=3),
        st.integers(-5, 21),
    )
)
def test_bad_budgets_are_refused_clearly(budget):
    X = np.random.default_rng(0).normal(size=(3, 10))
    for method in ("kernel_shap", "shapley_sampling"):
        with pytest.raises(wm.InputError, match="max_evals"):
            wm.explain(lambda a: a.sum(1), X, method, max_evals=budget)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 14), extra=st.integers(0, 400), seed=st.integers(0, 3))
def test_design_is_distinct_paired_and_within_budget(d, extra, seed):
    budget = min(2 * d + 2 + extra, 2**d - 1)
    design = shapley._stratified_design(d, budget, np.random.default_rng(seed))
    codes = design.astype(np.int64) @ (1 << np.arange(d))
    assert len(design) + 2 <= budget and len(design) >= budget - 3
    assert len(set(codes.tolist())) == len(codes)  # distinct
    assert not (codes == 0).any() and not (codes == 2**d - 1).any()  # empty and full are separate
    assert set(((2**d - 1) ^ codes).tolist()) == set(codes.tolist())  # closed under complement
    sizes = design.sum(1)
    for t in set(sizes.tolist()):  # balanced within each size: feature counts (nearly) equal
        counts = design[sizes == t].sum(0)
        assert counts.max() - counts.min() <= 2 or (sizes == t).sum() == math.comb(d, t)


# ---------------------------------------------------------------------------------------------- TreeSHAP


@pytest.fixture(scope="module")
def small_trees():
    pytest.importorskip("shap")
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier, RandomForestRegressor

    X, y = make_classification(n_samples=200, n_features=5, n_informative=3, random_state=0)
    return X, {
        "forest": RandomForestClassifier(20, max_depth=4, random_state=0).fit(X, y),
        "regressor": RandomForestRegressor(20, max_depth=4, random_state=0).fit(X, y.astype(float)),
        "boosted": GradientBoostingClassifier(n_estimators=20, max_depth=2, random_state=0).fit(X, y),
    }


@pytest.mark.parametrize(("name", "target"), [("forest", 0), ("forest", 1), ("regressor", 0)])
def test_tree_shap_equals_exact_on_same_background(name, target, small_trees):
    X, models = small_trees
    kw = {"background": X[:30], "target": target}
    tree = wm.explain(models[name], X[50:55], "tree_shap", **kw)
    exact = wm.explain(models[name], X[50:55], "shapley_exact", **kw)
    np.testing.assert_allclose(tree.numpy(), exact.numpy(), atol=1e-6)
    np.testing.assert_allclose(tree.extra["base_value"], exact.extra["base_value"], atol=1e-6)
    assert tree.extra["exact"] and tree.extra["efficiency_gap"] < 1e-6


@pytest.mark.parametrize("target", [0, 1])
def test_tree_shap_on_boosted_classifier(target, small_trees):
    X, models = small_trees
    model, kw = models["boosted"], {"background": X[:30], "target": target}
    # the log-odds are explained exactly
    raw = wm.explain(model, X[50:55], "tree_shap", output="raw", **kw)
    sign = 1 if target == 1 else -1
    margin = wm.explain(lambda a: sign * model.decision_function(a), X[50:55], "shapley_exact", background=X[:30])
    np.testing.assert_allclose(raw.numpy(), margin.numpy(), atol=1e-6)
    # probabilities: efficient, close to exact, but flagged as shap's rescaled approximation
    prob = wm.explain(model, X[50:55], "tree_shap", **kw)
    exact = wm.explain(model, X[50:55], "shapley_exact", **kw).numpy()
    fx = model.predict_proba(X[50:55])[:, target]
    np.testing.assert_allclose(prob.numpy().sum(1), fx - np.asarray(prob.extra["base_value"]), atol=1e-6)
    assert not prob.extra["exact"] and 0 < relative_error(prob.numpy(), exact) < 0.5


def test_tree_shap_clear_errors(small_trees, monkeypatch):
    X, models = small_trees
    with pytest.raises(wm.ModelError, match="tree ensemble"):
        wm.explain(lambda a: a.sum(1), np.ones((2, 3)), "tree_shap")
    linear = LogisticRegression().fit(X, (X[:, 0] > 0).astype(int))
    with pytest.raises(wm.ModelError, match="kernel_shap"):
        wm.explain(linear, X[:3], "tree_shap")
    with pytest.raises(wm.InputError, match="output"):
        wm.explain(models["forest"], X[:3], "tree_shap", output="margin")
    import builtins

    real_import = builtins.__import__

    def no_shap(name, *args, **kwargs):
        if name == "shap":
            raise ImportError("No module named 'shap'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_shap)
    with pytest.raises(wm.ModelError, match=r"pip install 'whatmatters\[trees\]'"):
        wm.explain(models["forest"], X[:3], "tree_shap")
