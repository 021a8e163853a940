"""gradient_noise: stability of a map when the back-propagated gradient is noisy."""

import math

import pytest
import torch
from helpers import small_cnn
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from torch import nn

import whatmatters as wm
from whatmatters.core.errors import InputError, ModelError
from whatmatters.evaluate import measure, metrics, robustness
from whatmatters.evaluate.robustness import gradient_noise

torch.set_num_threads(1)


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(3))


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def test_registered():
    assert "gradient_noise" in metrics(unit="pixel", category="robustness")


@pytest.mark.parametrize("method", ["grad_cam", "saliency", "integrated_gradients"])
def test_zero_noise_gives_exactly_zero(method):
    model, x = small_cnn(width=8), _images()
    imp = wm.explain(model, x, method=method, target=1)
    for distance in ("relative_l2", "spearman"):
        res = gradient_noise(model, x, imp, sigma=0.0, n_repeats=2, distance=distance)
        assert torch.equal(res.scores, torch.zeros(4, dtype=torch.float64)), (method, distance)
    assert _no_hooks(model)


@pytest.mark.parametrize("method", ["grad_cam", "layer_cam", "saliency"])
def test_more_noise_more_change(method):
    model, x = small_cnn(width=8), _images()
    imp = wm.explain(model, x, method=method, target=1)
    values = [gradient_noise(model, x, imp, sigma=s, n_repeats=3).value for s in (0.05, 0.3, 2.0)]
    assert 0 < values[0] < values[1] < values[2], values


def test_linear_model_matches_the_noise_drawn():
    """Saliency (signed) of a linear model: the noisy map is g + sigma std(g) eps, replayed with the same seed."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    imp = wm.explain(model, x, method="saliency", target=0, abs=False)
    res = gradient_noise(model, x, imp, sigma=0.5, n_repeats=2, seed=11)
    g = model[1].weight[0].detach().expand(3, -1)
    gen = torch.Generator().manual_seed(11)
    expected = []
    for _ in range(2):
        eps = torch.randn(g.shape, generator=gen)
        noisy = g + 0.5 * g.std(1, correction=0, keepdim=True) * eps
        expected.append(((noisy - g).norm(dim=1) / g.norm(dim=1)).double())
    torch.testing.assert_close(res.curves["repeats"][1], torch.stack(expected, 1), rtol=1e-5, atol=1e-7)


def test_gradient_free_methods_are_not_applicable():
    model, x = small_cnn(width=8), _images(2)
    for method in ("score_cam", "eigen_cam"):
        imp = wm.explain(model, x, method=method, target=1)
        assert all(math.isnan(v) for v in gradient_noise(model, x, imp, sigma=1.0, n_repeats=1).scores.tolist())
    imp = wm.explain(model, x, method="occlusion", target=1, window=4)
    assert math.isnan(gradient_noise(model, x, imp, n_repeats=1).value)
    assert _no_hooks(model)


def test_cf_cam_and_layer_injection():
    model, x = small_cnn(width=8), _images(3)
    imp = wm.explain(model, x, method="cf_cam", target=1, layer="2")
    res = gradient_noise(model, x, imp, sigma=5.0, n_repeats=2)
    assert res.value > 0 and not math.isnan(res.value)
    imp = wm.explain(model, x, method="grad_cam", target=1, layer="2")
    # a CAM's backward pass stops at its layer: no gradient reaches the input, so at="input" does not apply
    assert math.isnan(gradient_noise(model, x, imp, sigma=1.0, n_repeats=2, at="input").value)
    with pytest.raises(InputError, match="layer"):
        gradient_noise(model, x, wm.explain(model, x, method="saliency"), at="layer")


def test_hooks_removed_and_model_unchanged_on_error(monkeypatch):
    model, x = small_cnn(width=8), _images(2)
    imp = wm.explain(model, x, method="grad_cam", target=1)
    before = [p.clone() for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]

    def boom(self, grad):
        raise RuntimeError("boom")

    monkeypatch.setattr(robustness.GradientNoise, "__call__", boom)
    with pytest.raises(RuntimeError, match="boom"):
        gradient_noise(model, x, imp, sigma=0.5, n_repeats=1)
    assert _no_hooks(model) and not model.training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_random_reference_and_bad_input():
    model, x = small_cnn(width=8), _images(2)
    imp = wm.explain(model, x, method="saliency")
    from whatmatters.evaluate.benchmark import REFERENCE

    ref = wm.Importance(torch.rand(2, 12, 12), unit="pixel", method=REFERENCE)
    assert math.isnan(measure(model, x, ref, "gradient_noise").value)
    with pytest.raises(InputError, match="at must"):
        gradient_noise(model, x, imp, at="logits")
    with pytest.raises(InputError, match="distance"):
        gradient_noise(model, x, imp, distance="ssim")
    with pytest.raises(InputError, match="n_repeats"):
        gradient_noise(model, x, imp, n_repeats=0)
    clf = LogisticRegression().fit(torch.randn(20, 4).numpy(), [0, 1] * 10)
    tab = torch.randn(3, 4)
    with pytest.raises(ModelError, match=r"nn\.Module"):
        gradient_noise(clf, tab, wm.explain(clf, tab, method="ablation"))


@settings(max_examples=10, deadline=None)
@given(sigma=st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")), st.just(float("inf"))))
def test_bad_sigma(sigma):
    model, x = small_cnn(width=8), _images(1)
    imp = wm.Importance(torch.rand(1, 12, 12), unit="pixel", method="saliency")
    with pytest.raises(InputError, match="sigma"):
        gradient_noise(model, x, imp, sigma=sigma)


def test_vit_token_layer():
    """The noise reaches a ViT's token layer (the CAM lays tokens out on the patch grid); zero maps give NaN."""
    from whatmatters.vision.nets import ShapesViT

    torch.manual_seed(0)
    vit = ShapesViT().eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    imp = wm.explain(vit, x, method="grad_cam")
    nonzero = imp.values.flatten(1).norm(dim=1) > 0
    assert nonzero.any()
    res = gradient_noise(vit, x, imp, sigma=0.5, n_repeats=1)
    assert bool((res.scores[nonzero] > 0).all()) and bool(res.scores[~nonzero].isnan().all())
    assert _no_hooks(vit)
