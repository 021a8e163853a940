import itertools
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import whatmatters as wm
from whatmatters.core.registry import SCORERS, Method
from whatmatters.evaluate import (
    benchmark,
    compare,
    deletion_auc,
    deletion_curve,
    describe_metric,
    insertion_auc,
    insertion_curve,
    measure,
    metrics,
    pointing_game,
    precision_at_k,
    relevance_mass,
)
from whatmatters.evaluate.metrics import METRICS, Metric, MetricResult, metric

D = 8


@pytest.fixture
def linear():
    """A linear torch model f(x) = w.x + b, data, and every feature's contribution w * (x - mean)."""
    torch.manual_seed(0)
    model = nn.Linear(D, 1).double().eval()
    x = torch.randn(16, D, dtype=torch.float64)
    with torch.no_grad():
        contrib = model.weight[0] * (x - x.mean(0))
    return model, x, contrib


def imp(values, **kw):
    return wm.Importance(torch.as_tensor(values, dtype=torch.float64), **kw)


def f(model, x):
    with torch.no_grad():
        return model(x)[:, 0]


# ------------------------------------------------------------------------------------------ deletion
def test_deletion_curve_of_linear_model_is_exact(linear):
    model, x, contrib = linear
    fractions, curve = deletion_curve(model, x, imp(contrib))
    assert torch.allclose(fractions, torch.arange(D + 1, dtype=torch.float64) / D)
    removed = torch.cat(
        [torch.zeros(len(x), 1, dtype=torch.float64), contrib.sort(1, descending=True).values.cumsum(1)], 1
    )
    assert torch.allclose(curve, f(model, x).unsqueeze(1) - removed, atol=1e-10)
    _, ins = insertion_curve(model, x, imp(contrib))
    added = torch.cat(
        [torch.zeros(len(x), 1, dtype=torch.float64), contrib.sort(1, descending=True).values.cumsum(1)], 1
    )
    assert torch.allclose(ins, f(model, x.mean(0, keepdim=True)) + added, atol=1e-10)


def test_perfect_order_beats_random_beats_reversed(linear):
    model, x, contrib = linear
    random = torch.rand(contrib.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dels = [deletion_auc(model, x, imp(v)).scores for v in (contrib, random, -contrib)]
    inss = [insertion_auc(model, x, imp(v)).scores for v in (contrib, random, -contrib)]
    # greedy removal of the largest contributions is optimal for a linear model: pointwise lowest curve
    assert (dels[0] < dels[1]).all() and (dels[1] < dels[2]).all()
    assert (inss[0] > inss[1]).all() and (inss[1] > inss[2]).all()
    assert deletion_auc.metric.higher_is_better is False and insertion_auc.metric.higher_is_better is True


def test_curve_endpoints_are_f_x_and_f_baseline():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).eval()
    x = torch.randn(6, 5)
    scores = imp(torch.randn(6, 5))
    out = model(x).detach()
    target = out.argmax(1)
    for baseline, ref in [("zero", torch.zeros_like(x)), (lambda v: 0.5 * v, 0.5 * x), (x.flip(0), x.flip(0))]:
        fo = model(ref).detach().gather(1, target[:, None])[:, 0].double()
        fx = out.gather(1, target[:, None])[:, 0].double()
        _, dc = deletion_curve(model, x, scores, baseline=baseline)
        _, ic = insertion_curve(model, x, scores, baseline=baseline)
        assert torch.allclose(dc[:, 0], fx, atol=1e-6) and torch.allclose(dc[:, -1], fo, atol=1e-6)
        assert torch.allclose(ic[:, 0], fo, atol=1e-6) and torch.allclose(ic[:, -1], fx, atol=1e-6)


def test_steps_and_trapezoid_auc(linear):
    model, x, contrib = linear
    fractions, curve = deletion_curve(model, x, imp(contrib), steps=4)
    assert fractions.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    result = deletion_auc(model, x, imp(contrib), steps=4)
    expected = (curve[:, :-1] + curve[:, 1:]).sum(1) * 0.25 / 2
    assert torch.allclose(result.scores, expected)
    assert math.isclose(result.value, float(expected.mean()))
    frac, mean_curve = result.mean_curves()["deletion"]
    assert np.allclose(frac, fractions.numpy()) and np.allclose(mean_curve, curve.mean(0).numpy())


