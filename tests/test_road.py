"""ROAD (remove and debias): noisy linear imputation and the MoRF / LeRF curves, against Quantus goldens."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import benchmark_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import whatmatters as wm
from whatmatters.core.errors import InputError
from whatmatters.evaluate import measure, metrics
from whatmatters.evaluate.road import noisy_linear_imputation, road_lerf, road_morf

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "fixtures" / "road" / "quantus_road.npz"


def _golden_model(g: np.lib.npyio.NpzFile) -> nn.Module:
    """The goldens' CNN (architecture from the script that made them) with the stored weights."""
    model = benchmark_script("make_road_goldens").fixture_cnn()
    model.load_state_dict({k[2:]: torch.from_numpy(g[k]) for k in g.files if k.startswith("w_")})
    return model.eval()


def _patch_model() -> nn.Module:
    """Class 0's logit is the mean of a 4 x 4 patch of channel 0 minus 0.5; class 1's is 0."""
    conv = nn.Conv2d(3, 1, 4, stride=4, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1 / 16
    head = nn.Linear(16, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 5] = 1.0  # patch rows 4..7, columns 4..7
        head.bias.copy_(torch.tensor([-0.5, 0.0]))
    return nn.Sequential(conv, nn.Flatten(), head).eval()


def _patch_data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.2
    x[:, 0, 4:8, 4:8] = 1.0
    truth = torch.zeros(n, 16, 16)
    truth[:, 4:8, 4:8] = 1.0
    return x, truth + 0.01 * torch.rand(n, 16, 16, generator=g)


def test_registered():
    assert {"road_morf", "road_lerf"} <= set(metrics(unit="pixel", category="faithfulness"))
    assert "road_morf" not in metrics(unit="feature")


def test_imputation_matches_quantus():
    g = np.load(GOLDEN)
    ours = noisy_linear_imputation(g["x"].astype(np.float64), g["removed"], noise=0.0)
    np.testing.assert_allclose(ours, g["imputed"], rtol=0, atol=1e-12)
    kept = ~g["removed"][:, None]
    assert np.array_equal(
        ours[np.broadcast_to(kept, ours.shape)], g["x"].astype(np.float64)[np.broadcast_to(kept, ours.shape)]
    )


def test_morf_curve_matches_quantus():
    g = np.load(GOLDEN)
    model = _golden_model(g)
    x, y = torch.from_numpy(g["x"]), torch.from_numpy(g["y"])
    imp = wm.Importance(torch.from_numpy(g["a"][:, 0]), unit="pixel")
    res = road_morf(model, x, imp, y=y, noise=0.0, fractions=g["percentages"] / 100)
    fractions, curve = res.curves["morf"]
    np.testing.assert_allclose(fractions.numpy(), g["percentages"] / 100)
    np.testing.assert_array_equal(curve.mean(0).numpy(), g["curve"])  # accuracies: exact
    assert len(np.unique(g["curve"])) > 2  # the golden curve is not flat


def test_linear_image_is_reconstructed_exactly():
    """Inside the frame, the symmetric neighbour mean of a linear ramp is the ramp itself."""
    ii, jj = torch.meshgrid(
        torch.arange(12.0, dtype=torch.float64), torch.arange(12.0, dtype=torch.float64), indexing="ij"
    )
    img = torch.stack([0.3 * ii - 0.7 * jj + 2, ii + jj]).unsqueeze(0)
    removed = torch.zeros(1, 12, 12, dtype=torch.bool)
    removed[0, 2:9, 3:10] = True  # a large hole away from the border
    removed[0, 10, 1:11] = True
    out = noisy_linear_imputation(img, removed, noise=0.0)
    np.testing.assert_allclose(out, img.numpy(), atol=1e-10)
    assert torch.equal(img[0, 0, 2, 3], torch.tensor(0.3 * 2 - 0.7 * 3 + 2, dtype=torch.float64))  # input unchanged


def test_noise_std_and_seed():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    removed = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(2)) < 0.5
    clean = noisy_linear_imputation(x, removed, noise=0.0)
    a = noisy_linear_imputation(x, removed, noise=0.05, generator=torch.Generator().manual_seed(3))
    b = noisy_linear_imputation(x, removed, noise=0.05, generator=torch.Generator().manual_seed(3))
    c = noisy_linear_imputation(x, removed, noise=0.05, generator=torch.Generator().manual_seed(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    diff = (a - clean)[np.broadcast_to(removed.numpy()[:, None], a.shape)]
    assert abs(diff.std() - 0.05) < 0.005 and abs(diff.mean()) < 0.005
    assert np.array_equal(
        (a - clean)[np.broadcast_to(~removed.numpy()[:, None], a.shape)], np.zeros((~removed).sum().item() * 3)
    )


def test_faithful_map_beats_random_and_inverse():
    model, (x, truth) = _patch_model(), _patch_data()
    good = wm.Importance(truth, unit="pixel")
    bad = wm.Importance(-truth, unit="pixel")
    kwargs = dict(target=0, output="probability", fractions=[0.05, 0.1, 0.3, 0.5])
    m_good, m_bad = road_morf(model, x, good, **kwargs), road_morf(model, x, bad, **kwargs)
    l_good, l_bad = road_lerf(model, x, good, **kwargs), road_lerf(model, x, bad, **kwargs)
    assert m_good.value < m_bad.value - 0.05 and l_good.value > l_bad.value + 0.05
    assert not m_good.higher_is_better and l_good.higher_is_better
    assert m_good.scores.shape == (6,) and m_good.curves["morf"][1].shape == (6, 4)
    # the patch (6 % of the pixels) is gone at 10 %: its probability falls to the background's
    assert bool((m_good.curves["morf"][1][:, 1] < m_good.curves["morf"][1][:, 0]).all())


def test_accuracy_uses_labels_and_channel_sum():
    model, (x, truth) = _patch_model(), _patch_data()
    per_element = wm.Importance(truth.unsqueeze(1).expand(-1, 3, -1, -1) / 3, unit="pixel")
    pixel = wm.Importance(truth, unit="pixel")
    a = road_morf(model, x, per_element, y=torch.zeros(6, dtype=torch.long), fractions=[0.1, 0.5])
    b = road_morf(model, x, pixel, y=torch.zeros(6, dtype=torch.long), fractions=[0.1, 0.5])
    assert torch.equal(a.scores, b.scores)
    assert set(a.curves["morf"][1].unique().tolist()) <= {0.0, 1.0}
    wrong = road_morf(model, x, pixel, y=torch.ones(6, dtype=torch.long), fractions=[0.1, 0.5])
    assert torch.allclose(wrong.scores + a.scores, torch.ones(6, dtype=torch.float64))  # two classes


def test_model_and_data_unchanged():
    model, (x, truth) = _patch_model(), _patch_data()
    before_x, before_w = x.clone(), [p.clone() for p in model.parameters()]
    measure(model, x, wm.Importance(truth, unit="pixel"), "road_lerf", fractions=[0.2])
    assert torch.equal(x, before_x) and all(torch.equal(p, q) for p, q in zip(model.parameters(), before_w))
    assert not model.training and not model._forward_hooks


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(float("nan"))))
def test_bad_fractions(bad):
    model, (x, truth) = _patch_model(), _patch_data(2)
    with pytest.raises(InputError, match="fractions"):
        road_morf(model, x, wm.Importance(truth, unit="pixel"), fractions=[0.2, bad])


def test_bad_inputs():
    model, (x, truth) = _patch_model(), _patch_data(2)
    imp = wm.Importance(truth, unit="pixel")
    with pytest.raises(InputError):
        road_morf(model, x, wm.Importance(truth[:, :8], unit="pixel"))  # wrong unit shape
    nan = truth.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        road_morf(model, x, wm.Importance(nan, unit="pixel"))
    with pytest.raises(InputError, match="fractions"):
        road_morf(model, x, imp, fractions=[])
    with pytest.raises(InputError, match="noise"):
        road_morf(model, x, imp, noise=-0.1)
    with pytest.raises(InputError, match="output"):
        road_lerf(model, x, imp, output="auc")
    with pytest.raises(InputError, match="labels"):
        road_morf(model, x, imp, y=torch.zeros(3, dtype=torch.long))
    with pytest.raises(InputError, match="nothing to impute"):
        noisy_linear_imputation(torch.zeros(1, 1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool))
