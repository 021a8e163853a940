"""DeepLIFT, DeepLiftShap, GradientSHAP, guided backprop, deconvolution, Guided Grad-CAM: parity with captum,
completeness, hooks removed, bad input.

Parity tolerance: 1e-5 relative (``rtol=1e-5``, ``atol=1e-5 * max|reference|``) on float64 models.
Max pooling behind a nonlinearity is not a parity case: there captum 0.9's DeepLift breaks its own
completeness (its convergence delta is far from 0, see captum issues #1104 and #1276) while ours sums to
``f(x) - f(b)``; the pooling rule is compared on a model whose pool reads the input, and tested by completeness.
"""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import whatmatters as wm
from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.task import make_task
from whatmatters.explain.gradient_shap import expected_gradients

captum_attr = pytest.importorskip("captum.attr")

RTOL = 1e-5


def assert_parity(ours, ref):
    ref = ref.detach()
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=RTOL * float(ref.abs().max()))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 12), nn.Tanh(),
        nn.Linear(12, 12), nn.ELU(), nn.Linear(12, 8), nn.LeakyReLU(0.1), nn.Linear(8, 3),
    ).double().eval()  # fmt: skip


def cnn(pool: type = nn.AvgPool2d) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), pool(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
    ).double().eval()  # fmt: skip


def pool_first() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 4)).double().eval()


