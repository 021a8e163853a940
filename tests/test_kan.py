"""KAN network and the kan_l1 / kan_l2 / kan_si / kan_ko feature scorers."""

import copy

import numpy as np
import pytest
import torch

import whatmatters as wm
from whatmatters.explain import kan
from whatmatters.explain._kan_net import bspline_basis, fit_kan, uniform_knots
from whatmatters.explain.select import score_features

KAN_METHODS = ["kan_l1", "kan_l2", "kan_si", "kan_ko"]
FAST = {"steps": 120}


@pytest.fixture(scope="module")
def informative_classification():
    """12 features, the first 4 informative (shuffle=False), the rest noise."""
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=400, n_features=12, n_informative=4, n_redundant=0, shuffle=False, random_state=0
    )
    return X, y, set(range(4))


@pytest.fixture(scope="module")
def friedman():
    """Friedman #1: y depends on features 0-4 only; 5-9 are noise."""
    from sklearn.datasets import make_friedman1

    X, y = make_friedman1(n_samples=400, n_features=10, noise=0.5, random_state=0)
    return X, y, set(range(5))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bspline_basis_matches_scipy(order):
    from scipy.interpolate import BSpline

    rng = np.random.default_rng(order)
    x = torch.as_tensor(rng.normal(size=(200, 3)))
    knots = uniform_knots(x.amin(0) - 0.1, x.amax(0) + 0.1, 5, order)
    ours = bspline_basis(x, knots, order)
    for j in range(3):
        ref = BSpline.design_matrix(x[:, j].numpy(), knots[j].numpy(), order).toarray()
        np.testing.assert_allclose(ours[:, j].numpy(), ref, atol=1e-12)
    # partition of unity inside the grid, nothing outside the extended knots
    np.testing.assert_allclose(ours.sum(-1).numpy(), 1.0, atol=1e-12)
    far = knots[:, -1] + 1.0
    assert float(bspline_basis(far.unsqueeze(0), knots, order).abs().max()) == 0.0


def test_kan_fits_breast_cancer(cancer):
    X, y, _ = cancer
    fitted = fit_kan(torch.as_tensor(X.to_numpy(copy=True)), torch.as_tensor(y.to_numpy(copy=True)), steps=100, seed=0)
    losses = [h["train_loss"] for h in fitted.history if "train_loss" in h]
    assert losses[-1] < 0.3 * losses[0]  # training loss drops (starts near log 2)
    val = fitted.val_idx
    acc = fitted.score(torch.as_tensor(X.to_numpy(copy=True))[val], torch.as_tensor(y.to_numpy(copy=True))[val])
    assert acc > 0.9  # majority class: 0.63
    assert fitted.objective == "classification"
    assert fitted.net.widths == [30, 8, 2]
    assert not any(p.requires_grad for p in fitted.net.parameters())


def test_kan_fits_regression(friedman):
    X, y, _ = friedman
    fitted = fit_kan(torch.as_tensor(X), torch.as_tensor(y), steps=150, seed=0)
    assert fitted.objective == "regression"
    val = fitted.val_idx
    assert fitted.score(torch.as_tensor(X)[val], torch.as_tensor(y)[val]) > 0.8
    pred = fitted.predict(torch.as_tensor(X[:5]))
    assert pred.shape == (5, 1) and abs(float(pred.mean()) - y.mean()) < 5  # back in the units of y


@pytest.mark.parametrize("method", KAN_METHODS)
@pytest.mark.parametrize("data", ["informative_classification", "friedman"])
def test_selectors_find_informative_features(method, data, request):
    X, y, informative = request.getfixturevalue(data)
    imp = score_features(X, y, method, **FAST)
    k = len(informative)
    top = {i for i, _ in imp.top(k)}
    precision = len(top & informative) / k
    chance = k / X.shape[1]
    assert precision >= 0.75 > chance, (method, imp.values)
    assert imp.values.shape == (X.shape[1],) and not imp.per_sample
    assert bool((imp.values >= 0).all())


def test_one_fit_serves_all_four(informative_classification, monkeypatch):
    X, y, _ = informative_classification
    kan.clear_cache()
    calls = []
    real = kan.fit_kan
    monkeypatch.setattr(kan, "fit_kan", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = [score_features(X, y, m, **FAST) for m in KAN_METHODS]
    assert len(calls) == 1
    assert [r.extra["fit_cached"] for r in results] == [False, True, True, True]
    score_features(X, y, "kan_l1", seed=1, **FAST)  # another seed: another network
    score_features(X, y, "kan_l1", steps=60)  # other fit parameters: another network
    assert len(calls) == 3


def test_knockout_is_batched_and_equals_zeroing_each_input(informative_classification):
    X, y, _ = informative_classification
    x, labels = torch.as_tensor(X), torch.as_tensor(y)
    fitted = fit_kan(x, labels, steps=40, seed=0)
    val = fitted.val_idx
    calls = []
    handle = fitted.net.layers[1].register_forward_hook(lambda *_: calls.append(1))
    try:
        scores, extra = kan.kan_importance(fitted, x[val], labels[val], kind="ko")
    finally:
        handle.remove()
    assert len(calls) == 2  # the rest of the network runs once for the base and once for all 12 knock-outs

    # the paper's definition, one input at a time: zero its first-layer weights, re-run, compare losses
    xs, target = fitted.standardize(x[val]), fitted.encode(labels[val])
    base = float(fitted.losses(fitted.net(xs), target).double().mean())
    reference = []
    for j in range(x.shape[1]):
        net = copy.deepcopy(fitted.net)
        with torch.no_grad():
            net.layers[0].base_weight[:, j] = 0
            net.layers[0].coef[:, j, :] = 0
        reference.append(float(fitted.losses(net(xs), target).double().mean()) - base)
    np.testing.assert_allclose(extra["loss_increase"].numpy(), reference, atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), np.maximum(reference, 0), atol=1e-5)


