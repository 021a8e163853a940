"""Gradient family: parity with captum, completeness, ground truth, batching, dtype and clear errors.

Parity tolerance with captum: 1e-5 relative (``rtol=1e-5``, ``atol=1e-5 * max|reference|``) on float64
models, so that differences are the methods', not float32 rounding.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import whatmatters as wm
from whatmatters.explain.gradient import path_points

captum_attr = pytest.importorskip("captum.attr")

RTOL = 1e-5


def assert_parity(ours: torch.Tensor, ref: torch.Tensor) -> None:
    ref = ref.detach()
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=RTOL * float(ref.abs().max()))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 3)).double().eval()
    )


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.Softplus(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 4),
        )
        .double()
        .eval()
    )


CASES = {
    "mlp": (mlp, lambda g: torch.randn(12, 6, generator=g, dtype=torch.float64)),
    "cnn": (cnn, lambda g: torch.rand(4, 3, 16, 16, generator=g, dtype=torch.float64)),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    build, data = CASES[request.param]
    model = build()
    x = data(torch.Generator().manual_seed(1))
    return model, x, model(x).argmax(1)


@pytest.mark.parametrize("absolute", [True, False])
def test_saliency_matches_captum(case, absolute):
    model, x, target = case
    imp = wm.explain(model, x, "saliency", target=target, abs=absolute)
    ref = captum_attr.Saliency(model).attribute(x.clone(), target=target, abs=absolute)
    assert imp.unit == ("feature" if x.ndim == 2 else "pixel") and imp.values.shape == x.shape
    assert_parity(imp.values, ref)


def test_gradient_x_input_matches_captum(case):
    model, x, target = case
    imp = wm.explain(model, x, "input_x_gradient", target=target)
    assert imp.method == "gradient_x_input"
    assert_parity(imp.values, captum_attr.InputXGradient(model).attribute(x.clone(), target=target))


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_middle", "riemann_trapezoid", "riemann_left"])
def test_integrated_gradients_matches_captum(case, rule):
    model, x, target = case
    steps = 16
    imp = wm.explain(model, x, "integrated_gradients", target=target, steps=steps, rule=rule)
    ref = captum_attr.IntegratedGradients(model).attribute(x.clone(), target=target, n_steps=steps, method=rule)
    if rule == "riemann_trapezoid":  # captum's trapezoid weights sum to (steps - 1) / steps, ours to 1
        ref = ref * steps / (steps - 1)
    assert_parity(imp.values, ref)


@pytest.mark.parametrize("baseline", ["mean", "array", "per_sample"])
def test_integrated_gradients_baselines_match_captum(case, baseline):
    model, x, target = case
    g = torch.Generator().manual_seed(5)
    base = {
        "mean": x.mean(0),
        "array": torch.rand(x.shape[1:], generator=g, dtype=x.dtype),
        "per_sample": torch.rand(x.shape, generator=g, dtype=x.dtype),
    }[baseline]
    given = "mean" if baseline == "mean" else base.numpy()
    imp = wm.explain(model, x, "integrated_gradients", target=target, steps=20, baseline=given)
    ref = captum_attr.IntegratedGradients(model).attribute(
        x.clone(), baselines=base.expand_as(x).clone(), target=target, n_steps=20
    )
    assert_parity(imp.values, ref)


def test_integrated_gradients_batching_does_not_change_results():
    model, x = mlp(), torch.randn(5, 6, dtype=torch.float64)
    full = wm.explain(model, x, "integrated_gradients", target=2, steps=12)
    for size in (1, 5, 13, 40):  # within one path, one path, a path and a bit, several paths
        part = wm.explain(model, x, "integrated_gradients", target=2, steps=12, internal_batch_size=size)
        torch.testing.assert_close(part.values, full.values, rtol=1e-12, atol=1e-14)
    via_batch_size = wm.explain(model, x, "integrated_gradients", target=2, steps=12, batch_size=7)
    torch.testing.assert_close(via_batch_size.values, full.values, rtol=1e-12, atol=1e-14)


def test_integrated_gradients_completeness_delta():
    model, x = mlp(), torch.randn(8, 6, dtype=torch.float64)
    imp = wm.explain(model, x, "integrated_gradients", target=1, steps=32)
    with torch.no_grad():
        expected = imp.values.sum(1) - (model(x)[:, 1] - model(torch.zeros_like(x))[:, 1])
    assert np.allclose(imp.extra["delta"], expected.numpy(), atol=1e-12)
    assert imp.extra["max_abs_delta"] < 1e-8  # Gauss-Legendre on a smooth model: nearly exact
    coarse = wm.explain(model, x, "integrated_gradients", target=1, steps=4, rule="riemann_right")
    fine = wm.explain(model, x, "integrated_gradients", target=1, steps=64, rule="riemann_right")
    assert fine.extra["max_abs_delta"] < coarse.extra["max_abs_delta"] / 4


def test_path_points_integrate_exactly():
    for rule in ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right"):
        alphas, weights = path_points(10, rule)
        assert weights.sum() == pytest.approx(1.0) and (alphas >= 0).all() and (alphas <= 1).all()
    alphas, weights = path_points(5, "gausslegendre")  # exact for polynomials of degree <= 9
    assert float((weights * alphas**9).sum()) == pytest.approx(0.1, abs=1e-14)


def noise_draws(x: torch.Tensor, sigma: torch.Tensor, n_samples: int, seed: int) -> list[torch.Tensor]:
    """The documented noise of smoothgrad: draw j is randn(x.shape, generator seeded by seed) * sigma."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g, dtype=x.dtype) * sigma for _ in range(n_samples)]


