import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import whatmatters as wm
from whatmatters.explain.dhondt import allocate, dhondt_seats


def sequential_dhondt(votes, seats, eligible=None):
    """The textbook rule, one seat at a time; ties: more votes, then the party listed first."""
    votes = [float(v) for v in votes]
    eligible = [True] * len(votes) if eligible is None else list(eligible)
    won = [0] * len(votes)
    for _ in range(seats):
        keys = [
            (v / (w + 1), v, -i) if ok and v > 0 else (-1.0, 0, 0)
            for i, (v, w, ok) in enumerate(zip(votes, won, eligible))
        ]
        won[max(range(len(votes)), key=lambda i: keys[i])] += 1
    return won


def test_textbook_example():
    # quotients: A 100 50 33.3 25 | B 80 40 26.7 | C 30 | D 20: the 8 largest give 4/3/1/0
    imp = dhondt_seats({"A": 100, "B": 80, "C": 30, "D": 20}, seats=8)
    assert imp.values.tolist() == [4, 3, 1, 0]
    assert imp.names == ("A", "B", "C", "D") and not imp.per_sample and imp.method == "dhondt"
    assert imp.values.dtype == torch.long
    assert imp.extra["last_quotient"].item() == 25.0
    assert torch.allclose(imp.extra["shares"], torch.tensor([100, 80, 30, 20], dtype=torch.float64) / 230)
    # Gallagher index by hand: sqrt(1/2 sum (vote % - seat %)^2)
    v, s = np.array([100, 80, 30, 20]) / 230 * 100, np.array([4, 3, 1, 0]) / 8 * 100
    assert imp.extra["gallagher"].item() == pytest.approx(math.sqrt(((v - s) ** 2).sum() / 2))


def test_threshold_excludes_small_parties():
    # C (13 %) and D (8.7 %) are under 15 %; A and B share 8 seats: 100 80 50 40 33.3 26.7 25, then
    # A/5 = B/4 = 20 tie -> A (more votes): 5/3
    imp = dhondt_seats({"A": 100, "B": 80, "C": 30, "D": 20}, seats=8, threshold=0.15)
    assert imp.values.tolist() == [5, 3, 0, 0]
    assert imp.extra["eligible"].tolist() == [True, True, False, False]
    assert imp.extra["threshold"] == 0.15


def test_ties_are_deterministic():
    assert dhondt_seats([6, 3], seats=2).values.tolist() == [2, 0]  # 6/2 = 3/1: more votes wins
    assert dhondt_seats([3, 6], seats=2).values.tolist() == [0, 2]
    assert dhondt_seats([5, 5], seats=3).values.tolist() == [2, 1]  # equal votes: listed first wins
    assert dhondt_seats([5, 5, 5], seats=4).values.tolist() == [2, 1, 1]


@settings(max_examples=60, deadline=None)
@given(
    votes=st.lists(st.integers(0, 12), min_size=1, max_size=7).filter(lambda v: sum(v) > 0),
    seats=st.integers(1, 25),
)
def test_matches_sequential_rule_and_sums_to_seats(votes, seats):
    got = dhondt_seats(votes, seats=seats).values
    assert int(got.sum()) == seats
    assert got.tolist() == sequential_dhondt(votes, seats)
    # D'Hondt satisfies lower quota: every party gets at least floor(seats * share)
    quota = torch.tensor(votes, dtype=torch.float64) * seats / sum(votes)
    assert bool((got >= torch.floor(quota + 1e-9)).all())


@settings(max_examples=30, deadline=None)
@given(
    votes=st.lists(st.floats(0.01, 100), min_size=2, max_size=12),
    seats=st.integers(1, 60),
    threshold=st.floats(0, 0.3),
)
def test_threshold_matches_sequential_rule(votes, seats, threshold):
    shares = np.array(votes) / sum(votes)
    if not (shares >= threshold).any():
        with pytest.raises(wm.InputError, match="threshold"):
            dhondt_seats(votes, seats=seats, threshold=threshold)
        return
    got = dhondt_seats(votes, seats=seats, threshold=threshold)
    assert got.values.tolist() == sequential_dhondt(votes, seats, shares >= threshold)
    assert int(got.values[shares < threshold].sum()) == 0


