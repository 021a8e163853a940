"""TabEBM augmentation: dtypes restored, synthetic rows follow their class, clear errors."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import whatmatters as wm
from whatmatters.curate import TabEBM, augment

FAST = {"epochs": 120, "steps": 100}


def two_classes(n=80, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, 3)) + np.where(y[:, None] == 1, 3.0, -3.0) * np.array([1.0, 0.5, 0.0])
    return x, y


def test_dataframe_in_dataframe_out_with_the_input_dtypes():
    x, y = two_classes()
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "height": x[:, 0],
            "count": rng.integers(2, 9, len(x)).astype(np.int32),
            "flag": y == 1,
            "colour": pd.Categorical(np.where(y == 1, "red", "blue"), categories=["red", "blue", "green"]),
            "city": np.where(x[:, 1] > 0, "Oslo", "Rome"),
        }
    )
    syn, labels = augment(frame, pd.Series(y), n_per_class={0: 5, 1: 7}, seed=0, **FAST)
    assert isinstance(syn, pd.DataFrame) and list(syn.columns) == list(frame.columns)
    assert (syn.dtypes == frame.dtypes).all()
    assert len(syn) == 12 and sorted(labels.tolist()) == [0] * 5 + [1] * 7
    assert syn["count"].between(2, 8).all()
    assert set(syn["city"]) <= {"Oslo", "Rome"} and set(syn["colour"]) <= {"red", "blue"}
    # class-bound columns keep their class: flag and colour are decided by y in the real data
    assert (syn["flag"].to_numpy() == (labels == 1)).all()
    assert (syn["colour"].astype(str).to_numpy() == np.where(labels == 1, "red", "blue")).all()


def test_synthetic_rows_follow_their_class_distribution():
    from scipy.stats import ks_2samp
    from sklearn.linear_model import LogisticRegression

    x, y = two_classes(n=120)
    model = TabEBM(epochs=FAST["epochs"], seed=0).fit(x, y)
    syn, labels = model.sample(60, steps=FAST["steps"])
    assert isinstance(syn, np.ndarray) and syn.shape == (120, 3)
    clf = LogisticRegression().fit(x, y)
    assert clf.score(syn, labels) > 0.95  # each synthetic row looks like its own class
    for c in (0, 1):
        real, fake = x[y == c], syn[labels == c]
        assert np.abs(real.mean(0) - fake.mean(0)).max() < 0.4
        assert max(ks_2samp(real[:, j], fake[:, j]).statistic for j in range(3)) < 0.3
    # the energy is lower on the class's own rows than on the other class's
    z = (torch.tensor(x, dtype=torch.float32) - model.mean) / model.std
    assert float(model.energy(z[y == 0], 0).mean()) < float(model.energy(z[y == 1], 0).mean())


def test_augment_is_reproducible_by_seed():
    x, y = two_classes(n=40)
    a, _ = augment(x, y, seed=3, **FAST)
    b, _ = augment(x, y, seed=3, **FAST)
    c, _ = augment(x, y, seed=4, **FAST)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_augment_errors():
    x, y = two_classes(n=20)
    with pytest.raises(wm.InputError, match="one label per row"):
        augment(x, y[:-1], **FAST)
    with pytest.raises(wm.InputError, match="empty"):
        augment(np.zeros((0, 3)), [], **FAST)
    with pytest.raises(wm.InputError, match="not fitted"):
        TabEBM().sample(3)
    with pytest.raises(wm.MethodError, match="unknown option"):
        augment(x, y, temperature=2)


@settings(max_examples=20, deadline=None)
@given(bad=st.sampled_from(["nan", "inf", "missing"]), row=st.integers(0, 19), col=st.integers(0, 2))
def test_non_finite_or_missing_values_are_refused(bad, row, col):
    x, y = two_classes(n=20)
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    frame.iloc[row, col] = {"nan": np.nan, "inf": np.inf, "missing": None}[bad]
    with pytest.raises(wm.InputError):
        augment(frame, y, epochs=1, steps=1)
