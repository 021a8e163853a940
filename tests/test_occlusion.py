"""Occlusion: captum parity, an analytic ground truth, batching, baselines and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import whatmatters as wm
from whatmatters.core.errors import MethodError
from whatmatters.explain.occlusion import gaussian_blur, window_masks


class SmallCNN(nn.Module):
    def __init__(self, c: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return 100 * self.head(self.body(x).mean((2, 3)))


class Linear(nn.Module):
    """f(x) = sum of w * x: occluding with zeros removes exactly the hidden pixels' terms."""

    def __init__(self, shape):
        super().__init__()
        torch.manual_seed(1)
        self.w = nn.Parameter(torch.randn(2, *shape))
        self.eval()

    def forward(self, x):
        return torch.einsum("nchw,kchw->nk", x, self.w)


@pytest.mark.parametrize(
    ("window", "stride", "baseline"),
    [(8, 8, 0.0), (5, 3, 0.0), (4, 2, 0.5), ((6, 3), (4, 2), 0.0), (20, 20, 0.0), (1, 1, 0.2)],
)
def test_parity_with_captum(window, stride, baseline):
    captum = pytest.importorskip("captum.attr")
    model = SmallCNN().eval()
    x = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    imp = wm.explain(model, x, "occlusion", target=[0, 1, 2], window=window, stride=stride, baseline=baseline)
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ref = captum.Occlusion(model).attribute(
        x, sliding_window_shapes=(3, wh, ww), strides=(3, sh, sw), target=[0, 1, 2], baselines=baseline
    )
    assert imp.values.shape == (3, 20, 20) and imp.unit == "pixel"
    scale = float(ref.abs().max())
    assert scale > 1e-2  # the check is not vacuous
    torch.testing.assert_close(imp.values * 3, ref.sum(1), atol=1e-5 * max(1.0, scale), rtol=1e-5)


def test_linear_model_ground_truth():
    """Window 1: each pixel's score is its exact contribution sum_c w_c x_c (zero baseline)."""
    model = Linear((3, 6, 5))
    x = torch.randn(4, 3, 6, 5, dtype=torch.float64)
    imp = wm.explain(model.double(), x, "occlusion", target=1, window=1, stride=1)
    torch.testing.assert_close(imp.values, (model.w[1].detach() * x).sum(1))
    # a window of the whole image: every pixel gets f(x) - f(0)
    imp = wm.explain(model, x, "occlusion", target=1, window=(6, 5))
    torch.testing.assert_close(imp.values, (model.w[1].detach() * x).sum((1, 2, 3))[:, None, None].expand(4, 6, 5))


def test_overlapping_windows_average_linear_contributions():
    """With overlapping windows a pixel's score is the mean of the contributions of the windows over it."""
    model = Linear((1, 7, 7)).double()
    x = torch.randn(2, 1, 7, 7, dtype=torch.float64)
    imp = wm.explain(model, x, "occlusion", target=0, window=3, stride=2)
    contrib = model.w[0, 0].detach() * x[:, 0]  # (n, 7, 7)
    masks = window_masks((7, 7), (3, 3), (2, 2)).double()
    per_window = torch.einsum("nhw,mhw->nm", contrib, masks)
    expected = torch.einsum("nm,mhw->nhw", per_window, masks) / masks.sum(0)
    torch.testing.assert_close(imp.values, expected)


def test_window_masks_cover_every_pixel_like_captum():
    masks = window_masks((10, 9), (4, 3), (3, 3))
    assert masks.shape == (3 * 3, 10, 9)  # ceil((10-4)/3)+1 = 3, ceil((9-3)/3)+1 = 3
    assert bool((masks.sum(0) >= 1).all())
    assert int(masks[-1].sum()) == 4 * 3  # last window exactly reaches the border here


def test_all_windows_batched_into_few_calls():
    calls = []

    class Counting(SmallCNN):
        def forward(self, x):
            calls.append(len(x))
            return super().forward(x)

    model = Counting().eval()
    x = torch.rand(4, 3, 16, 16)
    imp = wm.explain(model, x, "occlusion", target=0, window=4, stride=2, batch_size=512)
    windows = imp.extra["windows"]
    assert windows == 7 * 7
    rows = sum(calls[1:])  # the first call probes the number of outputs
    assert rows <= 4 * (windows + 1) + 4 and len(calls) <= 4


def test_baselines():
    model = SmallCNN().eval()
    flat = torch.full((2, 3, 12, 12), 0.3)
    for baseline in ("blur", "mean", 0.3, torch.full((3, 1, 1), 0.3)):
        imp = wm.explain(model, flat, "occlusion", target=0, window=4, baseline=baseline)
        assert float(imp.values.abs().max()) < 1e-5, baseline  # hiding a flat image with its own colour: no change
    x = torch.rand(2, 3, 12, 12)
    per_sample = wm.explain(model, x, "occlusion", target=0, window=4, baseline=torch.zeros(2, 3, 12, 12))
    zero = wm.explain(model, x, "occlusion", target=0, window=4, baseline="zero")
    torch.testing.assert_close(per_sample.values, zero.values)
    blurred = gaussian_blur(x, 2.0)
    assert blurred.shape == x.shape and float(blurred.std()) < float(x.std())


def test_default_window_and_stride():
    imp = wm.explain(SmallCNN().eval(), torch.rand(1, 3, 32, 32), "occlusion", target=0)
    assert imp.extra["window"] == [4, 4] and imp.extra["stride"] == [2, 2]


def test_grayscale_inputs_without_channel_axis():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    imp = wm.explain(model, torch.rand(2, 8, 8), "occlusion", target=0, window=2)
    assert imp.values.shape == (2, 8, 8)


def test_bad_input():
    model = SmallCNN().eval()
    x = torch.rand(1, 3, 12, 12)
    with pytest.raises(MethodError, match="stride"):
        wm.explain(model, x, "occlusion", window=2, stride=3)
    with pytest.raises(MethodError, match="larger than the image"):
        wm.explain(model, x, "occlusion", window=13)
    with pytest.raises(MethodError, match="baseline"):
        wm.explain(model, x, "occlusion", baseline="noise")
    with pytest.raises(MethodError, match="baseline"):
        wm.explain(model, x, "occlusion", baseline=torch.zeros(2, 3, 12, 12))
    with pytest.raises(MethodError, match="window"):
        wm.explain(model, x, "occlusion", window=(2, 0))
    with pytest.raises(MethodError):
        wm.explain(nn.Linear(5, 2).eval(), torch.rand(3, 5), "occlusion")  # tabular data: not pixels