def test_parity_with_dhondtxai():
    dhondtxai = pytest.importorskip("dhondtxai")
    import pandas as pd

    background = pd.DataFrame(np.zeros((2, 2)), columns=["a", "b"])
    reference = dhondtxai.DhondtXAI(score_fn=lambda X: np.asarray(X).sum(1), background_data=background)
    rng = np.random.default_rng(0)
    for _ in range(50):
        votes = rng.gamma(0.7, size=rng.integers(2, 30))  # continuous votes: no exact ties
        seats = int(rng.integers(1, 300))
        tau = float(rng.uniform(0, 0.08))
        excluded = votes / votes.sum() < tau
        if excluded.all():
            continue
        ours = dhondt_seats(votes, seats=seats, threshold=tau).values.numpy()
        np.testing.assert_array_equal(ours, reference.dhondt_method(votes, seats, excluded_features=excluded))


def test_groups_are_alliances():
    imp = wm.Importance(torch.tensor([100.0, -80.0, 30.0, 20.0]), names=("A", "B", "C", "D"), per_sample=False)
    # CD = 50 votes: quotients A 100 50 33.3 25 | B 80 40 26.7 | CD 50 25; tie at 25 -> A
    out = dhondt_seats(imp, seats=8, groups={"CD": ["C", 3]})
    assert out.names == ("CD", "A", "B")
    assert out.values.tolist() == [1, 4, 3]
    assert out.extra["votes"].tolist() == [50.0, 100.0, 80.0]  # absolute scores are the votes
    assert out.extra["groups"] == {"CD": ["C", "D"], "A": ["A"], "B": ["B"]}


def test_exclude_removes_votes():
    out = dhondt_seats({"A": 100, "B": 80, "C": 30, "D": 20}, seats=8, exclude=["B"])
    assert out.values.tolist() == sequential_dhondt([100, 0, 30, 20], 8)
    assert out.values[1] == 0 and not out.extra["eligible"][1]
    grouped = dhondt_seats({"A": 100, "B": 80, "C": 30, "D": 20}, seats=8, groups={"CD": ["C", "D"]}, exclude=["C"])
    assert grouped.values.tolist() == sequential_dhondt([20, 100, 80], 8)


def test_per_sample_importance_is_aggregated_or_elected_per_row():
    values = torch.tensor([[1.0, -4.0, 0.5], [3.0, 1.0, 0.0], [0.2, 0.1, -2.0]], dtype=torch.float64)
    imp = wm.Importance(values, names=("a", "b", "c"), method="ablation", seed=3, target=1)
    agg = dhondt_seats(imp, seats=10)
    assert agg.values.tolist() == sequential_dhondt(values.abs().mean(0).tolist(), 10)
    assert agg.seed == 3 and agg.target == 1 and agg.extra["base"] == "ablation"
    local = dhondt_seats(imp, seats=10, how=None)
    assert local.per_sample and local.values.shape == (3, 3)
    assert local.values.sum(1).tolist() == [10, 10, 10]
    for row, seats in zip(values.abs(), local.values):
        assert seats.tolist() == sequential_dhondt(row.tolist(), 10)


