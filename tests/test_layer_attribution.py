"""Layer and neuron attribution (``layer=`` / ``neuron=`` on the gradient family, layer conductance, internal
influence, neuron conductance): parity with captum 0.9, ground truth, hooks removed, bad input.

Parity tolerance: ``rtol=1e-6`` (``atol=1e-6 * max|reference|``) on float64 models; the gradient-only methods
agree to rounding, the path methods to about 5e-9 (captum's Gauss-Legendre nodes are rounded differently).
Same steps and rule on both sides: captum's NeuronConductance defaults to ``riemann_trapezoid``, ours (as every
path method here) to ``gausslegendre``, so the rule is given.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import whatmatters as wm
from whatmatters.core.errors import MethodError, ModelError

captum_attr = pytest.importorskip("captum.attr")
RTOL = 1e-6


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).double().eval()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
    ).double().eval()  # fmt: skip


CASES = {  # model, inputs, layer, neuron
    "mlp": (mlp, lambda g: torch.randn(10, 6, generator=g, dtype=torch.float64), "2", 5),
    "cnn": (cnn, lambda g: torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64), "3", (2, 1, 1)),
}


def pairs(layer, neuron):
    """(method, our parameters, captum class, its constructor keywords, its attribute keywords)."""
    path = {"steps": 12}
    return [
        ("gradient_x_input", {}, "LayerGradientXActivation", {}, {}),
        ("saliency", {"abs": False}, "LayerGradientXActivation", {"multiply_by_inputs": False}, {}),
        ("integrated_gradients", path, "LayerIntegratedGradients", {}, {"n_steps": 12}),
        ("integrated_gradients", {**path, "internal_batch_size": 5}, "LayerIntegratedGradients", {}, {"n_steps": 12}),
        ("layer_conductance", path, "LayerConductance", {}, {"n_steps": 12}),
        ("layer_conductance", {**path, "internal_batch_size": 4}, "LayerConductance", {}, {"n_steps": 12}),
        ("internal_influence", path, "InternalInfluence", {}, {"n_steps": 12}),
        (
            "neuron_conductance",
            {**path, "neuron": neuron},
            "NeuronConductance",
            {},
            {"n_steps": 12, "neuron_selector": neuron, "method": "gausslegendre"},
        ),
        ("saliency", {"abs": False, "neuron": neuron}, "NeuronGradient", {}, {"neuron_selector": neuron}),
        (
            "integrated_gradients",
            {**path, "neuron": neuron},
            "NeuronIntegratedGradients",
            {},
            {"n_steps": 12, "neuron_selector": neuron},
        ),
    ]


@pytest.mark.parametrize("case", CASES)
def test_parity_with_captum(case):
    make, data, layer, neuron = CASES[case]
    model, x = make(), data(torch.Generator().manual_seed(1))
    target = model(x).argmax(1)
    module = model.get_submodule(layer)
    for method, ours, name, init, kwargs in pairs(layer, neuron):
        imp = wm.explain(model, x, method, target=target, layer=layer, **ours)
        cls = getattr(captum_attr, name)
        if name.startswith("Neuron"):
            ref = cls(model, module, **init).attribute(
                x, **({"target": target} if "Conductance" in name else {}), **kwargs
            )
        else:
            ref = cls(model, module, **init).attribute(x, target=target, **kwargs)
        ref = ref.detach()
        torch.testing.assert_close(
            imp.values, ref, rtol=RTOL, atol=RTOL * float(ref.abs().max()), msg=f"{method} vs {name}"
        )
        assert imp.extra["layer"] == layer
        assert imp.unit == ("neuron" if "neuron" not in ours else ("feature" if x.ndim == 2 else "pixel"))


def test_layer_units_shape_and_completeness():
    model, x = mlp(), torch.randn(8, 6, dtype=torch.float64)
    imp = wm.explain(model, x, "layer_conductance", layer="3", steps=200)
    assert imp.unit == "neuron" and imp.values.shape == (8, 12) and imp.extra["activation_shape"] == [12]
    assert imp.extra["max_abs_delta"] < 1e-3  # conductance adds up to f(x) - f(baseline)
    ig = wm.explain(model, x, "integrated_gradients", layer="2", steps=64)
    assert ig.extra["max_abs_delta"] < 1e-6


def test_ground_truth_only_the_wired_neuron_matters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double().eval()
    with torch.no_grad():
        model[2].weight[:, [i for i in range(8) if i != 3]] = 0  # only hidden neuron 3 reaches the output
    x = torch.randn(6, 5, dtype=torch.float64)
    for method in ("layer_conductance", "gradient_x_input", "integrated_gradients", "internal_influence"):
        v = wm.explain(model, x, method, target=0, layer="1").values
        others = torch.cat([v[:, :3], v[:, 4:]], 1)
        assert float(others.abs().max()) == 0 and float(v[:, 3].abs().min()) > 0, method
    # all of the output flows through neuron 3: its conductance is the whole input attribution
    nc = wm.explain(model, x, "neuron_conductance", target=0, layer="1", neuron=3, steps=64).values
    ig = wm.explain(model, x, "integrated_gradients", target=0, steps=64).values
    torch.testing.assert_close(nc, ig)


def test_hooks_removed_and_model_unchanged_even_on_error():
    model, x = cnn(), torch.rand(2, 3, 8, 8, dtype=torch.float64)
    before = [p.clone() for p in model.parameters()]
    wm.explain(model, x, "layer_conductance", layer="3", steps=4)
    with pytest.raises(MethodError):
        wm.explain(model, x, "neuron_conductance", layer="3", neuron=10**6, steps=4)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not any(p.requires_grad is False for p in model.parameters())


def test_bad_layer_and_neuron():
    model, x = mlp(), torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(ModelError, match=r"no layer named '22'.*Did you mean"):
        wm.explain(model, x, "saliency", layer="22")
    with pytest.raises(MethodError, match="needs layer="):
        wm.explain(model, x, "saliency", neuron=1)
    with pytest.raises(MethodError, match="layer= must name"):
        wm.explain(model, x, "internal_influence")
    with pytest.raises(MethodError, match="needs neuron="):
        wm.explain(model, x, "neuron_conductance", layer="2")
    with pytest.raises(MethodError, match="not inside layer"):
        wm.explain(model, x, "neuron_conductance", layer="2", neuron=(1, 2))

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.extra = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            return self.used(x)

    unused = Unused().double().eval()
    with pytest.raises(ModelError, match="ran 0 times"):
        wm.explain(unused, x, "saliency", layer="extra")


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.integers(-50, -1), st.integers(16, 10**9), st.booleans()))
def test_neuron_index_out_of_range_is_refused(index):
    model, x = mlp(), torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(MethodError):
        wm.explain(model, x, "integrated_gradients", layer="2", neuron=index, steps=2)