def test_model_dtype_is_followed(linear):
    model, x, contrib = linear  # a float64 model
    a = deletion_auc(model, x.float(), imp(contrib)).scores
    b = deletion_auc(model, x, imp(contrib)).scores
    assert a.dtype == torch.float64 and torch.allclose(a, b, atol=1e-5)


def test_all_steps_of_all_samples_go_in_few_batched_calls():
    w = np.arange(1.0, 7.0)
    calls = []

    def model(a):
        calls.append(len(a))
        return np.stack([a @ w, -(a @ w)], 1)

    x = np.random.default_rng(0).normal(size=(40, 6))
    scores = imp(np.random.default_rng(1).normal(size=(40, 6)))
    deletion_auc(model, x, scores, target=0)
    assert sum(calls[1:]) == 40 * 7 and len(calls) == 2  # one probe row, then one call for 280 rows
    calls.clear()
    deletion_auc(wm.core.adapters.wrap(model, batch_size=100), x, scores, target=0)
    assert calls[1:] == [100, 100, 80]


def test_pixel_scores_broadcast_over_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 2)).eval()
    x = torch.randn(3, 2, 3, 3)
    scores = torch.randn(3, 3, 3)
    fractions, curve = deletion_curve(model, x, imp(scores, unit="pixel"), baseline="zero", target=1)
    assert len(fractions) == 10
    order = scores.reshape(3, -1).argsort(1, descending=True)
    for k in range(10):
        keep = torch.ones(3, 9)
        keep.scatter_(1, order[:, :k], 0.0)
        expected = model(x * keep.reshape(3, 1, 3, 3))[:, 1]
        assert torch.allclose(curve[:, k].float(), expected.detach(), atol=1e-5)
    with pytest.raises(wm.InputError, match="does not fit"):
        deletion_curve(model, x, imp(torch.randn(3, 2, 3)), baseline="zero")


def test_aggregated_importance_orders_every_sample_the_same(linear):
    model, x, contrib = linear
    glob = contrib.abs().mean(0)
    a = deletion_auc(model, x, imp(glob, per_sample=False)).scores
    b = deletion_auc(model, x, imp(glob.expand(len(x), -1).clone())).scores
    assert torch.allclose(a, b)


def test_ties_are_broken_at_random_not_by_index():
    model = nn.Linear(D, 1, bias=False).double().eval()
    with torch.no_grad():
        model.weight.copy_(torch.arange(D, 0, -1.0))  # index order = the perfect order
    x = torch.ones(300, D, dtype=torch.float64)
    kw = {"baseline": "zero"}
    perfect = deletion_auc(model, x, imp(torch.arange(D, 0, -1.0).expand(300, -1)), **kw).value
    reverse = deletion_auc(model, x, imp(torch.arange(1.0, D + 1).expand(300, -1)), **kw).value
    constant = deletion_auc(model, x, imp(torch.zeros(300, D)), **kw).value
    assert abs(constant - (perfect + reverse) / 2) < 0.1 * (reverse - perfect)


def test_normalized_curves_run_from_one_to_zero(linear):
    model, x, contrib = linear
    x = torch.cat([x, x.mean(0, keepdim=True)])  # a sample equal to the baseline: undefined, NaN
    contrib = torch.cat([contrib, torch.randn(1, D, dtype=torch.float64)])
    res = deletion_auc(model, x, imp(contrib), normalize=True)
    curve = res.curves["deletion"][1]
    assert torch.allclose(curve[:-1, 0], torch.ones(len(x) - 1, dtype=torch.float64))
    assert torch.allclose(curve[:-1, -1], torch.zeros(len(x) - 1, dtype=torch.float64), atol=1e-12)
    assert res.scores[-1].isnan() and math.isfinite(res.value)
    ins = insertion_auc(model, x, imp(contrib), normalize=True).curves["insertion"][1]
    assert torch.allclose(ins[:-1, 0], torch.zeros(len(x) - 1, dtype=torch.float64), atol=1e-12)