@pytest.mark.parametrize("base", ["saliency", "gradient", "gradient_x_input"])
def test_smoothgrad_is_captum_attribution_averaged_over_its_noise(case, base):
    """Exact parity on the same noise: the mean of captum's Saliency / InputXGradient over our noisy copies."""
    model, x, target = case
    imp = wm.explain(model, x, "smoothgrad", target=target, base=base, n_samples=6, noise=0.2, seed=3)
    sigma = torch.as_tensor(imp.extra["sigma"], dtype=x.dtype)
    sigma = sigma.view(1, -1) if x.ndim == 2 else sigma.view(-1, 1, 1, 1)
    if base == "gradient_x_input":
        explainer, kwargs = captum_attr.InputXGradient(model), {}
    else:
        explainer, kwargs = captum_attr.Saliency(model), {"abs": base == "saliency"}
    per_draw = [explainer.attribute(x + e, target=target, **kwargs) for e in noise_draws(x, sigma, 6, seed=3)]
    assert_parity(imp.values, torch.stack(per_draw).mean(0))


def test_smoothgrad_agrees_with_noise_tunnel_statistically():
    # captum draws its own noise, so compare means: every value within 5 standard errors of the difference
    # of two independent n_samples-draw averages (sqrt(2) * sd / sqrt(n_samples), sd from our draws).
    model = mlp()
    x = torch.rand(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x[0], x[1] = 0.0, 1.0  # every feature's range is exactly 1, so sigma = noise for all features
    target, n_samples, noise = model(x).argmax(1), 400, 0.3
    imp = wm.explain(model, x, "smoothgrad", target=target, n_samples=n_samples, noise=noise)
    assert np.allclose(imp.extra["sigma"], noise)
    torch.manual_seed(0)
    ref = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
        x.clone(), target=target, nt_type="smoothgrad", nt_samples=n_samples, stdevs=noise
    )
    draws = torch.stack(
        [captum_attr.Saliency(model).attribute(x + e, target=target) for e in noise_draws(x, noise, 100, seed=9)]
    )
    se = np.sqrt(2) * draws.std(0) / np.sqrt(n_samples)
    assert ((imp.values - ref).abs() <= 5 * se + 1e-12).all()


def test_smoothgrad_noise_is_seeded_and_batch_independent():
    model, x = cnn(), torch.rand(3, 3, 16, 16, dtype=torch.float64)
    a = wm.explain(model, x, "smoothgrad", target=0, n_samples=5, seed=1)
    b = wm.explain(model, x, "smoothgrad", target=0, n_samples=5, seed=1, batch_size=2)
    c = wm.explain(model, x, "smoothgrad", target=0, n_samples=5, seed=2)
    torch.testing.assert_close(a.values, b.values, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(a.values, c.values)
    flat = x.flatten(1)
    assert np.allclose(a.extra["sigma"], 0.15 * (flat.amax(1) - flat.amin(1)).numpy())


class Detaching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x.detach())


class ThroughNumpy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(torch.from_numpy(np.tanh(x.detach().numpy())))


class NoGrad(nn.Module):
    def forward(self, x):
        with torch.no_grad():
            return x[:, :2] * 2


@pytest.mark.parametrize("module", [Detaching, ThroughNumpy, NoGrad])
@pytest.mark.parametrize("method", ["saliency", "gradient_x_input", "integrated_gradients", "smoothgrad"])
def test_non_differentiable_model_is_a_clear_error(module, method):
    with pytest.raises(wm.ModelError, match="no gradient with respect to its input"):
        wm.explain(module().eval(), torch.randn(3, 4), method, target=0)


