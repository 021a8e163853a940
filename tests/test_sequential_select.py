"""Importance-guided forward selection (``sequential_select``): finds the informative features and stops early."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression

import whatmatters as wm
from whatmatters.core.errors import InputError


def _data(n: int = 300, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8))
    y = (X[:, 2] + X[:, 5] - X[:, 7] > 0).astype(int)  # three informative columns, five pure noise
    return pd.DataFrame(X, columns=[f"f{i}" for i in range(8)]), y


def test_sequential_select_keeps_the_informative_features_and_stops_early():
    X, y = _data()
    model = LogisticRegression().fit(X, y)
    imp = wm.explain(model, X, "permutation", y=y)
    sel = wm.sequential_select(imp, LogisticRegression(), X, y, cv=3, patience=2)
    assert set(sel.names) == {"f2", "f5", "f7"}
    assert list(sel.data.columns) == sel.names  # X reduced to the kept columns, in its own type
    assert len(sel.curve) <= 3 + 2  # stopped after `patience` additions without improvement
    assert sel.curve[2] > sel.curve[0] + 0.1  # each informative feature raised the CV score


def test_a_reversed_importance_needs_more_features():
    X, y = _data()
    good = wm.explain(LogisticRegression().fit(X, y), X, "permutation", y=y)
    flipped = good.values.abs().max() * 1.01 - good.values.abs()  # ranks by |score|: least important first now
    worst_first = good.__class__(**{**good.__dict__, "values": flipped})
    sel = wm.sequential_select(worst_first, LogisticRegression(), X, y, cv=3, patience=8)
    assert len(sel) == 8 and sel.curve[-1] > sel.curve[0]  # the informative ones come last


@settings(max_examples=20, deadline=None)
@given(patience=st.one_of(st.integers(max_value=0), st.booleans(), st.floats()), tol=st.floats())
def test_bad_options_are_clear_errors(patience, tol):
    X, y = _data(60)
    imp = wm.explain(LogisticRegression().fit(X, y), X, "permutation", y=y)
    with pytest.raises(InputError):
        wm.sequential_select(imp, LogisticRegression(), X, y, patience=patience, tol=-abs(tol) - 1)
    with pytest.raises(InputError, match="one column per scored feature"):
        wm.sequential_select(imp, LogisticRegression(), X.iloc[:, :3], y)