def test_relative_compares_with_random_orders(linear):
    model, x, contrib = linear
    good = deletion_auc(model, x, imp(contrib), relative=True, seed=3)
    bad = deletion_auc(model, x, imp(-contrib), relative=True, seed=3)
    assert (good.scores < 0).all() and (bad.scores > 0).all()
    assert set(good.curves) == {"deletion", "deletion_random"}
    assert torch.equal(good.scores, deletion_auc(model, x, imp(contrib), relative=True, seed=3).scores)
    assert insertion_auc(model, x, imp(contrib), relative=True).value > 0
    with pytest.raises(wm.InputError, match="n_random"):
        deletion_auc(model, x, imp(contrib), relative=True, n_random=0)


def test_target_defaults_to_the_explained_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(10, 4)
    e = wm.explain(model, x, "ablation", target=2)
    assert deletion_auc(model, x, e).value == deletion_auc(model, x, e, target=2).value
    assert deletion_auc(model, x, e).value != deletion_auc(model, x, e, target=0).value


def test_model_is_left_as_it_was_and_train_mode_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).eval()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 4)
    insertion_auc(model, x, imp(torch.randn(5, 4)))
    assert not model.training and not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()
    with pytest.raises(wm.ModelError, match="eval"):
        deletion_auc(model, x, imp(torch.randn(5, 4)))


def test_sklearn_model_on_a_frame(cancer):
    data, _, model = cancer
    x = data.iloc[:20]
    e = wm.explain(model, x, "ablation")
    res = deletion_auc(model, x, e, steps=10)
    assert res.scores.shape == (20,) and len(res.curves["deletion"][0]) == 11
    # probabilities: the curve stays within [0, 1]
    assert ((res.curves["deletion"][1] >= 0) & (res.curves["deletion"][1] <= 1)).all()


def test_bad_inputs_are_named(linear):
    model, x, contrib = linear
    with pytest.raises(wm.InputError, match="baseline"):
        deletion_auc(model, x, imp(contrib), baseline=np.zeros(3))
    with pytest.raises(wm.InputError, match="baseline function"):
        deletion_auc(model, x, imp(contrib), baseline=lambda v: v[:, :2])
    with pytest.raises(wm.InputError, match="samples"):
        deletion_auc(model, x, imp(contrib[:3]))
    with pytest.raises(wm.InputError, match="NaN"):
        deletion_auc(model, x, imp(torch.full_like(contrib, float("nan"))))
    with pytest.raises(wm.InputError, match="steps"):
        deletion_auc(model, x, imp(contrib), steps=0)
    with pytest.raises(wm.MethodError, match="unknown parameter"):
        deletion_auc(model, x, imp(contrib), stepz=3)
    with pytest.raises(wm.InputError, match="Importance"):
        deletion_auc(model, x, contrib)


# ------------------------------------------------------------------------------------- ground truth
def test_precision_at_k_hand_cases():
    v = imp([0.1, 0.9, 0.5, 0.3], per_sample=False, names=("a", "b", "c", "d"))
    assert float(precision_at_k(v, [1, 3])) == 0.5  # top 2 = {b, c}
    assert float(precision_at_k(v, [1, 3], k=1)) == 1.0
    assert math.isclose(float(precision_at_k(v, [1, 3], k=3)), 2 / 3)
    assert float(precision_at_k(v, ["b", "d"])) == 0.5
    assert float(precision_at_k(v, np.array([False, True, False, True]))) == 0.5
    signed = imp([-0.9, 0.1, 0.5], per_sample=False)
    assert float(precision_at_k(signed, [0], k=1)) == 1.0
    assert float(precision_at_k(signed, [0], k=1, by_abs=False)) == 0.0


def test_precision_at_k_shares_ties_fairly():
    assert float(precision_at_k(imp(np.zeros(4), per_sample=False), [0, 1])) == 0.5  # = |relevant| / n_units
    # unit 0 is in; the second place goes to one of three tied units, one of them relevant
    assert math.isclose(float(precision_at_k(imp([1.0, 0.5, 0.5, 0.5], per_sample=False), [1], k=2)), 1 / 6)


def test_precision_at_k_per_sample_and_aggregated():
    v = imp([[0.9, 0.1, 0.0, 0.2], [0.0, 0.1, 0.8, 0.7]])
    per = precision_at_k(v, [0, 3], aggregate=False)
    assert per.tolist() == [1.0, 0.5]
    assert precision_at_k(v, [0, 3]).ndim == 0  # shared ground truth: aggregated by default
    assert float(precision_at_k(v, [2, 3])) == 0.5  # mean |v| = [.45, .1, .4, .45]: top 2 = {0, 3}
    masks = np.array([[True, False, False, False], [False, False, True, True]])
    assert precision_at_k(v, masks).tolist() == [1.0, 1.0]  # k = 1 and 2 relevant units
    with pytest.raises(wm.InputError, match="per-sample"):
        precision_at_k(v, masks, aggregate=True)


