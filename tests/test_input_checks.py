"""Issue 19, parts 1-2: feature names follow the model, NaN / inf / wrongly typed parameters and non-finite model
outputs are refused in the one shared path (make_task, check_params), so every method gets the checks."""

from __future__ import annotations

import functools
import json
import math
import re

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import assert_same, snapshot
from torch import nn
from typer.testing import CliRunner

import whatmatters as wm
from whatmatters.cli import app
from whatmatters.core.params import count_non_finite
from whatmatters.core.registry import get_method

COLUMNS = ["a", "b", "c"]
REORDERED = ["c", "b", "a"]


def raises(error: type[Exception], *words: str):
    """pytest.raises for an error whose message holds every word (literally, case-insensitive)."""
    pattern = "".join(f"(?=.*{re.escape(w)})" for w in words)
    return pytest.raises(error, match=re.compile(pattern, re.IGNORECASE | re.DOTALL))


@functools.cache
def frame_and_model(pipeline: bool = False):
    """A frame with columns a, b, c and a classifier fitted on it whose label depends on ``a`` alone."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.normal(size=(80, 3)) * [1.0, 2.0, 3.0], columns=COLUMNS)
    y = (x["a"] > 0).astype(int).to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression()) if pipeline else LogisticRegression()
    return x, y, model.fit(x, y)


def top_name(imp: wm.Importance) -> str:
    agg = imp.aggregate("mean_abs") if imp.per_sample else imp
    return agg.top(1)[0][0]


# ----------------------------------------------------------------------------- feature names follow the model
@pytest.mark.parametrize("pipeline", [False, True], ids=["estimator", "pipeline"])
@pytest.mark.parametrize("method", ["permutation", "kernel_shap", "shapley_exact", "ablation"])
def test_reordered_columns_are_explained_under_the_right_names(method, pipeline):
    x, y, model = frame_and_model(pipeline)
    kwargs = {"y": y[:20]} if method == "permutation" else {}
    imp = wm.explain(model, x[REORDERED].iloc[:20], method, **kwargs)
    assert imp.names == tuple(COLUMNS) and top_name(imp) == "a"
    same = wm.explain(model, x.iloc[:20], method, **kwargs)  # the frame in the model's own order
    np.testing.assert_allclose(imp.numpy(), same.numpy())


def test_reordered_background_frame_is_aligned_too():
    x, _, model = frame_and_model()
    data, background = x.iloc[:10], x.iloc[40:60]
    expected = wm.explain(model, data, "kernel_shap", background=background)
    for bg in (background[REORDERED], background[["b", "a", "c"]]):
        imp = wm.explain(model, data[REORDERED], "kernel_shap", background=bg)
        np.testing.assert_allclose(imp.numpy(), expected.numpy())
    # an array background has the data's layout: its columns move with the data's
    imp = wm.explain(model, data[REORDERED], "ablation", background=background[REORDERED].to_numpy())
    np.testing.assert_allclose(imp.numpy(), wm.explain(model, data, "ablation", background=background).numpy())


def test_unnamed_data_is_read_by_position_under_the_model_names():
    x, _, model = frame_and_model()
    imp = wm.explain(model, x.to_numpy()[:5], "ablation")
    assert imp.names == tuple(COLUMNS)
    np.testing.assert_allclose(imp.numpy(), wm.explain(model, x.iloc[:5], "ablation").numpy())


def test_benchmark_and_metrics_align_the_columns():
    x, y, model = frame_and_model()
    methods = ["ablation", "permutation", "kernel_shap"]
    result = wm.benchmark(model, x[REORDERED].iloc[:15], methods, metrics=["deletion_auc"], y=y[:15], seed=0)
    expected = wm.benchmark(model, x.iloc[:15], methods, metrics=["deletion_auc"], y=y[:15], seed=0)
    assert not result.errors
    for method in methods:
        imp = result.importances[method]
        assert imp.names == tuple(COLUMNS) and top_name(imp) == "a"
        np.testing.assert_allclose(imp.numpy(), expected.importances[method].numpy())
    np.testing.assert_allclose(result.table["deletion_auc"], expected.table["deletion_auc"])
    imp = expected.importances["ablation"]
    score = wm.evaluate.measure(model, x[REORDERED].iloc[:15], imp, "deletion_auc")
    assert score.value == pytest.approx(wm.evaluate.measure(model, x.iloc[:15], imp, "deletion_auc").value)


@pytest.mark.parametrize(
    ("columns", "words"),
    [
        (["a", "b"], ("data has 2 columns", "fitted on 3", "missing ['c']")),
        (["x", "b", "c"], ("missing ['a']", "unknown ['x']", "matched by name")),
        (["a", "b", "c", "d"], ("data has 4 columns", "unknown ['d']")),
        (["a", "a", "b"], ("missing ['c']", "repeated ['a']")),
    ],
    ids=["missing", "renamed", "extra", "repeated"],
)
def test_missing_unknown_or_repeated_columns_are_named(columns, words):
    x, _, model = frame_and_model()
    frame = pd.DataFrame(np.ones((3, len(columns))), columns=columns)
    with raises(wm.InputError, *words):
        wm.explain(model, frame, "ablation")
    with raises(wm.InputError, "background", *words[1:]):
        wm.explain(model, x.iloc[:3], "ablation", background=frame)


def test_feature_names_argument_names_the_data_columns():
    x, _, model = frame_and_model()
    imp = wm.explain(model, x[REORDERED].to_numpy()[:5], "ablation", feature_names=REORDERED)
    assert imp.names == tuple(COLUMNS) and top_name(imp) == "a"
    with raises(wm.InputError, "unknown ['q']"):
        wm.explain(model, x.to_numpy()[:5], "ablation", feature_names=["q", "b", "c"])


def test_cli_explain_aligns_a_reordered_csv(tmp_path):
    x, y, model = frame_and_model()
    joblib.dump(model, tmp_path / "model.joblib")
    rows = x[REORDERED].assign(label=y).iloc[:12]
    rows.to_csv(tmp_path / "data.csv", index=False)
    out = tmp_path / "scores.parquet"
    args = ["explain", tmp_path / "model.joblib", tmp_path / "data.csv", "-m", "ablation", "-y", "label", "-o", out]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = wm.Importance.load(out)
    assert saved.names == tuple(COLUMNS) and top_name(saved) == "a"
    np.testing.assert_allclose(saved.numpy(), wm.explain(model, x.iloc[:12], "ablation").numpy())
    rows.rename(columns={"a": "alpha"}).to_csv(tmp_path / "renamed.csv", index=False)
    args[2] = tmp_path / "renamed.csv"
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    assert "missing ['a']" in result.stderr and "unknown ['alpha']" in result.stderr
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- parameters
@functools.cache
def net(d: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 3)).eval()


@functools.cache
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


X4 = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
IMAGES = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("method", "params", "words"),
    [
        ("integrated_gradients", {"baseline": NAN}, ("baseline=nan is not a finite", "leave it out: default 'zero'")),
        ("smoothgrad", {"noise": NAN}, ("noise=nan is not a finite number", "default 0.15")),
        ("ablation", {"baseline": INF}, ("baseline=inf", "finite baseline", "default 'mean'")),
        ("ablation", {"baseline": np.float32("-inf")}, ("baseline=-inf",)),
        ("ablation", {"baseline": np.array([0.0, NAN, 1.0, INF])}, ("baseline holds 2 NaN or inf",)),
        ("integrated_gradients", {"baseline": torch.full((5, 4), NAN)}, ("baseline holds 20 NaN or inf",)),
        ("integrated_gradients", {"baseline": [0.0, 0.0, INF, 0.0]}, ("baseline holds 1 NaN or inf",)),
        ("lrp_epsilon", {"epsilon": INF}, ("epsilon=inf",)),
    ],
)
def test_non_finite_parameters_are_refused_naming_method_parameter_and_fix(method, params, words):
    with raises(wm.ParameterError, f"{method}:", *words):
        wm.explain(net(), X4, method, **params)


def test_non_finite_baseline_of_an_occlusion_method():
    with raises(wm.InputError, "occlusion: baseline=inf", "finite baseline"):
        wm.explain(cnn(), IMAGES, "occlusion", target=0, window=4, baseline=INF)


def test_parameter_errors_are_input_and_method_errors():
    assert issubclass(wm.ParameterError, wm.InputError) and issubclass(wm.ParameterError, wm.MethodError)
    with raises(wm.ParameterError, "integrated_gradients: steps must be an int, got 2.5", "default 50"):
        wm.explain(net(), X4, "integrated_gradients", steps=2.5)
    with raises(wm.ParameterError, "kernel_shap: max_background must be an int, got None"):
        wm.explain(net(), X4, "kernel_shap", max_background=None)
    with raises(wm.ParameterError, "dhondt: base_params must be a dict or None, got 3"):
        wm.explain(net(), X4, "dhondt", base_params=3)
    with raises(wm.ParameterError, "ablation: baseline holds 1 NaN"):  # the base method's own parameters
        wm.explain(net(), X4, "dhondt", base_params={"baseline": [0.0, NAN, 0.0, 0.0]})
    with raises(wm.InputError, "baseline must be", "a number or an array", "None"):
        wm.explain(net(), X4, "ablation", baseline=None)


def test_benchmark_and_metrics_refuse_non_finite_parameters_before_any_work():
    with raises(wm.ParameterError, "smoothgrad: noise=inf"):
        wm.benchmark(net(), X4, [("smoothgrad", {"noise": INF})], metrics=["deletion_auc"])
    with raises(wm.ParameterError, "deletion_auc: baseline=nan"):
        wm.benchmark(net(), X4, ["saliency"], metrics=[("deletion_auc", {"baseline": NAN})])
    imp = wm.explain(net(), X4, "saliency")
    with raises(wm.ParameterError, "max_sensitivity: radius=inf"):
        wm.evaluate.measure(net(), X4, imp, "max_sensitivity", radius=INF)


@pytest.mark.parametrize(
    ("method", "params", "same"),
    [
        ("integrated_gradients", {"steps": np.int64(8), "internal_batch_size": np.int32(16)}, {"steps": 8}),
        ("smoothgrad", {"noise": np.float32(0.25), "n_samples": np.int16(3)}, {"noise": 0.25, "n_samples": 3}),
        ("ablation", {"baseline": np.float64(0.5)}, {"baseline": 0.5}),
        ("lrp_epsilon", {"epsilon": np.float32(0.5), "canonize": np.bool_(False)}, {"epsilon": 0.5, "canonize": False}),
        ("saliency", {"abs": np.bool_(False)}, {"abs": False}),
    ],
)
def test_numpy_scalars_are_accepted_as_python_numbers(method, params, same):
    imp = wm.explain(net(), X4, method, **params)
    np.testing.assert_allclose(imp.numpy(), wm.explain(net(), X4, method, **same).numpy(), rtol=1e-6)
    json.dumps(imp.params)  # recorded as plain Python numbers


def test_numpy_scalars_for_a_scikit_learn_model_and_the_benchmark():
    x, y, model = frame_and_model()
    imp = wm.explain(model, x.iloc[:10], "permutation", y=y[:10], n_repeats=np.int64(3))
    assert imp.params["n_repeats"] == 3 and type(imp.params["n_repeats"]) is int
    result = wm.benchmark(model, x.iloc[:10], [("kernel_shap", {"max_background": np.int64(20)})], y=y[:10])
    assert not result.errors


# ----------------------------------------------------------------------------- model outputs
def nan_for_negative_first_column(array):
    out = np.asarray(array, dtype=np.float64)
    return np.stack([np.where(out[:, 0] < 0, np.nan, out.sum(1)), np.zeros(len(out))], axis=1)


def test_non_finite_outputs_name_how_many_rows():
    data = np.array([[1.0, 0, 0], [-1, 0, 0], [2, 0, 0], [-3, 0, 0], [4, 0, 0]])
    with raises(wm.ModelError, "NaN or infinite outputs for 2 of 5 samples", "rows 1, 3"):
        wm.explain(nan_for_negative_first_column, data, "ablation")  # predicted target: all rows seen
    with raises(wm.ModelError, "for 2 of 5 samples"):
        wm.explain(nan_for_negative_first_column, data[[1, 0, 2, 3, 4]], "kernel_shap", target=0)  # probe row fails


class Infinite(nn.Module):
    def forward(self, x):
        return torch.stack([x.sum(1) / (x[:, 0] > 0), x.sum(1)], dim=1)  # inf where x[:, 0] <= 0


def test_non_finite_outputs_of_a_torch_model_and_the_model_is_left_as_it_was():
    model = Infinite().eval()
    data = torch.tensor([[-1.0, 2.0], [1.0, 1.0], [0.0, 3.0]])
    for method in ("saliency", "integrated_gradients", "ablation"):
        with raises(wm.ModelError, "for 2 of 3 samples", "rows 0, 2"):
            wm.explain(model, data, method, target=1)
    assert model.training is False


def test_the_output_check_adds_no_model_call():
    calls = []

    def counted(array):
        calls.append(len(array))
        return nan_for_negative_first_column(np.abs(array))

    wm.explain(counted, X4.numpy(), "ablation")
    assert calls[:1] == [5]  # the predicted target (it gives the output count: no probe row); then the method's
    assert len(calls) == 2


# ----------------------------------------------------------------------------- property test
FUZZ_METHODS = tuple(
    m for m in wm.methods(unit="feature", verb="explain") if get_method(m).needs != "fit" and get_method(m).defaults
)
BAD_VALUES = st.one_of(
    st.sampled_from([NAN, INF, -INF, 0, -1, 1, 2**63, 10**30, True, None, "", "x", "mean", [], [1.0, NAN], {}]),
    st.integers(-5, 60),
    st.floats(-1e3, 1e3),
    st.sampled_from([np.float32(NAN), np.float32(0.5), np.int64(-2), np.int64(4), np.full(4, INF), torch.zeros(4)]),
)


def sklearn_state(model) -> dict:
    return {k: v.copy() for k, v in vars(model).items() if isinstance(v, np.ndarray)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(FUZZ_METHODS), data=st.data(), use_sklearn=st.booleans())
def test_bad_parameters_give_a_result_or_a_whatmatters_error_and_leave_the_model(method, data, use_sklearn):
    info = get_method(method)
    param = data.draw(st.sampled_from(sorted(info.defaults)), label="param")
    value = data.draw(BAD_VALUES, label="value")
    x, y, fitted = frame_and_model()
    use_sklearn = use_sklearn and info.needs == "predict"
    model = fitted if use_sklearn else net(3)
    before = sklearn_state(model) if use_sklearn else snapshot(model)
    kwargs = {"y": y[:6]} if method == "permutation" else {}
    try:
        imp = wm.explain(model, x.iloc[:6], method, **kwargs, **{param: value})
    except wm.WhatMattersError:
        imp = None
    if use_sklearn:
        after = sklearn_state(model)
        assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    else:
        assert_same(before, snapshot(model))
    if imp is None:
        return
    assert count_non_finite(value) == 0, f"{method} computed with {param}={value!r}"
    assert imp.names == tuple(COLUMNS) or method == "dhondt"
    assert imp.unit_shape == (3,) and not math.isnan(float(imp.values.double().abs().sum()))
