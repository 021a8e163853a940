"""Rashomon importance clouds: sets of near-equally good models, rank ranges, interactions, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.importance import Importance
from whatmatters.evaluate import RashomonCloud, rashomon
from whatmatters.evaluate.interactions import pair_interactions
from whatmatters.report import render_report


@pytest.fixture(scope="module")
def cancer_with_noise():
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    X = X.iloc[:, :12].copy()  # the 10 "mean" features and two "error" ones: fast, still correlated
    X["pure noise"] = np.random.default_rng(0).normal(size=len(X))
    return X, y


def _logistic():
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))


@pytest.fixture(scope="module")
def cloud(cancer_with_noise):
    X, y = cancer_with_noise
    params = {"logisticregression__C": [0.03, 0.1, 0.3, 1.0, 3.0]}
    return rashomon(_logistic(), X, y, n_models=10, tolerance=0.03, params=params, interactions=4, n_repeats=3)


def test_a_pure_noise_column_never_ranks_top(cloud):
    ranges = cloud.rank_ranges()
    assert len(cloud.models) >= 2
    assert ranges.loc["pure noise", "rank_min"] > 3  # never among the top 3 of any good model
    assert ranges.index[0] != "pure noise"
    assert "pure noise" not in cloud.unstable()  # top 4 of 13 features by default
    assert ranges.loc["pure noise", "top4_share"] == 0
    losses, kept = cloud.info["losses"], cloud.info["kept"]
    assert (losses[kept] <= losses.min() + 0.03 + 1e-12).all()
    assert len(cloud.importances) == len(kept) and all(isinstance(i, Importance) for i in cloud.importances)
    assert cloud.values.shape == (len(kept), 13)


def test_rank_ranges_and_unstable_flags_from_known_importances():
    imps = [
        Importance(torch.tensor(v, dtype=torch.float64), names=("a", "b", "c", "d", "e"), per_sample=False)
        for v in ([5.0, 4, 3, 2, 1], [5.0, 1, 3, 2, 4], [5.0, 4, 1, 2, 3])
    ]
    c = RashomonCloud(models=[None] * 3, importances=imps, names=list("abcde"), method="given")
    ranges = c.rank_ranges(top=2, span=3)
    assert ranges.loc["a", ["rank_min", "rank_max"]].tolist() == [1.0, 1.0]
    assert ranges.loc["b", ["rank_min", "rank_max", "rank_span"]].tolist() == [2.0, 5.0, 3.0]
    assert ranges.loc["e", "top2_share"] == pytest.approx(1 / 3)
    assert c.unstable(top=2, span=3) == ["b", "e"]  # c reaches rank 3 at best: outside the top 2
    assert ranges.loc["a", "importance_min"] == 5.0 and ranges.loc["e", "importance_max"] == 4.0


def test_interactions_are_zero_for_additive_pairs_and_found_for_a_product():
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def f(z):
        return z[:, 0] * z[:, 1] + z[:, 2]

    pairs, strength = pair_interactions(f, x, seed=1)
    s = dict(zip(pairs, strength.tolist()))
    assert s[(0, 2)] < 1e-20 and s[(1, 2)] < 1e-20  # additive: the second difference is exactly 0
    assert s[(0, 1)] == pytest.approx(0.5, abs=0.06)  # x0 x1 carries half of Var f = 1 + 1


def test_cloud_interactions_table_and_report(cloud):
    table = cloud.interactions()
    assert len(table) == 6 and (table["strength_min"] >= 0).all()
    assert (table["strength_median"].diff().dropna() <= 0).all()
    html = render_report(cloud, "cloud")
    assert "Rashomon set" in html and html.count("<img") >= 3 and "pure noise" in html


def test_torch_factory_and_any_explain_method():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long().numpy()

    def factory(X, y, seed, width=8):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        xt, yt = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt), yt).backward()
            opt.step()
        return net.eval()

    c = rashomon(factory, x.numpy(), y, n_models=4, tolerance=0.1, params={"width": [8, 16]}, method="saliency")
    assert isinstance(c.models[0], nn.Module) and len(c.models) >= 2
    assert c.rank_ranges().index[0] == "x0"
    assert c.info["loss"] == "error"


def test_parallel_fits_equal_sequential_ones(cancer_with_noise):
    X, y = cancer_with_noise
    kwargs = {"n_models": 3, "tolerance": 1.0, "interactions": 0, "n_repeats": 2}
    one = rashomon(_logistic(), X, y, n_jobs=1, **kwargs)
    two = rashomon(_logistic(), X, y, n_jobs=2, **kwargs)
    assert torch.equal(one.values, two.values)
    np.testing.assert_array_equal(one.info["losses"], two.info["losses"])


def _xy(n=60, d=3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d))
    return x, (x[:, 0] > 0).astype(int)


def test_bad_input_gives_clear_errors():
    x, y = _xy()
    with pytest.raises(InputError, match="one value per row"):
        rashomon(_logistic(), x, y[:-1])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        rashomon(_logistic(), bad, y)
    with pytest.raises(InputError, match="NaN"):
        rashomon(_logistic(), x, np.where(np.arange(len(y)) == 2, np.nan, y))
    with pytest.raises(MethodError, match="tolerance must be >= 0"):
        rashomon(_logistic(), x, y, tolerance=-0.1)
    with pytest.raises(MethodError, match="n_models"):
        rashomon(_logistic(), x, y, n_models=1)

    def factory(X, y, seed):  # seed 0 predicts the label, every other seed its opposite
        right = seed == 0
        return lambda z: np.stack([(z[:, 0] > 0) != right, (z[:, 0] > 0) == right], 1).astype(float)

    with pytest.raises(MethodError, match="only 1 of 3 candidate models"):
        rashomon(factory, x, y, n_models=3, tolerance=0.0, loss="error")
    with pytest.raises(MethodError, match="unknown loss"):
        rashomon(factory, x, y, n_models=3, loss="hinge")


@settings(max_examples=25, deadline=None)
@given(st.one_of(st.floats(max_value=-1e-9), st.just(math.nan), st.just(math.inf), st.text(max_size=3)))
def test_bad_tolerances_are_refused_before_any_fit(tolerance):
    x, y = _xy()
    calls = []

    def factory(X, y, seed):
        calls.append(seed)
        raise AssertionError("no fit may start")

    with pytest.raises(MethodError, match="tolerance"):
        rashomon(factory, x, y, tolerance=tolerance)
    assert not calls