@pytest.mark.parametrize(
    ("relevant", "k", "match"),
    [
        (["zz"], None, "unknown unit name"),
        ([7], None, "out of range"),
        ([], None, "empty"),
        ([0], 0, "k must be"),
        ([0], 5, "k must be"),
        (np.zeros(3, bool), None, "shape"),
        (np.zeros(4, bool), None, "no unit"),
        ([0.5], None, "indices"),
    ],
)
def test_precision_at_k_bad_input(relevant, k, match):
    v = imp([0.1, 0.9, 0.5, 0.3], per_sample=False, names=("a", "b", "c", "d"))
    with pytest.raises(wm.InputError, match=match):
        precision_at_k(v, relevant, k)
    with pytest.raises(wm.InputError, match="no unit names"):
        precision_at_k(imp([0.1, 0.2], per_sample=False), ["a"])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=2, max_size=6).flatmap(
        lambda v: st.tuples(st.just(v), st.sets(st.integers(0, len(v) - 1), min_size=1), st.integers(1, len(v)))
    )
)
def test_precision_at_k_equals_the_mean_over_all_tie_orders(case):
    values, relevant, k = case
    hits = []
    for perm in itertools.permutations(range(len(values))):  # every way of breaking ties
        top = sorted(range(len(values)), key=lambda i: (-values[i], perm[i]))[:k]
        hits.append(len(set(top) & relevant) / k)
    got = float(precision_at_k(imp(values, per_sample=False), sorted(relevant), k))
    assert math.isclose(got, sum(hits) / len(hits), abs_tol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-5, 10), min_size=1, max_size=5))
def test_any_relevant_indices_give_a_score_or_a_clear_error(relevant):
    v = imp([0.3, -0.1, 0.8, 0.0], per_sample=False)
    try:
        p = float(precision_at_k(v, relevant))
    except wm.InputError as err:
        assert "out of range" in str(err)
    else:
        assert 0.0 <= p <= 1.0 and all(0 <= r < 4 for r in relevant)


def test_relevance_mass_and_pointing_game():
    v = imp([1.0, -3.0, 0.0, 0.0], per_sample=False)
    assert float(relevance_mass(v, [1])) == 0.75
    assert float(relevance_mass(v, [1], by_abs=False)) == 0.0  # positive relevance only
    assert float(relevance_mass(imp(np.zeros(3), per_sample=False), [0])).__ne__(0.0)  # NaN: nothing to share
    assert float(pointing_game(imp([0.2, 0.9, 0.1], per_sample=False), [1])) == 1.0
    assert float(pointing_game(imp([0.2, 0.9, 0.1], per_sample=False), [0])) == 0.0
    assert float(pointing_game(imp([1.0, 1.0, 0.0, 0.0], per_sample=False), [0])) == 0.5
    maps = imp(np.array([[[0, 1], [0, 0]], [[0, 0], [0, 2]]], dtype=float), unit="pixel")
    masks = np.array([[[False, True], [False, False]], [[True, False], [False, False]]])
    assert pointing_game(maps, masks).tolist() == [1.0, 0.0]
    assert relevance_mass(maps, masks).tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------------------- registry
def test_registry_lists_and_describes_metrics():
    names = metrics()
    assert {"deletion_auc", "insertion_auc", "precision@k", "relevance_mass", "pointing_game"} <= set(names)
    assert "precision@k" in metrics(category="localization") and "deletion_auc" not in metrics(category="localization")
    assert "steps=50" in describe_metric("deletion_auc") and "lower is better" in describe_metric("deletion_auc")
    with pytest.raises(wm.MethodError, match="deletion_auc"):
        measure(None, None, None, "deletion_aux")


