"""Reweighting: weights for scikit-learn and a torch sampler, from any example scores."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_curate_examples import NOISE, mlp, noisy_mixture

import whatmatters as wm
from whatmatters import curate
from whatmatters.curate import sample_weights, weighted_sampler


@pytest.mark.parametrize("how", ["rank", "linear", "softmax"])
def test_weights_have_mean_one_and_follow_the_scores(how):
    scores = torch.tensor([0.5, -2.0, 3.0, 1.0, 0.0])
    w = sample_weights(scores, how=how)
    assert w.dtype == np.float64 and w.shape == (5,) and np.isclose(w.mean(), 1.0)
    assert (np.argsort(w) == np.argsort(scores.numpy())).all()
    assert (np.argsort(sample_weights(scores, how=how, invert=True)) == np.argsort(-scores.numpy())).all()
    if how != "softmax":
        assert np.isclose(w.min() / w.max(), 0.1)  # floor


def test_down_weighting_el2n_takes_weight_off_the_noisy_labels_and_sklearn_accepts_it():
    from sklearn.linear_model import LogisticRegression

    x, y, _, mask = noisy_mixture()
    run = curate.train_models(mlp, x, y, epochs=3, seeds=2, batch_size=32)
    w = sample_weights(curate.score(run.models(epoch=2), data=x, y=y, method="el2n"), invert=True, floor=0.0)
    assert w[mask.numpy()].sum() / w.sum() < NOISE / 2  # uniform weights give them NOISE of the mass
    LogisticRegression(max_iter=500).fit(x.numpy(), y.numpy(), sample_weight=w)


def test_sampler_draws_in_proportion_to_the_weights():
    scores = torch.arange(10.0)
    sampler = weighted_sampler(scores, 20000, how="linear", floor=0.0, seed=1)
    counts = np.bincount(list(sampler), minlength=10)
    expected = sample_weights(scores, how="linear", floor=0.0)
    np.testing.assert_allclose(counts / counts.sum(), expected / expected.sum(), atol=0.01)
    assert counts[0] == 0
    assert list(weighted_sampler(scores, seed=3)) == list(weighted_sampler(scores, seed=3))
    with pytest.raises(wm.InputError, match="without replacement"):
        weighted_sampler(scores, 10, replacement=False, how="linear", floor=0.0)


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=8),
    how=st.sampled_from(["rank", "linear", "softmax", "sqrt"]),
)
def test_bad_scores_or_weighting_raise_input_errors(values, how):
    finite = bool(values) and all(np.isfinite(values))
    if not finite or how == "sqrt":
        with pytest.raises(wm.InputError):
            sample_weights(values, how=how)
    else:
        w = sample_weights(values, how=how)
        assert np.isfinite(w).all() and np.isclose(w.mean(), 1.0)
