"""Bad input must raise a whatmatters error that names the problem, never a raw torch/numpy/sklearn exception."""

from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import whatmatters as wm
from whatmatters.core.registry import SCORERS, scorer

D, K = 4, 3  # features and classes of both test models
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# feature methods this suite knows how to call; those registered at test time are exercised
KNOWN_FEATURE_METHODS = (
    "ablation",
    "dhondt",
    "responsiveness",
    "permutation",
    "saliency",
    "gradient_x_input",
    "integrated_gradients",
    "smoothgrad",
)


@functools.cache
def sklearn_model():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, D))
    return LogisticRegression(max_iter=500).fit(X, np.arange(60) % K)


@functools.cache
def torch_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, K)).eval()


MODELS = {"sklearn": sklearn_model, "torch": torch_model}


def feature_methods(kind: str) -> list[str]:
    available = set(wm.methods(unit="feature"))
    methods = [m for m in KNOWN_FEATURE_METHODS if m in available]
    if kind == "sklearn":
        from whatmatters.core.registry import get_method

        methods = [m for m in methods if get_method(m).needs == "predict"]
    return methods


CASES = [(kind, method) for kind in MODELS for method in feature_methods(kind)]


def run(kind: str, method: str, data, **kwargs):
    """explain() with the labels a method needs (permutation scores against y)."""
    if method == "permutation" and "y" not in kwargs:
        try:
            kwargs["y"] = np.arange(len(data)) % K
        except TypeError:
            kwargs["y"] = [0]
    return wm.explain(MODELS[kind](), data, method=method, **kwargs)


def raises(error: type[wm.WhatMattersError], *words: str):
    """pytest.raises for a whatmatters error whose message contains every word (case-insensitive)."""
    pattern = "".join(f"(?=.*{re.escape(w)})" for w in words)
    return pytest.raises(error, match=re.compile(pattern, re.IGNORECASE | re.DOTALL))


CONTAINERS = ("numpy", "frame", "list", "tensor32")


def as_container(array: np.ndarray, container: str):
    if container == "frame":
        return pd.DataFrame(array, columns=[f"f{i}" for i in range(array.shape[1])])
    if container == "list":
        return array.tolist()
    if container == "tensor32":
        return torch.from_numpy(array).float()
    return array


finite = st.floats(-5, 5, allow_nan=False)
good_data = hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.just(D)), elements=finite)


@st.composite
def data_with_non_finite(draw):
    array = draw(good_data)
    cells = draw(st.sets(st.integers(0, array.size - 1), min_size=1, max_size=array.size))
    bad = draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), min_size=len(cells), max_size=len(cells)))
    array.reshape(-1)[sorted(cells)] = bad
    return array, len(cells)


# ----------------------------------------------------------------------------- positive control
@pytest.mark.parametrize(("kind", "method"), CASES)
@settings(SETTINGS, max_examples=10)
@given(array=good_data, container=st.sampled_from(CONTAINERS))
def test_good_data_works(kind, method, array, container):
    if method == "dhondt":  # identical rows leave no votes to share: a different (clear) error
        assume(np.ptp(array, axis=0).max() > 1e-3)
    imp = run(kind, method, as_container(array, container))
    assert torch.isfinite(imp.values.double()).all()
    assert imp.unit_shape[-1] == D or method == "dhondt"


# ----------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize(("kind", "method"), CASES)
@SETTINGS
@given(case=data_with_non_finite(), container=st.sampled_from(CONTAINERS))
def test_nan_or_inf_in_data(kind, method, case, container):
    array, n_bad = case
    with raises(wm.InputError, f"{n_bad} NaN or infinite", "data", "impute"):
        run(kind, method, as_container(array, container))


@pytest.mark.parametrize("kind", MODELS)
@SETTINGS
@given(case=data_with_non_finite(), good=good_data)
def test_nan_or_inf_in_background_and_labels(kind, case, good):
    array, n_bad = case
    with raises(wm.InputError, f"{n_bad} NaN or infinite", "background"):
        run(kind, "ablation", good, background=array)
    labels = array[:, 0]
    n_bad_labels = int((~np.isfinite(labels)).sum())
    assume(n_bad_labels > 0)
    with raises(wm.InputError, "NaN or infinite", "y"):
        run(kind, "ablation", np.zeros((len(labels), D)), y=labels)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", MODELS)
@SETTINGS
@given(
    n=st.integers(1, 5),
    d=st.integers(1, 9).filter(lambda d: d != D),
    container=st.sampled_from(CONTAINERS),
)
def test_wrong_number_of_columns(kind, n, d, container):
    data = as_container(np.ones((n, d)), container)
    with raises(wm.InputError, "columns", str(d)):
        run(kind, "ablation", data)