def test_metric_decorator_validates_and_wraps(monkeypatch, linear):
    monkeypatch.setattr(METRICS, "entries", dict(METRICS.entries))
    with pytest.raises(ValueError, match="category"):
        metric("_x", category="speed", higher_is_better=True)

    @metric("_mean_score", category="agreement", higher_is_better=True)
    def mean_score(model, data, importance, *, target=None, power=1):
        """Mean score."""
        return importance.values.mean(1) ** power

    with pytest.raises(RuntimeError, match="twice"):
        metric("_mean_score", category="agreement", higher_is_better=True)(mean_score)
    model, x, contrib = linear
    res = measure(model, x, imp(contrib), "_mean_score", power=2)
    assert isinstance(res, MetricResult) and res.params == {"power": 2} and res.category == "agreement"
    assert torch.allclose(res.scores, contrib.mean(1) ** 2) and math.isclose(res.value, float(res.scores.mean()))


# ---------------------------------------------------------------------------------------- benchmark
@pytest.fixture
def small():
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    x, y = make_classification(
        n_samples=200, n_features=6, n_informative=2, n_redundant=0, shuffle=False, random_state=0
    )
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)])
    return LogisticRegression().fit(frame, y), frame.iloc[:25], y[:25]


def test_benchmark_table_curves_agreement(small):
    model, x, y = small
    res = benchmark(model, x, ["ablation", ("ablation", {"baseline": "zero"})], relevant=["f0", "f1"], y=y)
    labels = ["ablation", "ablation(baseline='zero')"]
    assert list(res.table.index) == [*labels, "random"] and res.reference == "random"
    metric_cols = ["deletion_auc", "insertion_auc", "pointing_game", "precision@k", "relevance_mass"]
    assert list(res.table.columns) == [*metric_cols, "seconds", "error"]
    assert res.table["error"].isna().all() and res.table[metric_cols].notna().all().all()
    assert (res.table["seconds"] > 0).all()
    assert set(res.importances) == {*labels, "random"}
    assert res.importances["ablation(baseline='zero')"].params["baseline"] == "zero"
    # the table's value is the mean of the metric on the method's importance
    direct = deletion_auc(model, x, res.importances["ablation"]).value
    assert math.isclose(res.table.loc["ablation", "deletion_auc"], direct)
    assert math.isclose(
        res.table.loc["ablation", "precision@k"], float(precision_at_k(res.importances["ablation"], [0, 1]))
    )
    fr, mean = res.curves["ablation"]["deletion"]
    assert fr[0] == 0 and fr[-1] == 1 and mean.shape == fr.shape
    assert list(res.agreement.index) == labels and np.allclose(res.agreement, res.agreement.T)
    assert np.allclose(np.diag(res.agreement), 1.0)
    assert res.metric_info["deletion_auc"] == ("faithfulness", False)
    assert res.metric_info["precision@k"] == ("localization", True) and res.metric_info["seconds"] == ("cost", False)
    text, md = str(res), res.to_markdown()
    assert all(label in text and label in md for label in labels) and "deletion_auc ↓" in text
    json.dumps(res.to_dict(), allow_nan=False)


def test_benchmark_defaults_and_options(small):
    model, x, _ = small
    res = benchmark(model, x, "ablation", reference=False, progress=True)
    assert list(res.table.columns) == ["deletion_auc", "insertion_auc", "seconds", "error"]
    assert res.reference is None and list(res.table.index) == ["ablation"]
    res = benchmark(
        model,
        x,
        ["ablation"],
        metrics=[("deletion_auc", {"steps": 2})],
        method_params={"ablation": {"baseline": "zero"}},
    )
    assert list(res.curves["ablation"]["deletion"][0]) == [0.0, 0.5, 1.0]
    assert res.importances["ablation"].params["baseline"] == "zero"
    assert list(benchmark(model, x, ["ablation"], metrics=[]).table.columns) == ["seconds", "error"]
    res = benchmark(model, x, {"ablation": {"baseline": "zero"}}, metrics={"insertion_auc": {"steps": 3}})
    assert (
        list(res.table.columns) == ["insertion_auc", "seconds", "error"]
        and len(res.curves["ablation"]["insertion"][0]) == 4
    )