CASES = {
    "mlp": (mlp, lambda g: torch.randn(10, 6, generator=g, dtype=torch.float64)),
    "cnn": (cnn, lambda g: torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64)),
    "maxpool_first": (pool_first, lambda g: torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64)),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    """(model, data, predicted class) of one case."""
    model = CASES[request.param][0]()
    x = CASES[request.param][1](torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, x, model(x).argmax(1)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_deeplift_matches_captum_and_is_complete(case):
    model, x, target = case
    imp = wm.explain(model, x, "deeplift", target=target)
    assert_parity(imp.values, quiet(captum_attr.DeepLift(model).attribute, x.clone(), target=target))
    assert imp.extra["max_abs_delta"] < 1e-12


def test_deeplift_with_a_baseline_matches_captum(case):
    model, x, target = case
    base = torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    imp = wm.explain(model, x, "deeplift", target=target, baseline=base.numpy())
    ref = quiet(captum_attr.DeepLift(model).attribute, x.clone(), baselines=base.expand_as(x).clone(), target=target)
    assert_parity(imp.values, ref)


def test_deeplift_shap_matches_captum(case):
    model, x, target = case
    bg = torch.rand(5, *x.shape[1:], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    imp = wm.explain(model, x, "deeplift_shap", target=target, background=bg)
    assert_parity(imp.values, quiet(captum_attr.DeepLiftShap(model).attribute, x.clone(), baselines=bg, target=target))
    with torch.no_grad():
        expected = model(x).gather(1, target[:, None]).squeeze(1) - model(bg)[:, target].mean(0)
    assert np.allclose(imp.values.flatten(1).sum(1).numpy(), expected.numpy(), atol=1e-12)


class SharedActivations(nn.Module):
    """One ReLU module used twice and a softmax: captum refuses the first; ours stays complete."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.relu, self.softmax = nn.ReLU(), nn.Softmax(dim=1)

    def forward(self, x):
        return self.softmax(self.c(self.relu(self.b(self.relu(self.a(x))))))


@pytest.mark.parametrize("build", [lambda: cnn(nn.MaxPool2d), lambda: SharedActivations().double().eval()])
def test_deeplift_is_complete_with_max_pooling_shared_modules_and_softmax(build):
    model = build()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64) if isinstance(model, nn.Sequential) else torch.randn(6, 5).double()
    imp = wm.explain(model, x, "deeplift", target=1, baseline="mean")
    assert imp.extra["max_abs_delta"] < 1e-12
    assert imp.values.abs().sum() > 0


@pytest.mark.parametrize("build", [lambda: cnn(nn.MaxPool2d), lambda: SharedActivations().double().eval()])
def test_a_shared_baseline_is_one_row_of_the_batch_and_gives_the_per_sample_result(build):
    """``baseline="mean"`` runs one baseline row per model call (forward hooks count the rows); the same
    baseline given once per sample (one row each) gives the same attributions and deltas."""
    model = build()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64) if isinstance(model, nn.Sequential) else torch.randn(6, 5).double()
    rows = []
    handle = model.register_forward_pre_hook(lambda _m, args: rows.append(len(args[0])))
    try:
        shared = wm.explain(model, x, "deeplift", target=1, baseline="mean")
    finally:
        handle.remove()
    assert rows == [len(x) + 1]
    each = wm.explain(model, x, "deeplift", target=1, baseline=x.mean(0, keepdim=True).expand_as(x).clone())
    torch.testing.assert_close(shared.values, each.values, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(shared.extra["delta"], each.extra["delta"], atol=1e-12)


def test_gradient_shap_matches_captum_on_the_same_draws(case):
    model, x, target = case
    n, m, sd = len(x), 7, 0.1
    bg = torch.rand(5, *x.shape[1:], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    np.random.seed(3)
    torch.manual_seed(3)
    ref = captum_attr.GradientShap(model).attribute(x.clone(), baselines=bg, target=target, n_samples=m, stdevs=sd)
    np.random.seed(3)  # captum's draws, in its order: baseline rows, noise (float32 torch.normal), positions
    torch.manual_seed(3)
    index = np.random.choice(len(bg), n * m)
    noise = torch.normal(0, torch.tensor(sd).repeat((n * m, *x.shape[1:])))
    alphas = torch.tensor(np.random.uniform(0.0, 1.0, n * m), dtype=torch.float64)
    noisy = (x.repeat_interleave(m, 0) + noise).view(n, m, *x.shape[1:])
    ours = expected_gradients(make_task(model, x, target), noisy, bg[index].view(n, m, *x.shape[1:]), alphas.view(n, m))
    assert_parity(ours, ref)


def test_gradient_shap_is_seeded_and_approaches_completeness():
    model, x = mlp(), torch.randn(3, 6, dtype=torch.float64)
    bg = torch.randn(4, 6, dtype=torch.float64)
    a = wm.explain(model, x, "gradient_shap", target=0, background=bg, n_samples=2000, seed=1)
    b = wm.explain(model, x, "gradient_shap", target=0, background=bg, n_samples=2000, seed=1)
    assert torch.equal(a.values, b.values)
    with torch.no_grad():
        expected = model(x)[:, 0] - model(bg)[:, 0].mean()
    assert np.allclose(a.values.sum(1).numpy(), expected.numpy(), atol=0.05 * float(expected.abs().max()))


@pytest.mark.parametrize("name,reference", [("guided_backprop", "GuidedBackprop"), ("deconvolution", "Deconvolution")])
def test_modified_relu_gradients_match_captum(case, name, reference):
    model, x, target = case
    imp = quiet(wm.explain, model, x, name, target=target)  # maxpool_first has no ReLU: a warning
    assert_parity(imp.values, quiet(getattr(captum_attr, reference)(model).attribute, x.clone(), target=target))


class SharedInplace(nn.Module):
    """One in-place ReLU module used after both layers (the hooks see each call's own autograd node)."""

    def __init__(self, shared: bool):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.r1 = nn.ReLU(inplace=shared)
        self.r2 = self.r1 if shared else nn.ReLU()

    def forward(self, x):
        return self.c(self.r2(self.b(self.r1(self.a(x)))))


@pytest.mark.parametrize("name", ["guided_backprop", "deconvolution"])
def test_modified_relu_gradients_with_a_shared_inplace_relu_equal_separate_ones(name):
    x = torch.randn(5, 6, dtype=torch.float64)
    shared = wm.explain(SharedInplace(True).double().eval(), x, name, target=1).values
    separate = wm.explain(SharedInplace(False).double().eval(), x, name, target=1).values
    torch.testing.assert_close(shared, separate, rtol=0, atol=0)
    plain = wm.explain(SharedInplace(False).double().eval(), x, "saliency", abs=False, target=1).values
    assert not torch.equal(separate, plain)  # the rule changed something


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_guided_grad_cam_matches_captum(upsample):
    model, x = cnn(nn.MaxPool2d), torch.rand(4, 3, 8, 8, dtype=torch.float64)
    target = model(x).argmax(1)
    imp = wm.explain(model, x, "guided_grad_cam", target=target, layer="4", upsample=upsample)
    ref = quiet(captum_attr.GuidedGradCam(model, model[4]).attribute, x.clone(), target=target,
                interpolate_mode=upsample)  # fmt: skip
    assert imp.values.shape == x.shape and imp.extra["layer"] == "4"
    assert_parity(imp.values, ref)


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.relu = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        h = self.relu(self.lin(x))
        if h.shape[0] > 1:
            raise RuntimeError("boom")
        return h


@pytest.mark.parametrize("method", ["deeplift", "guided_backprop", "deconvolution"])
def test_hooks_are_removed_even_on_error(method):
    model = Failing().eval()
    with pytest.raises(Exception, match="boom"):
        wm.explain(model, torch.randn(3, 4), method, target=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_functional_activations_are_reported():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return torch.relu(self.lin(x))

    with pytest.warns(UserWarning, match="functional"):
        wm.explain(Functional().eval(), torch.randn(2, 4), "deeplift", target=0)
    with pytest.warns(UserWarning, match="no nn.ReLU"):
        wm.explain(Functional().eval(), torch.randn(2, 4), "guided_backprop", target=0)


def test_a_background_or_baseline_of_the_wrong_shape_is_an_input_error():
    model, x = mlp(), torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(InputError, match="background"):
        wm.explain(model, x, "deeplift_shap", background=torch.randn(4, 5))
    with pytest.raises(InputError, match="background"):
        wm.explain(model, x, "gradient_shap", background=torch.randn(4, 6, 1))
    with pytest.raises(InputError, match="baseline"):
        wm.explain(model, x, "deeplift", baseline=np.zeros(4))


@settings(max_examples=30, deadline=None)
@given(
    st.one_of(
        st.tuples(st.just("deeplift"), st.fixed_dictionaries({"eps": st.one_of(st.floats(max_value=0), st.just("a"))})),
        st.tuples(st.just("deeplift_shap"), st.fixed_dictionaries({"max_background": st.integers(max_value=0)})),
        st.tuples(st.just("gradient_shap"), st.fixed_dictionaries({"n_samples": st.integers(max_value=0)})),
        st.tuples(st.just("gradient_shap"), st.fixed_dictionaries({"noise": st.floats(max_value=-1e-6)})),
        st.tuples(st.just("guided_grad_cam"), st.fixed_dictionaries({"upsample": st.text(max_size=4)})),
    )
)
def test_bad_parameters_are_clear_errors(call):
    method, params = call
    data = torch.rand(2, 3, 8, 8, dtype=torch.float64) if method == "guided_grad_cam" else torch.randn(2, 6).double()
    model = cnn() if data.ndim == 4 else mlp()
    with pytest.raises((MethodError, InputError)):
        wm.explain(model, data, method, **params)


def test_an_eps_below_the_dtype_range_gives_finite_scores():
    """Found by the parameter fuzz test: eps=3.8e-66 rounds to 0 in float32, and dx == 0 divided by 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(6, 3)
    for method in ("deeplift", "deeplift_shap"):
        assert bool(torch.isfinite(wm.explain(net, x, method, target=1, eps=3.8e-66).values).all())


def _max_pool_rule_by_autograd(module, x, y, grad):
    """The max-pooling multiplier written with the pool's own backward pass (three local VJPs)."""
    from whatmatters.explain.modified_backward import local_vjp

    k = len(x) // 2
    out, ref, g = y[:k], y[k:], grad[:k]
    top = torch.maximum(out, ref)
    spread = local_vjp(module, x[:k], g * (top - ref)) + local_vjp(module, x[k:], g * (out - top))
    dx = x[:k] - x[k:]
    small = dx.abs() < 1e-10
    new = torch.where(small, local_vjp(module, x[:k], g), spread / torch.where(small, torch.ones_like(dx), dx))
    return torch.cat([new, torch.zeros_like(new)])


@pytest.mark.parametrize(
    ("pool", "shape"),
    [
        (nn.MaxPool2d(3, 2, 1), (3, 7, 7)),  # overlapping windows with padding (ResNet's stem)
        (nn.MaxPool2d(2, ceil_mode=True), (2, 5, 5)),
        (nn.MaxPool2d(3, 1, dilation=2), (2, 8, 8)),
        (nn.MaxPool1d(3, 2, 1), (4, 9)),
        (nn.MaxPool3d(2, 1), (2, 4, 4, 4)),
    ],
)
def test_the_max_pool_multiplier_equals_the_pools_own_backward(pool, shape):
    """One pooling pass with indices and one scatter give what three autograd passes of the pool give."""
    from whatmatters.explain.deeplift import deeplift_rules

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, *shape, generator=g, dtype=torch.float64)
    x[3:, 0] = x[:3, 0]  # the first channel equals its baseline: the plain gradient there
    y = pool(x)
    grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = deeplift_rules(1e-10)[type(pool)](pool, x, y, grad)
    torch.testing.assert_close(got, _max_pool_rule_by_autograd(pool, x, y, grad), rtol=1e-12, atol=1e-12)