@pytest.mark.parametrize(("kind", "method"), CASES)
@pytest.mark.parametrize(
    "data",
    [np.ones((0, D)), np.ones((3, 0)), np.ones((0, 0)), [], [[]], pd.DataFrame(), torch.ones(0, D)],
    ids=["no-rows", "no-columns", "0x0", "empty-list", "empty-row", "empty-frame", "empty-tensor"],
)
def test_empty_data(kind, method, data):
    with raises(wm.InputError, "empty"):
        run(kind, method, data)


@pytest.mark.parametrize("kind", MODELS)
def test_data_with_wrong_rank(kind):
    with raises(wm.InputError, "shape", "(n, features)"):
        run(kind, "ablation", np.ones(D))  # one sample without its batch axis
    with raises(wm.InputError, "empty"):
        run(kind, "ablation", 3.0)
    with raises(wm.MethodError, "feature", "pixel"):
        run(kind, "ablation", np.ones((2, 3, D)))


@pytest.mark.parametrize("kind", MODELS)
def test_background_labels_and_names_that_do_not_fit(kind):
    data = np.ones((3, D))
    with raises(wm.WhatMattersError, "background", "shape"):
        run(kind, "ablation", data, background=np.ones((5, D + 1)))
    with raises(wm.WhatMattersError, "labels", "3 samples"):
        run(kind, "ablation", data, y=[0, 1])
    with raises(wm.WhatMattersError, "feature names"):
        run(kind, "ablation", data, feature_names=["a", "b"])


# ----------------------------------------------------------------------------- methods
@pytest.mark.parametrize("kind", MODELS)
@SETTINGS
@given(name=st.text(max_size=30))
def test_unknown_method_names(kind, name):
    SCORERS.get("ablation")  # registry loaded
    assume(name not in wm.methods() and name not in SCORERS.alias_of)
    with raises(wm.MethodError, "unknown method", "whatmatters.methods()"):
        wm.explain(MODELS[kind](), np.ones((2, D)), method=name)


@pytest.mark.parametrize("name", [None, 3, ["ablation"], b"ablation"])
def test_method_name_that_is_not_text(name):
    with raises(wm.MethodError, "method", "name"):
        wm.explain(sklearn_model(), np.ones((2, D)), method=name)


def test_unknown_parameter_and_misspelled_method():
    with raises(wm.MethodError, "unknown parameter", "bogus", "baseline"):
        wm.explain(sklearn_model(), np.ones((2, D)), method="ablation", bogus=1)
    with raises(wm.MethodError, "unknown method", "ablation"):
        wm.explain(sklearn_model(), np.ones((2, D)), method="ablaton")


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("kind", MODELS)
@SETTINGS
@given(n=st.integers(1, 5), bad=st.one_of(st.integers(max_value=-1), st.integers(min_value=K)))
def test_target_out_of_range(kind, n, bad):
    data = np.ones((n, D))
    if -(2**63) <= bad < 2**63:
        with raises(wm.TargetError, "out of range", f"{K} output"):
            run(kind, "ablation", data, target=bad)
    else:  # beyond int64
        with raises(wm.TargetError, "target"):
            run(kind, "ablation", data, target=bad)
    per_sample = [0] * (n - 1) + [bad]
    with raises(wm.TargetError, "target"):
        run(kind, "ablation", data, target=per_sample)


@pytest.mark.parametrize("kind", MODELS)
@SETTINGS
@given(n=st.integers(1, 5), m=st.integers(0, 8))
def test_target_of_wrong_length(kind, n, m):
    assume(m != n)
    with raises(wm.TargetError, "shape", f"({n})"):
        run(kind, "ablation", np.ones((n, D)), target=[0] * m)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    ("target", "words"),
    [
        (0.5, ("integers",)),
        ([0.5, 1.0], ("integers",)),
        ("cat", ("target", "int")),
        (["a", "b"], ("target", "int")),
        ([0, None], ("target", "int")),
        ([[0, 1]], ("shape",)),
        ({"class": 1}, ("target", "int")),
        (float("nan"), ("target",)),
    ],
)
def test_targets_that_are_not_indices(kind, target, words):
    with raises(wm.TargetError, *words):
        run(kind, "ablation", np.ones((2, D)), target=target)


# ----------------------------------------------------------------------------- non-numeric and ragged data
@pytest.mark.parametrize("kind", MODELS)
@SETTINGS
@given(
    columns=st.sets(st.integers(0, D - 1), min_size=1),
    kinds=st.lists(st.sampled_from(["str", "category", "object", "datetime"]), min_size=D, max_size=D),
)
def test_frames_with_non_numeric_columns(kind, columns, kinds):
    frame = pd.DataFrame(np.ones((3, D)), columns=[f"f{i}" for i in range(D)])
    for c in columns:
        name = f"f{c}"
        if kinds[c] == "str":
            frame[name] = ["a", "b", "c"]
        elif kinds[c] == "category":
            frame[name] = pd.Categorical(["x", "y", "x"])
        elif kinds[c] == "object":
            frame[name] = pd.Series([1.0, "2", None], dtype=object)
        else:
            frame[name] = pd.to_datetime(["2024-01-01"] * 3)
    bad = [f"f{c}" for c in sorted(columns)]
    with raises(wm.InputError, "non-numeric", str(bad), "encode"):
        run(kind, "ablation", frame)