def test_compare_scores_importances_computed_earlier(small):
    model, x, y = small
    res = benchmark(model, x, ["ablation", ("ablation", {"baseline": "zero"})], relevant=[0, 1], y=y)
    given = {k: v for k, v in res.importances.items() if k != res.reference}
    again = compare(model, x, given, relevant=[0, 1], y=y)
    cols = [c for c in res.table.columns if c not in ("seconds", "error")]
    pd.testing.assert_frame_equal(again.table[cols], res.table[cols])
    assert again.table.loc["ablation", "seconds"] == res.importances["ablation"].seconds
    pd.testing.assert_frame_equal(again.agreement, res.agreement)
    with pytest.raises(wm.InputError, match="Importance"):
        compare(model, x, {"a": np.zeros((25, 6))})


def test_a_failing_method_or_metric_is_recorded(monkeypatch, small):
    model, x, _ = small

    def broken(task, *, level=1):
        raise RuntimeError("boom")

    monkeypatch.setitem(SCORERS.entries, "_broken", Method("_broken", broken, "explain", ("feature",), "test"))
    monkeypatch.setattr(METRICS, "entries", dict(METRICS.entries))

    def bad_metric(model, data, importance, *, target=None):
        raise ValueError("no luck")

    METRICS.entries["_bad"] = Metric("_bad", bad_metric, "faithfulness", True, ("feature",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = benchmark(model, x, ["_broken", "ablation"], metrics=["deletion_auc", "_bad"])
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert any("_broken failed" in m and "boom" in m for m in messages) and len(messages) == 3
    assert "RuntimeError: boom" in res.table.loc["_broken", "error"] and np.isnan(
        res.table.loc["_broken", "deletion_auc"]
    )
    assert "_bad: ValueError: no luck" in res.table.loc["ablation", "error"]
    assert np.isfinite(res.table.loc["ablation", "deletion_auc"]) and "_broken" not in res.importances
    assert (
        res.agreement.loc["_broken"].isna().all() and "boom" in str(res) and set(res.errors) >= {"_broken", "ablation"}
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"methods": []}, wm.InputError, "empty"),
        ({"methods": ["ablatoin"]}, wm.MethodError, "ablation"),
        ({"methods": [("ablation", 3)]}, wm.InputError, "cannot read"),
        ({"methods": [("ablation", {"basline": 0})]}, wm.MethodError, "unknown parameter"),
        ({"methods": ["ablation", "ablation"]}, wm.InputError, "twice"),
        ({"method_params": {"saliency_x": {}}}, wm.InputError, "method_params"),
        ({"metrics": ["deletion"]}, wm.MethodError, "deletion_auc"),
        ({"metrics": ["precision@k"]}, wm.InputError, "relevant"),
        ({"metrics": [("deletion_auc", {"stepz": 3})]}, wm.MethodError, "unknown parameter"),
        ({"relevant": ["nope"]}, wm.InputError, "unknown unit name"),
        ({"relevant": np.zeros(4, bool)}, wm.InputError, "mask"),
        ({"y": np.zeros(3)}, wm.InputError, "labels"),
        ({"target": 5}, wm.TargetError, "out of range"),
        ({"seed": 1.5}, wm.InputError, "seed"),
    ],
)
def test_benchmark_bad_arguments_raise(small, kwargs, error, match):
    model, x, _ = small
    kwargs = {"methods": ["ablation"], **kwargs}
    with pytest.raises(error, match=match):
        benchmark(model, x, **kwargs)


def test_benchmark_refuses_a_torch_model_in_train_mode():
    with pytest.raises(wm.ModelError, match="eval"):
        benchmark(nn.Linear(3, 2).train(), torch.randn(4, 3), ["ablation"])


def test_deletion_curve_matches_quantus_pixel_flipping():
    quantus = pytest.importorskip("quantus")  # not a dependency; runs where it is installed
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.rand(6, 1, 8, 8)
    y = model(x).argmax(1)
    a = torch.randn(6, 1, 8, 8, dtype=torch.float64).float()
    metric_ = quantus.PixelFlipping(
        features_in_step=4, perturb_baseline="black", normalise=False, abs=False, disable_warnings=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = np.asarray(
            metric_(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy(), device="cpu", softmax=False)
        )

    def black(v):  # Quantus' "black": each image's minimum
        return v.amin(dim=(1, 2, 3), keepdim=True).expand_as(v)

    _, curve = deletion_curve(model, x, imp(a, unit="pixel"), baseline=black, steps=16, target=y)
    assert np.allclose(curve[:, 1:].numpy(), ref, atol=1e-5)  # Quantus leaves out the first point, f(x)