def test_inputs_and_model_are_left_as_they_were():
    model = mlp()
    model[0].weight.requires_grad_(False)
    x = torch.randn(4, 6, dtype=torch.float64)
    before_x, before_w = x.clone(), {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("saliency", "gradient_x_input", "integrated_gradients", "smoothgrad"):
        wm.explain(model, x, method, target=0)
    assert torch.equal(x, before_x) and not x.requires_grad
    assert all(torch.equal(v, before_w[k]) for k, v in model.state_dict().items())
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_results_follow_the_models_dtype_and_work_under_no_grad():
    model = mlp().float()
    x = np.random.default_rng(0).normal(size=(3, 6))  # float64 data for a float32 model
    with torch.no_grad(), torch.inference_mode():
        imp = wm.explain(model, x, "integrated_gradients", target=0, steps=8)
    assert imp.values.dtype == torch.float32 and imp.values.device == next(model.parameters()).device
    ref = captum_attr.IntegratedGradients(model).attribute(torch.as_tensor(x, dtype=torch.float32), target=0, n_steps=8)
    torch.testing.assert_close(imp.values, ref, rtol=1e-4, atol=1e-5)


def test_gradient_methods_need_a_torch_model(cancer):
    X, _, model = cancer
    with pytest.raises(wm.ModelError, match="needs gradients"):
        wm.explain(model, X.iloc[:3], "saliency")


BAD_IG_PARAMS = st.one_of(
    st.tuples(st.sampled_from(["steps", "internal_batch_size"]), st.one_of(st.integers(max_value=0), st.booleans())),
    st.tuples(st.just("steps"), st.text(max_size=3)),
    st.tuples(st.just("rule"), st.text(max_size=12).filter(lambda r: r not in RULES)),
    st.tuples(st.just("baseline"), st.text(max_size=6).filter(lambda b: b not in ("mean", "median", "zero"))),
    st.tuples(st.just("baseline"), st.lists(st.floats(0, 1), min_size=4, max_size=5).map(np.array)),
)
RULES = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")


@settings(max_examples=25, deadline=None)
@given(bad=BAD_IG_PARAMS)
def test_bad_integrated_gradients_parameters_are_refused(bad):
    param, value = bad
    model = nn.Linear(3, 2).eval()
    with pytest.raises((wm.MethodError, wm.InputError), match=param):
        wm.explain(model, torch.randn(2, 3), "integrated_gradients", target=0, **{param: value})


@pytest.mark.parametrize(("param", "value"), [("noise", -0.1), ("n_samples", 0), ("base", "lime")])
def test_bad_smoothgrad_parameters_are_refused(param, value):
    with pytest.raises(wm.MethodError, match=param):
        wm.explain(nn.Linear(3, 2).eval(), torch.randn(2, 3), "smoothgrad", target=0, **{param: value})


@pytest.fixture(scope="module")
def informative_mlp():
    """An MLP trained on make_classification data whose first 3 of 10 features are the informative ones."""
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=1000, n_features=10, n_informative=3, n_redundant=0, shuffle=False, random_state=0
    )
    X = torch.as_tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32)
    y = torch.as_tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    model.eval()
    assert (model(X).argmax(1) == y).float().mean() > 0.9
    return model, X[::5]


@pytest.mark.parametrize("method", ["saliency", "gradient_x_input", "integrated_gradients", "smoothgrad"])
def test_ground_truth_informative_features_come_first(informative_mlp, method):
    # A random scorer reaches precision@3 = 0.3 on average; we ask for all three informative features.
    model, X = informative_mlp
    params = {"n_samples": 10} if method == "smoothgrad" else {}
    agg = wm.explain(model, X, method, **params).values.abs().mean(0)
    top3 = {int(i) for i in agg.argsort(descending=True)[:3]}
    assert len(top3 & {0, 1, 2}) / 3 == 1.0
    assert agg[:3].min() > 2 * agg[3:].max()


def test_a_shared_baseline_gives_the_same_integrated_gradients_and_delta_as_one_per_sample():
    """Both path ends run as the samples plus one baseline row; the same baseline once per sample agrees."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    for target in (None, [0, 1, 2, 0, 1, 2]):
        shared = wm.explain(model, x, "integrated_gradients", target=target, baseline="mean", steps=8)
        each = wm.explain(
            model, x, "integrated_gradients", target=target, baseline=x.mean(0).expand_as(x).clone(), steps=8
        )
        torch.testing.assert_close(shared.values, each.values, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(shared.extra["delta"], each.extra["delta"], atol=1e-12)
        assert shared.target == each.target


@pytest.mark.parametrize(
    ("method", "params"),
    [("deeplift", {}), ("integrated_gradients", {"steps": 6}), ("layer_conductance", {"layer": "1", "steps": 6})],
)
@pytest.mark.parametrize("target", [None, 1])
def test_a_shared_baseline_row_gives_the_same_result_in_batches_of_two(method, params, target):
    """Calls of 2 rows put the shared baseline row in a call of its own (5 samples + 1): same values, targets
    and deltas as one call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3))
    model = model.double().eval()
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    one = wm.explain(model, x, method, target=target, baseline="mean", **params)
    split = wm.explain(model, x, method, target=target, baseline="mean", batch_size=2, **params)
    torch.testing.assert_close(one.values, split.values, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(one.extra["delta"], split.extra["delta"], atol=1e-12)
    assert one.target == split.target
