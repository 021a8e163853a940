import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import whatmatters as wm
from whatmatters.explain.recourse import IMMUTABLE, Actionability, candidate_grid

LEVELS = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
WEIGHTS = np.array([2.0, -1.0, 0.0, 0.0])  # only features 0 and 1 can flip the decision
BIAS = -1.5


def proba(X):
    """Two-class probabilities of a logistic model with known weights (class 1 iff logit > 0)."""
    p = 1 / (1 + np.exp(-(np.asarray(X) @ WEIGHTS + BIAS)))
    return np.stack([1 - p, p], axis=1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.choice(LEVELS, size=(40, 4))  # discrete: every feature's candidates are LEVELS


def brute_force(X, predict_class, grids, desired=1, direction=None):
    """Loop over people, features and candidate values: the definition, written out."""
    direction = direction or {}
    n, d = X.shape
    scores, feasible = np.zeros((n, d)), np.zeros((n, d), dtype=int)
    at_target = predict_class(X) == desired
    for i in range(n):
        for j in range(d):
            hits = total = 0
            for v in grids[j]:
                step = v - X[i, j]
                if step == 0 or (direction.get(j) == "increase" and step < 0):
                    continue
                if direction.get(j) == "decrease" and step > 0:
                    continue
                total += 1
                changed = X[i].copy()
                changed[j] = v
                hits += int(predict_class(changed[None])[0] == desired)
            feasible[i, j] = total
            scores[i, j] = hits / total if total and not at_target[i] else 0.0
    return scores, feasible, at_target


def test_matches_the_definition_on_a_known_model(data):
    imp = wm.explain(proba, data, method="responsiveness", desired=1)
    expected, feasible, at_target = brute_force(data, lambda X: proba(X).argmax(1), [LEVELS] * 4)
    np.testing.assert_allclose(imp.numpy(), expected, atol=1e-12)
    assert imp.values.shape == (40, 4) and imp.method == "responsiveness" and imp.per_sample
    assert imp.extra["n_feasible"].tolist() == feasible.tolist()
    assert imp.extra["at_target"].tolist() == at_target.tolist()
    # only features 0 and 1 can flip the decision; the others are unresponsive
    assert (imp.values[:, 2:] == 0).all()
    assert (imp.values[~torch.as_tensor(at_target), :2] > 0).any()
    assert imp.extra["has_recourse"].tolist() == ((expected > 0).any(1) & ~at_target).tolist()
    # people already at the target need no recourse: all zero
    assert (imp.values[torch.as_tensor(at_target)] == 0).all()


def test_monotone_constraint_that_removes_the_flipping_direction_gives_zero(data):
    # raising x0 raises the logit: allowing only decreases of x0 can never reach class 1
    free = wm.explain(proba, data, method="responsiveness")
    down = wm.explain(proba, data, method="responsiveness", constraints={0: "decrease"})
    assert (down.values[:, 0] == 0).all() and (free.values[:, 0] > 0).any()
    assert torch.equal(down.values[:, 1:], free.values[:, 1:])
    # allowing only increases keeps every hit but counts fewer feasible values
    up = wm.explain(proba, data, method="responsiveness", constraints={0: Actionability(direction="increase")})
    hits_up = up.values[:, 0] * up.extra["n_feasible"][:, 0]
    hits_free = free.values[:, 0] * free.extra["n_feasible"][:, 0]
    assert torch.allclose(hits_up, hits_free)
    expected, _, _ = brute_force(data, lambda X: proba(X).argmax(1), [LEVELS] * 4, direction={0: "increase"})
    np.testing.assert_allclose(up.numpy(), expected, atol=1e-12)


def test_immutable_and_bounded_features(data):
    imp = wm.explain(
        proba,
        data,
        method="responsiveness",
        constraints={0: IMMUTABLE, 1: Actionability(lo=0.0, hi=2.0)},  # x1 has a negative weight
    )
    assert (imp.values[:, 0] == 0).all() and (imp.extra["n_feasible"][:, 0] == 0).all()
    expected, _, _ = brute_force(data, lambda X: proba(X).argmax(1), [[], [0.0, 1.0, 2.0], LEVELS, LEVELS])
    np.testing.assert_allclose(imp.numpy(), expected, atol=1e-12)


def test_torch_single_logit_with_threshold_and_named_constraints(data):
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double().eval()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(WEIGHTS[None]))
        model.bias.fill_(BIAS)
    frame = pd.DataFrame(data, columns=["income", "debt", "age", "zip"])
    grids = {"income": Actionability(values=(-2, -1, 0, 1, 2, 3)), "debt": Actionability(step=0.5, lo=-2, hi=2)}
    imp = wm.explain(model, frame, method="responsiveness", desired=0.0, constraints={**grids, "age": "immutable"})
    assert imp.names == ("income", "debt", "age", "zip")

    def logit_class(X):
        return (X @ WEIGHTS + BIAS >= 0).astype(int)

    expected, _, _ = brute_force(data, logit_class, [np.arange(-2, 4.0), np.arange(-2, 2.01, 0.5), [], LEVELS])
    np.testing.assert_allclose(imp.numpy(), expected, atol=1e-12)


