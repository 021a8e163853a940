"""No wasted forward passes: each gradient method costs the model's forward and backward passes it needs,
counted with hooks on the model (forward calls and rows, gradients reaching the output and the first layer).

With a given target no probe row runs: the method's own first forward checks the target. With
``target=None`` one prediction of all samples resolves the target (it also gives the output count), except
for a method that reads no target (Eigen-CAM): it makes no prediction at all.
Integrated gradients adds one no-grad forward of both path ends (input and baseline rows together) for
its completeness delta: cheaper than carrying those rows through a backward pass.
"""

from __future__ import annotations

import pytest
import torch
from helpers import small_cnn
from hypothesis import given, settings
from hypothesis import strategies as st

import whatmatters as wm


@pytest.fixture
def counted():
    model = small_cnn()
    seen = {"forwards": [], "backward_at_output": 0, "backward_at_first_layer": 0}

    def count(key):
        def hook(_g):
            seen[key] += 1

        return hook

    def on_output(_m, inputs, out):
        seen["forwards"].append(len(inputs[0]))
        if out.requires_grad:
            out.register_hook(count("backward_at_output"))

    def on_first(_m, _i, out):
        if out.requires_grad:
            out.register_hook(count("backward_at_first_layer"))

    handles = [model.register_forward_hook(on_output), model[0].register_forward_hook(on_first)]
    yield model, seen
    for h in handles:
        h.remove()


X = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("method", "params", "forwards", "backward_at_first_layer"),
    [
        ("saliency", {}, [5], 1),
        ("gradient_x_input", {}, [5], 1),
        ("grad_cam", {"layer": "2"}, [5], 0),  # the backward pass stops at the CAM layer
        ("lrp_epsilon", {}, [5], 1),  # one modified backward pass, down to the input
        ("integrated_gradients", {"steps": 8}, [10, 40], 1),  # both path ends, then all 5 x 8 path points
        ("integrated_gradients", {"steps": 8, "internal_batch_size": 16}, [10, 16, 16, 8], 3),
    ],
)
@pytest.mark.parametrize("target", [1, None])
def test_forward_and_backward_calls(counted, method, params, forwards, backward_at_first_layer, target):
    model, seen = counted
    wm.explain(model, X, method, target=target, **params)
    expected = forwards if target is not None else [5, *forwards]  # + the prediction that resolves the target
    assert seen["forwards"] == expected
    assert seen["backward_at_output"] == len(forwards) - (method == "integrated_gradients")
    assert seen["backward_at_first_layer"] == backward_at_first_layer


@pytest.mark.parametrize("target", [1, None])
def test_a_class_agnostic_method_makes_no_prediction_to_choose_a_target(counted, target):
    """Eigen-CAM does not read the target: one forward pass either way, the same maps, no target reported."""
    model, seen = counted
    imp = wm.explain(model, X, "eigen_cam", target=target, layer="2")
    assert seen["forwards"] == [5]
    assert seen["backward_at_output"] == seen["backward_at_first_layer"] == 0
    assert imp.target == target
    assert torch.equal(imp.values, wm.explain(model, X, "eigen_cam", target=2, layer="2").values)
    with pytest.raises(wm.TargetError, match="out of range: the model has 3 output"):
        wm.explain(model, X, "eigen_cam", target=3, layer="2")


def test_a_bad_target_is_still_refused_without_a_probe_row(counted):
    model, _ = counted
    for method in ("saliency", "grad_cam", "lrp_epsilon", "integrated_gradients"):
        with pytest.raises(wm.TargetError, match="out of range: the model has 3 output"):
            wm.explain(model, X, method, target=3)
    with pytest.raises(wm.InputError, match="failed on an input of shape"):  # the model's own failure, named
        wm.explain(model, X[:, :2], "saliency", target=1)


@settings(max_examples=30, deadline=None)
@given(
    target=st.one_of(st.integers(-(2**70), 2**70), st.lists(st.integers(-4, 6), max_size=7)),
    method=st.sampled_from(["saliency", "grad_cam", "lrp_epsilon", "integrated_gradients"]),
)
def test_any_target_is_checked_on_the_methods_own_forward(target, method):
    model = small_cnn()
    params = {"layer": "2"} if method == "grad_cam" else {"steps": 2} if method == "integrated_gradients" else {}
    values = target if isinstance(target, list) else [target] * len(X)
    if len(values) == len(X) and all(0 <= v < 3 for v in values):
        assert wm.explain(model, X, method, target=target, **params).values.shape[0] == len(X)
    else:
        with pytest.raises(wm.TargetError, match="target"):
            wm.explain(model, X, method, target=target, **params)
