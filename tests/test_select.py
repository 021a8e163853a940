"""select_features: how many, which, and the reduced data in its own type."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import whatmatters as wm
from whatmatters.explain.select import Selection, select_features

NAMES = [f"f{i}" for i in range(10)]
SCORES = torch.tensor([0.5, -3.0, 0.1, 2.0, 0.0, 1.0, -0.2, 0.7, 0.3, 0.05], dtype=torch.float64)
BY_ABS = [1, 3, 5, 7, 0, 8, 6, 2, 9, 4]  # features ranked by |score|


def aggregated(names=NAMES):
    return wm.Importance(values=SCORES, names=names, per_sample=False, method="test")


@pytest.fixture
def frame():
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.normal(size=(6, 10)), columns=NAMES)


def test_fraction_count_and_names():
    sel = select_features(aggregated(), keep=0.4)
    assert isinstance(sel, Selection) and len(sel) == 4
    assert sel.indices == sorted(BY_ABS[:4])  # kept in original column order
    assert sel.names == [NAMES[i] for i in sorted(BY_ABS[:4])]
    assert sel.rank == [BY_ABS.index(i) for i in sel.indices]
    assert sel.scores == [abs(float(SCORES[i])) for i in sel.indices]
    assert sel.mask.sum() == 4 and sel.mask[1] and not sel.mask[4]
    assert select_features(aggregated(), keep=3).indices == sorted(BY_ABS[:3])
    assert select_features(aggregated(), keep=1.0).indices == list(range(10))
    assert select_features(aggregated(), keep=0.25).indices == sorted(BY_ABS[:3])  # 2.5 rounds up
    assert select_features(aggregated(), keep=["f9", "f0"]).indices == [0, 9]
    assert select_features(aggregated(), keep=np.array([4, 2])).indices == [2, 4]


def test_per_sample_importance_is_aggregated_by_mean_abs():
    # signed per-sample scores: mean would cancel for feature 0, mean |.| does not
    values = torch.tensor([[4.0, 1.0, 0.5], [-4.0, 1.0, 0.5]])
    imp = wm.Importance(values=values, names=["a", "b", "c"], per_sample=True)
    assert select_features(imp, keep=1).names == ["a"]
    assert select_features(imp, keep=2).names == ["a", "b"]


def test_reduced_data_keeps_its_type(frame):
    sel = select_features(aggregated(), keep=3, data=frame)
    assert isinstance(sel.data, pd.DataFrame)
    assert list(sel.data.columns) == sel.names and sel.data.shape == (6, 3)
    pd.testing.assert_frame_equal(sel.data, frame[sel.names])
    array = frame.to_numpy(copy=True)
    sel = select_features(aggregated(), keep=3, data=array)
    assert isinstance(sel.data, np.ndarray)
    np.testing.assert_array_equal(sel.data, array[:, sel.indices])
    tensor = torch.as_tensor(array)
    sel = select_features(aggregated(), keep=3, data=tensor)
    assert isinstance(sel.data, torch.Tensor) and torch.equal(sel.data, tensor[:, sel.indices])


def test_dataframe_matched_by_name_and_left_alone(frame):
    before = frame.copy()
    shuffled = frame[NAMES[::-1]]
    sel = select_features(aggregated(), keep=2, data=shuffled)
    assert sorted(sel.data.columns) == sorted(["f1", "f3"])
    pd.testing.assert_frame_equal(frame, before)
    sel.data.iloc[0, 0] = 123.0
    pd.testing.assert_frame_equal(frame, before)
    # an importance without names takes the DataFrame's
    sel = select_features(aggregated(names=None), keep=2, data=frame)
    assert sel.names == ["f1", "f3"]
    with pytest.raises(wm.InputError, match="differ"):
        select_features(aggregated(), keep=2, data=frame.rename(columns={"f0": "other"}))


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (0, "out of range"),
        (-1, "out of range"),
        (11, "out of range"),
        (0.0, "fraction"),
        (1.5, "fraction"),
        (-0.2, "fraction"),
        (float("nan"), "fraction"),
        (True, "bool"),
        ("f1", "pass a list"),
        ([], "empty"),
        (["f1", "nope"], "unknown feature"),
        (["f1", "f1"], "twice"),
        ([0, "f1"], "not a mix"),
        ([10], "out of range"),
        ({"f1"}, "fraction in"),
    ],
)
def test_bad_keep_is_a_clear_error(keep, message):
    with pytest.raises(wm.InputError, match=message):
        select_features(aggregated(), keep=keep)


def test_other_bad_input(frame):
    with pytest.raises(wm.InputError, match="Did you mean"):
        select_features(aggregated(), keep=["f_1"])
    with pytest.raises(wm.InputError, match="need \\(n, 10\\)"):
        select_features(aggregated(), keep=2, data=np.zeros((3, 4)))
    with pytest.raises(wm.InputError, match="columns"):
        select_features(aggregated(), keep=2, data=frame.iloc[:, :4])
    with pytest.raises(wm.InputError, match="names"):
        select_features(aggregated(names=None), keep=["f1"])
    pixels = wm.Importance(values=torch.ones(2, 3, 4), per_sample=True, unit="pixel")
    with pytest.raises(wm.InputError, match="one score per feature"):
        select_features(pixels, keep=2)
    nan = wm.Importance(values=torch.tensor([1.0, float("nan")]), per_sample=False)
    with pytest.raises(wm.InputError, match="NaN"):
        select_features(nan, keep=1)
    with pytest.raises(wm.InputError, match="needs an Importance"):
        select_features(SCORES, keep=1)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=30), data=st.data())
def test_keeps_the_top_k(values, data):
    imp = wm.Importance(values=torch.tensor(values, dtype=torch.float64), per_sample=False)
    d = len(values)
    k = data.draw(st.integers(1, d))
    sel = select_features(imp, keep=k)
    assert len(sel) == k and sel.indices == sorted(sel.indices)
    kept = sorted(abs(values[i]) for i in sel.indices)
    dropped = [abs(v) for i, v in enumerate(values) if i not in sel.indices]
    assert not dropped or max(dropped) <= kept[0]
    fraction = data.draw(st.floats(1e-6, 1.0))
    assert len(select_features(imp, keep=fraction)) == max(1, math.ceil(fraction * d - 1e-9))


def test_end_to_end_with_kan(cancer):
    from whatmatters.explain.select import score_features

    X, y, _ = cancer
    imp = score_features(X.iloc[:200, :10], y.iloc[:200], "kan_l2", steps=60)
    sel = select_features(imp, keep=0.3, data=X.iloc[:200, :10])
    assert sel.data.shape == (200, 3) and sel.names == list(sel.data.columns)