def test_edge_norms_match_their_formula(informative_classification):
    X, y, _ = informative_classification
    x = torch.as_tensor(X)
    fitted = fit_kan(x, torch.as_tensor(y), steps=40, seed=0)
    phi = fitted.net.layers[0].edges(fitted.standardize(x)).double()  # (n, hidden, d)
    l1_raw, _ = kan.kan_importance(fitted, x, kind="l1", center=False)
    l2_raw, _ = kan.kan_importance(fitted, x, kind="l2", center=False)
    l2_centered, _ = kan.kan_importance(fitted, x, kind="l2", center=True)
    torch.testing.assert_close(l1_raw, phi.abs().mean((0, 1)))
    torch.testing.assert_close(l2_raw, phi.pow(2).mean((0, 1)).sqrt())
    torch.testing.assert_close(l2_centered, phi.var(0, unbiased=False).mean(0).sqrt())


def test_sensitivity_matches_jacobian(friedman):
    X, y, _ = friedman
    x = torch.as_tensor(X[:50])
    fitted = fit_kan(torch.as_tensor(X), torch.as_tensor(y), steps=40, seed=0)
    si, _ = kan.kan_importance(fitted, x, kind="si")
    xs = fitted.standardize(x)
    jac = torch.stack([torch.autograd.functional.jacobian(fitted.net, row.unsqueeze(0))[0, :, 0] for row in xs])
    torch.testing.assert_close(si, jac.abs().sum(1).mean(0).double(), rtol=1e-5, atol=1e-7)


def test_explain_with_a_model_equals_score_features(cancer):
    X, y, model = cancer
    X, y = X.iloc[:, :8], y
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=1000).fit(X, y)
    via_explain = wm.explain(model, X, "kan_l2", y=y, **FAST)
    direct = score_features(X, y, "kan_l2", **FAST)
    assert via_explain.method == "kan_l2" and not via_explain.per_sample
    assert via_explain.names == tuple(X.columns)
    torch.testing.assert_close(via_explain.values, direct.values)


def test_missing_labels_give_a_clear_error(cancer):
    X, y, model = cancer
    with pytest.raises(wm.InputError, match="pass y"):
        wm.explain(model, X, "kan_ko")
    with pytest.raises(wm.InputError, match="pass y"):
        score_features(X, None, "kan_l1")
    with pytest.raises(wm.InputError, match="one label per row"):
        score_features(X, y[:10], "kan_l1")


def test_score_features_rejects_methods_that_need_a_model(cancer):
    X, y, _ = cancer
    with pytest.raises(wm.MethodError, match="needs one"):
        score_features(X, y, "ablation")
    with pytest.raises(wm.MethodError, match="unknown parameter"):
        score_features(X, y, "kan_l1", epochs=3)


def test_registered_and_described():
    assert wm.methods(family="kan") == sorted(KAN_METHODS)
    text = wm.describe("kan_si")
    assert "needs fit" in text and "grid_size=5" in text and "Fit parameters" in text


def test_seeded_and_leaves_data_alone(informative_classification):
    X, y, _ = informative_classification
    X_before, y_before = X.copy(), y.copy()
    kan.clear_cache()
    a = score_features(X, y, "kan_si", **FAST)
    kan.clear_cache()
    b = score_features(X, y, "kan_si", **FAST)
    assert torch.equal(a.values, b.values)
    np.testing.assert_array_equal(X, X_before)
    np.testing.assert_array_equal(y, y_before)


def test_objective_inference_and_one_layer_kan(friedman):
    X, y, informative = friedman
    # integer-valued float labels with few values are classes; many values are a regression target
    labels = (y > np.median(y)).astype(float)
    assert score_features(X, labels, "kan_ko", **FAST).extra["objective"] == "classification"
    imp = score_features(X, y, "kan_ko", hidden=[], **FAST)
    assert imp.extra["objective"] == "regression" and imp.extra["widths"] == [10, 1]
    assert {i for i, _ in imp.top(3)} <= informative
    with pytest.raises(wm.InputError, match="objective"):
        score_features(X, y, "kan_l1", objective="ranking")