def test_nullable_frame_with_missing_values():
    frame = pd.DataFrame({f"f{i}": pd.array([1, None, 3], dtype="Int64") for i in range(D)})
    with raises(wm.InputError, "NaN or infinite"):
        run("sklearn", "ablation", frame)


@pytest.mark.parametrize("kind", MODELS)
@SETTINGS
@given(lengths=st.lists(st.integers(0, 6), min_size=2, max_size=5).filter(lambda ls: len(set(ls)) > 1))
def test_ragged_lists(kind, lengths):
    data = [[1.0] * k for k in lengths]
    with raises(wm.InputError, "ragged"):
        run(kind, "ablation", data)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    "data",
    [[["a"] * D] * 2, [[1.0, None, 2.0, 3.0]], "text", None, [[1 + 2j] * D] * 2],
    ids=["strings", "none-cell", "string", "none", "complex"],
)
def test_non_numeric_arrays(kind, data):
    with raises(wm.InputError, "numeric"):
        run(kind, "ablation", data)


# ----------------------------------------------------------------------------- other arguments
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("batch_size", [0, -4, 2.5, "10", True])
def test_bad_batch_size(kind, batch_size):
    with raises(wm.InputError, "batch_size", "positive"):
        run(kind, "ablation", np.ones((3, D)), batch_size=batch_size)


@pytest.mark.parametrize("seed", [1.5, "seed", None])
def test_bad_seed(seed):
    with raises(wm.InputError, "seed", "int"):
        run("torch", "ablation", np.ones((3, D)), seed=seed)


def test_integer_data_for_a_scikit_learn_model_are_features():
    imp = run("sklearn", "ablation", np.arange(3 * D).reshape(3, D))
    assert imp.unit == "feature" and imp.values.shape == (3, D)


# ----------------------------------------------------------------------------- the model is left as it was
def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [
            (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks)) for m in model.modules()
        ],
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.fixture
def failing_scorer():
    """A temporary scorer that vandalises the model, then raises; removed from the registry afterwards."""
    name = "_test_failing_scorer"
    SCORERS.get("ablation")  # load the registry first

    @scorer(name, family="test", units="feature", needs="module")
    def vandal(task, *, fail_after: int = 1):
        module = task.torch_model.module
        calls = []
        module.register_forward_hook(lambda *_: calls.append(1))
        module[0].register_forward_pre_hook(lambda *_: None)
        module.train()
        out = task.forward_target(task.inputs).sum()
        out.backward()  # gradients accumulate into .grad
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(-3.0).add_(1.0)
        for p in module.parameters():
            p.requires_grad_(False)
        if len(calls) >= fail_after:
            raise RuntimeError("scorer failed half-way")
        return torch.zeros(task.inputs.shape)

    try:
        yield name
    finally:
        SCORERS.entries.pop(name, None)
    assert name not in wm.methods()


@pytest.mark.parametrize("start_in_train_mode", [False, True])
def test_failing_scorer_leaves_the_torch_model_as_it_was(failing_scorer, start_in_train_mode):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, K))  # buffers too
    model.eval()
    model[3].weight.requires_grad_(False)  # a frozen layer stays frozen
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)  # an existing gradient survives
    user_hook = model[0].register_forward_hook(lambda *_: None)  # the user's own hook stays
    if start_in_train_mode:
        model.train()
        model[1].eval()  # a mixed state: BatchNorm frozen inside a training model
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="half-way"):
        wm.explain(model, np.ones((3, D)), method=failing_scorer, allow_train_mode=True)
    assert_same(before, snapshot(model))
    assert user_hook.id in model[0]._forward_hooks
    # the same scorer that completes also leaves no trace
    wm.explain(model, np.ones((3, D)), method=failing_scorer, fail_after=99, allow_train_mode=True)
    assert_same(before, snapshot(model))


BAD_PARAMS = {
    "ablation": {"baseline": np.ones(D + 2)},
    "dhondt": {"base_params": {"baseline": "nonsense"}},
    "responsiveness": {"desired": lambda out: out[:1, 0] > 0},
}


@pytest.mark.parametrize("method", [m for m in feature_methods("torch") if m in BAD_PARAMS])
def test_bad_parameter_mid_way_leaves_the_model_as_it_was(method):
    model = torch_model()
    before = snapshot(model)
    params = BAD_PARAMS[method]
    with pytest.raises(wm.WhatMattersError):
        wm.explain(model, np.ones((3, D)), method=method, **params)
    assert_same(before, snapshot(model))
