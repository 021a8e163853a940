"""Robustness metrics: max-sensitivity under input noise and the cascading model-randomization check."""

import math

import numpy as np
import pytest
import torch
from helpers import small_cnn
from sklearn.linear_model import LogisticRegression
from torch import nn

import whatmatters as wm
from whatmatters.core.errors import WhatMattersError
from whatmatters.evaluate import measure, metrics
from whatmatters.evaluate.robustness import cascade_layers, max_sensitivity, randomization


def _mlp(linear: bool = False) -> nn.Module:
    torch.manual_seed(1)
    if linear:
        return nn.Sequential(nn.Linear(6, 3)).eval()
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).eval()


def _tabular(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(2))


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def test_registered():
    assert {"max_sensitivity", "randomization"} <= set(metrics())
    assert "max_sensitivity" in metrics(category="robustness")
    assert "randomization" in metrics(category="randomization")
    assert "max_sensitivity" in metrics(unit="pixel") and "randomization" in metrics(unit="pixel")


def test_max_sensitivity_linear_is_zero_nonlinear_is_not():
    x = _tabular()
    lin = _mlp(linear=True)
    imp = wm.explain(lin, x, method="saliency", target=0)
    res = max_sensitivity(lin, x, imp)
    assert res.scores.shape == (5,)
    assert res.category == "robustness" and not res.higher_is_better
    assert float(res.scores.abs().max()) < 1e-6  # gradient of a linear model does not depend on x

    net = _mlp()
    imp2 = wm.explain(net, x, method="saliency", target=0)
    res2 = max_sensitivity(net, x, imp2, radius=0.1)
    assert bool((res2.scores > 1e-4).all())
    # more noise, larger change
    res3 = max_sensitivity(net, x, imp2, radius=0.3)
    assert res3.value > res2.value


def test_max_sensitivity_matches_manual_computation():
    """Same seeded noise, explained one perturbation at a time, gives the same score."""
    x = _tabular(3)
    net = _mlp()
    imp = wm.explain(net, x, method="gradient_x_input", target=1)
    res = max_sensitivity(net, x, imp, n_samples=4, radius=0.05, seed=7)
    gen = torch.Generator().manual_seed(7)
    scale = 0.05 * float(x.max() - x.min())
    noise = (torch.rand((12, 6), generator=gen, dtype=torch.float64) * 2 - 1) * scale
    expected = []
    for i in range(3):
        e = imp.values[i].double()
        worst = 0.0
        for j in range(4):
            xp = (x[i] + noise[4 * i + j].float()).unsqueeze(0)
            xp.requires_grad_(True)
            net(xp)[0, 1].backward()
            ep = (xp.grad[0] * xp[0]).detach().double()
            worst = max(worst, float((ep - e).norm() / e.norm()))
        expected.append(worst)
    np.testing.assert_allclose(res.scores.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_max_sensitivity_images_and_method_params():
    x = _images(2)
    cnn = small_cnn()
    imp = wm.explain(cnn, x, method="smoothgrad", n_samples=4)
    res = measure(cnn, x, imp, "max_sensitivity", n_samples=3)
    assert res.scores.shape == (2,) and bool(torch.isfinite(res.scores).all())
    assert res.params["n_samples"] == 3 and res.params["radius"] == 0.02


def test_randomization_drops_and_leaves_model_unchanged():
    x = _images(3)
    cnn = small_cnn()
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    imp = wm.explain(cnn, x, method="saliency")
    res = randomization(cnn, x, imp)
    assert res.category == "randomization" and not res.higher_is_better
    assert res.scores.shape == (3,)
    assert res.value < 0.5  # saliency of a fully random CNN is unrelated to the trained one's
    steps, curve = res.curves["cascade"]
    layers = cascade_layers(cnn)
    assert layers == ["6", "2", "0"]
    assert steps.tolist() == [1.0, 2.0, 3.0] and curve.shape == (3, 3)
    torch.testing.assert_close(curve[:, -1], res.scores)
    assert cnn.training is False
    for k, v in cnn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_randomization_deterministic_and_seeded():
    x = _tabular(4)
    net = _mlp()
    imp = wm.explain(net, x, method="saliency", target=0)
    a = randomization(net, x, imp, seed=3)
    b = randomization(net, x, imp, seed=3)
    torch.testing.assert_close(a.scores, b.scores)


def test_bad_input():
    x = _tabular(20).numpy()
    y = (x[:, 0] > 0).astype(int)
    clf = LogisticRegression().fit(x, y)
    imp = wm.Importance(torch.ones(3, 6), unit="feature", per_sample=True, method="occlusion")
    with pytest.raises(WhatMattersError, match="PyTorch"):
        randomization(clf, x[:3], imp)
    net = _mlp()
    t = torch.as_tensor(x[:3])
    no_method = wm.Importance(torch.ones(3, 6), unit="feature", per_sample=True)
    with pytest.raises(WhatMattersError, match="no method"):
        max_sensitivity(net, t, no_method)
    imp = wm.explain(net, t, method="saliency")
    with pytest.raises(WhatMattersError, match="radius"):
        max_sensitivity(net, t, imp, radius=-1.0)
    with pytest.raises(WhatMattersError, match="n_samples"):
        max_sensitivity(net, t, imp, n_samples=0)
    with pytest.raises(WhatMattersError, match="aggregated"):
        max_sensitivity(net, t, imp.aggregate())
    zero = wm.Importance(torch.zeros(3, 6), unit="feature", per_sample=True, method="saliency")
    assert math.isnan(max_sensitivity(net, t, zero).value)


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    from whatmatters.evaluate.robustness import _spearman_abs

    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    b = a + 0.7 * torch.randn(6, 40, generator=gen, dtype=torch.float64)
    a[:, :10] = 0.0  # ties
    ours = _spearman_abs(a, b)
    ref = [spearmanr(a[i].abs().numpy(), b[i].abs().numpy()).statistic for i in range(6)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)
    assert math.isnan(float(_spearman_abs(torch.ones(1, 5, dtype=torch.float64), b[:1, :5])[0]))


def test_gradient_x_input_stays_closer_to_input_than_saliency():
    """Adebayo et al.: gradient x input keeps the input's structure after randomization, saliency does not."""
    x = _images(3)
    cnn = small_cnn()
    sal = randomization(cnn, x, wm.explain(cnn, x, method="saliency"))
    gxi = randomization(cnn, x, wm.explain(cnn, x, method="gradient_x_input"))
    assert gxi.value > sal.value + 0.2


def test_max_sensitivity_model_agnostic_on_sklearn():
    x = _tabular(30).numpy().astype(np.float64)
    y = (x[:, 0] + x[:, 1] ** 2 > 0.5).astype(int)
    clf = LogisticRegression().fit(x, y)
    imp = wm.explain(clf, x[:4], method="ablation")
    res = max_sensitivity(clf, x[:4], imp, n_samples=5)
    assert res.scores.shape == (4,) and bool(torch.isfinite(res.scores).all())
    assert bool((res.scores > 0).all())  # predicted probabilities are nonlinear in x


def test_in_benchmark_reference_is_nan():
    from whatmatters.evaluate import benchmark

    x = _images(2)
    cnn = small_cnn()
    res = benchmark(cnn, x, ["saliency"], metrics=["max_sensitivity", "randomization"], progress=False)
    assert res.table["error"].isna().all()
    assert np.isfinite(res.table.loc["saliency", ["max_sensitivity", "randomization"]].astype(float)).all()
    assert res.table.loc["random", ["max_sensitivity", "randomization"]].isna().all()
    assert "cascade" in res.curves["saliency"]