def test_per_sample_rows_without_votes_are_reported():
    imp = wm.Importance(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    local = dhondt_seats(imp, seats=3, how=None)
    assert local.values.tolist() == [[1, 2], [0, 0]]
    assert local.extra["unallocated"].tolist() == [1]


def test_batched_rows_equal_one_election_at_a_time():
    gen = torch.Generator().manual_seed(1)
    votes = torch.rand(23, 9, generator=gen, dtype=torch.float64) ** 3
    votes[0] = 0.0  # no votes: no seats
    votes[1] = torch.tensor([1000.0, 1, 1, 0, 0, 0, 0, 0, 1e-9])  # one dominant party
    votes[2] = torch.tensor([4.0, 4, 2, 2, 1, 1, 0, 3, 3])  # many exact ties
    for seats in (1, 7, 40, 1000):
        got = allocate(votes, seats)
        assert got[0].sum() == 0 and got[1:].sum(1).eq(seats).all()
        for row, won in zip(votes[1:], got[1:]):
            assert won.tolist() == sequential_dhondt(row.tolist(), seats)


def test_large_parliament_matches_sequential_rule():
    votes = [5_000_003.0, 2_999_999.0, 1_500_000.0, 11.0, 0.0]
    assert dhondt_seats(votes, seats=10_000).values.tolist() == sequential_dhondt(votes, 10_000)


def test_save_load_roundtrip(tmp_path):
    imp = dhondt_seats({"A": 100, "B": 80, "C": 30, "D": 20}, seats=8, groups={"CD": ["C", "D"]})
    assert wm.Importance.load(imp.save(tmp_path / "seats.parquet")) == imp


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seats": 0}, "at least 1"),
        ({"seats": -3}, "at least 1"),
        ({"seats": 2.5}, "whole number"),
        ({"seats": True}, "whole number"),
        ({"threshold": 1.0}, r"\[0, 1\)"),
        ({"threshold": -0.1}, r"\[0, 1\)"),
        ({"threshold": 5}, "0.05"),
        ({"threshold": "high"}, "fraction"),
        ({"groups": {"g": ["A", "Bee"]}}, "unknown feature 'Bee'.*'B'"),
        ({"groups": {"g": ["A", 7]}}, "out of range"),
        ({"groups": {"g": ["A", "B"], "h": ["B", "C"]}}, "two groups"),
        ({"groups": {"g": []}}, "no features"),
        ({"groups": {"g": "A"}}, "must list"),
        ({"groups": {"C": ["A", "B"]}}, "rename the group"),
        ({"exclude": ["Z"]}, "unknown feature"),
        ({"threshold": 0.5}, "keeps every party out"),
        ({"how": "mode"}, "unknown aggregation"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(wm.InputError, match=match):
        dhondt_seats({"A": 30, "B": 30, "C": 40, "D": 0}, **{"seats": 5, **kwargs})


@pytest.mark.parametrize(
    ("votes", "match"),
    [
        ([1.0, float("nan")], "NaN"),
        ([0.0, 0.0], "zero"),
        ([], "no units"),
        ([[1.0, 2.0]], "one-dimensional"),
        ({"a": "x"}, "numbers"),
        (wm.Importance(torch.ones(2, 3, 3), unit="pixel"), "regions"),
    ],
)
def test_bad_votes_raise_clear_errors(votes, match):
    with pytest.raises(wm.InputError, match=match):
        dhondt_seats(votes, seats=3)


@pytest.fixture(scope="module")
def tabular():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 5))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
    import pandas as pd

    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(5)])
    return frame, LogisticRegression().fit(frame, y)


def test_explain_method_allocates_base_scores(tabular):
    X, model = tabular
    imp = wm.explain(model, X, method="dhondt", seats=20, base_params={"baseline": "zero"})
    assert not imp.per_sample and imp.names == tuple(X.columns) and int(imp.values.sum()) == 20
    base = wm.explain(model, X, method="ablation", baseline="zero")
    assert torch.equal(imp.values, dhondt_seats(base, seats=20).values)
    assert imp.params["base"] == "ablation" and imp.params["seats"] == 20
    assert imp.top(2)[0][0] == "f0"  # the feature with the largest weight holds the most seats


def test_explain_method_with_a_global_base(tabular):
    X, model = tabular
    y = (X["f0"] + 0.5 * X["f1"] > 0).astype(int)
    imp = wm.explain(model, X, method="dhondt", base="permutation", y=y, seats=10, base_params={"n_repeats": 3})
    perm = wm.explain(model, X, method="permutation", y=y, n_repeats=3)
    assert torch.equal(imp.values, dhondt_seats(perm, seats=10).values)
    assert imp.extra["base_params"] == {"n_repeats": 3, "scoring": None}


def test_explain_method_with_groups_names_the_parties(tabular):
    X, model = tabular
    imp = wm.explain(model, X, method="dhondt", seats=12, groups={"first": ["f0", "f1"]}, threshold=0.02)
    assert imp.names == ("first", "f2", "f3", "f4") and int(imp.values.sum()) == 12
    assert "unit_names" not in imp.extra


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"base": "no_such_method"}, wm.MethodError, "unknown method"),
        ({"base": "dhondt"}, wm.MethodError, "itself"),
        ({"base_params": {"steps": 3}}, wm.MethodError, "unknown parameter"),
        ({"seats": 0}, wm.InputError, "at least 1"),
        ({"how": None}, wm.InputError, "how=None"),
    ],
)
def test_explain_method_errors(tabular, params, error, match):
    X, model = tabular
    with pytest.raises(error, match=match):
        wm.explain(model, X, method="dhondt", **params)
