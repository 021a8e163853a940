"""No wasted forward passes: each gradient method costs the model's forward and backward passes it needs,
counted with hooks on the model (forward calls and rows, gradients reaching the output and the first layer).

With a given target no probe row runs: the method's own first forward checks the target. With
``target=None`` a method whose first forward runs the samples themselves (saliency, gradient x input, the
gradient CAMs, LRP, DeepLIFT; integrated gradients from its forward of both path ends) takes the predicted
class from that forward; the others make one prediction of all samples first (it also gives the output
count); a method that reads no target (Eigen-CAM) makes no prediction at all.
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
from whatmatters.core.registry import get_method


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
        ("deeplift", {}, [6], 1),  # the samples and their (shared) baseline row in one forward, one modified backward
        ("deeplift", {"baseline": torch.zeros_like(X)}, [10], 1),  # a baseline per sample: twice the rows
        ("integrated_gradients", {"steps": 8}, [6, 40], 1),  # both path ends (one baseline row), then 5 x 8 points
        ("integrated_gradients", {"steps": 8, "internal_batch_size": 16}, [6, 16, 16, 8], 3),
    ],
)
@pytest.mark.parametrize("target", [1, None])
def test_forward_and_backward_calls(counted, method, params, forwards, backward_at_first_layer, target):
    model, seen = counted
    wm.explain(model, X, method, target=target, **params)
    own = target is not None or get_method(method).predicts_target  # the method's own forward picks the class
    expected = forwards if own else [5, *forwards]  # + the prediction that resolves the target
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
    for method in ("saliency", "grad_cam", "lrp_epsilon", "integrated_gradients", "deeplift", "deeplift_shap"):
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


@pytest.mark.parametrize(
    ("method", "params"),
    [("saliency", {}), ("gradient_x_input", {}), ("grad_cam", {"layer": "2"}), ("layer_cam", {"layer": "2"}),
     ("saliency", {"layer": "2"}), ("lrp_epsilon", {}), ("lrp", {"composite": "epsilon_plus"}), ("deeplift", {}),
     ("integrated_gradients", {"steps": 4}), ("integrated_gradients", {"steps": 4, "layer": "2"})],
)  # fmt: skip
@pytest.mark.parametrize("batch_size", [None, 2])
def test_the_predicted_class_from_the_methods_own_forward_is_the_models_prediction(method, params, batch_size):
    model = small_cnn()
    with torch.no_grad():
        predicted = model(X).argmax(1)
    imp = wm.explain(model, X, method, batch_size=batch_size, **params)
    given = wm.explain(model, X, method, target=predicted, batch_size=batch_size, **params)
    assert torch.equal(imp.values, given.values)
    assert imp.target == given.target == (predicted.tolist() if len(set(predicted.tolist())) > 1 else int(predicted[0]))


def test_a_neurons_gradient_and_a_one_output_model_report_their_target():
    model = small_cnn()
    with torch.no_grad():
        predicted = model(X).argmax(1).tolist()
    imp = wm.explain(model, X, "saliency", layer="2", neuron=0)  # the neuron's gradient reads no target
    assert imp.target == (predicted if len(set(predicted)) > 1 else predicted[0])
    regressor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1)).eval()
    assert wm.explain(regressor, X, "saliency").target == 0


def test_non_finite_outputs_of_the_samples_are_named_when_the_target_is_predicted():
    class Broken(torch.nn.Module):  # divides by zero on sample 3, wherever it is in a batch
        def forward(self, x):
            flat = x.flatten(1)
            return flat[:, :3] / (flat[:, :1] - X[3].flatten()[0])

    for batch_size in (None, 2):  # the samples are named by their row in the data, whatever the call
        with pytest.raises(wm.ModelError, match=r"NaN or infinite outputs for 1 of 5 samples \(rows 3\)"):
            wm.explain(Broken().eval(), X, "saliency", batch_size=batch_size)


def test_cpu_calls_are_capped_to_cache_sized_batches():
    """On a CPU, path points of a wide MLP go through in calls of CACHE_ROWS rows (not all 16 x 96 at once);
    batch_size / internal_batch_size still decide when given, and the attributions are the same."""
    from whatmatters.core.adapters import CACHE_ROWS, wrap

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 512), torch.nn.ReLU(), torch.nn.Linear(512, 3)).eval()
    x = torch.randn(96, 6)
    assert wrap(mlp).cache_rows() == CACHE_ROWS  # 515 output values per row: 2**18 // 515 < CACHE_ROWS
    calls: list[int] = []
    handle = mlp.register_forward_hook(lambda _m, inputs, _o: calls.append(len(inputs[0])))
    try:
        capped = wm.explain(mlp, x, "integrated_gradients", target=1, steps=16)
        path_calls, calls[:] = [c for c in calls if c != 97], []  # (97: both path ends, one no-grad call)
        whole = wm.explain(mlp, x, "integrated_gradients", target=1, steps=16, internal_batch_size=16 * 96)
        whole_calls, calls[:] = [c for c in calls if c != 97], []
        wm.explain(mlp, x, "smoothgrad", target=1, n_samples=16, batch_size=192)
        given_calls = calls[:]
    finally:
        handle.remove()
    assert path_calls == [CACHE_ROWS // 16 * 16] * 3  # whole paths of 32 samples per call
    assert whole_calls == [16 * 96]
    assert given_calls == [192] * 8
    torch.testing.assert_close(capped.values, whole.values, rtol=1e-5, atol=1e-6)


def test_cache_cap_is_for_cpus_and_linear_layers_only():
    from whatmatters.core.adapters import wrap

    adapted = wrap(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    assert adapted.cache_rows() == 2**18 // 10
    adapted._device = torch.device("cuda")  # (no GPU needed: the cap reads only the device's type)
    assert adapted.cache_rows() is None
    assert wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())).cache_rows() is None