def test_sklearn_classifier_and_batching(data):
    from sklearn.linear_model import LogisticRegression

    y = (data @ WEIGHTS + BIAS > 0).astype(int)
    model = LogisticRegression().fit(data[:, :2], y)  # a real classifier on the two flipping features
    X = data[:, :2]
    imp = wm.explain(model, X, method="responsiveness", desired=1)
    small = wm.explain(model, X, method="responsiveness", desired=1, batch_size=7)
    assert torch.equal(imp.values, small.values)
    expected, _, _ = brute_force(X, model.predict, [LEVELS] * 2)
    np.testing.assert_allclose(imp.numpy(), expected, atol=1e-12)


def test_blocks_of_people_give_the_same_scores(data, monkeypatch, tmp_path):
    from whatmatters.explain import recourse

    whole = wm.explain(proba, data, method="responsiveness", constraints={1: "increase"})
    monkeypatch.setattr(recourse, "_BLOCK_ELEMENTS", 4 * 5 * 3)  # three people per block
    blocked = wm.explain(proba, data, method="responsiveness", constraints={1: "increase"}, batch_size=5)
    assert torch.equal(whole.values, blocked.values)
    assert torch.equal(whole.extra["n_feasible"], blocked.extra["n_feasible"])
    assert wm.Importance.load(whole.save(tmp_path / "r.parquet")) == whole


def test_regressor_threshold_and_callable_desired(data):
    from sklearn.linear_model import LinearRegression

    target = data @ WEIGHTS
    model = LinearRegression().fit(data, target)
    imp = wm.explain(model, data, method="responsiveness", desired=1.0)

    def reaches(X):
        return (model.predict(X) >= 1.0).astype(int)

    expected, _, _ = brute_force(data, reaches, [LEVELS] * 4)
    np.testing.assert_allclose(imp.numpy(), expected, atol=1e-12)
    same = wm.explain(model, data, method="responsiveness", desired=lambda out: out[:, 0] >= 1.0)
    assert torch.equal(imp.values, same.values)


def test_candidate_grids():
    column = torch.arange(101, dtype=torch.float64)
    assert candidate_grid(Actionability(), column, 5).tolist() == [0, 25, 50, 75, 100]
    assert candidate_grid(Actionability(lo=10.0), column, 5).tolist() == [10, 32.5, 55, 77.5, 100]
    assert candidate_grid(Actionability(lo=0, hi=3, integer=True), column, 5).tolist() == [0, 1, 2, 3]
    assert candidate_grid(Actionability(step=30.0), column, 5).tolist() == [0, 30, 60, 90]
    assert candidate_grid(Actionability(values=(3, 1, 3, 200)), column, 5).tolist() == [1, 3, 200]
    assert candidate_grid(Actionability(values=(3, 1, 200), hi=100), column, 5).tolist() == [1, 3]
    assert candidate_grid(Actionability(integer=True), column / 7, 4).tolist() == [0, 5, 10, 14]
    assert candidate_grid(Actionability(lo=200.0, hi=300.0), column, 3).tolist() == [200, 250, 300]
    assert candidate_grid(IMMUTABLE, column, 5).numel() == 0
    binary = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert candidate_grid(Actionability(), binary, 20).tolist() == [0, 1]


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"constraints": {"incme": "immutable"}}, wm.InputError, "unknown feature 'incme'.*'income'"),
        ({"constraints": {9: "immutable"}}, wm.InputError, "4 features"),
        ({"constraints": {"income": "frozen"}}, wm.InputError, "immutable"),
        ({"constraints": {"income": {"direction": "up"}}}, wm.InputError, "direction"),
        ({"constraints": {"income": {"lo": 3, "hi": 1}}}, wm.InputError, "above hi"),
        ({"constraints": {"income": {"step": 0}}}, wm.InputError, "positive"),
        ({"constraints": {"income": {"step": 1, "values": [1]}}}, wm.InputError, "either values or step"),
        ({"constraints": {"income": {"values": ["a"]}}}, wm.InputError, "numbers"),
        ({"constraints": {"income": {"colour": 1}}}, wm.InputError, "colour"),
        ({"constraints": ["income"]}, wm.InputError, "dict"),
        ({"desired": 2}, wm.TargetError, "2 outputs"),
        ({"desired": "yes"}, wm.TargetError, "class index"),
        ({"desired": lambda out: out[:1, 0] > 0}, wm.InputError, "one bool per row"),
        ({"n_values": 1}, wm.InputError, "n_values"),
    ],
)
def test_bad_parameters(data, params, error, match):
    frame = pd.DataFrame(data, columns=["income", "debt", "age", "zip"])
    with pytest.raises(error, match=match):
        wm.explain(proba, frame, method="responsiveness", **params)


def test_listed_and_described():
    assert "responsiveness" in wm.methods(family="recourse")
    assert "desired=1" in wm.describe("responsiveness")
