"""TCAV on the synthetic shapes: a concept the model uses is significant, one it cannot see is not; bad input.

The model is a tiny CNN trained here for a few seconds to tell crosses from circles. Its first module averages
the colour channels, so a colour change that keeps each pixel's channel mean (red up, green down, on the
background) is invisible to it by construction: the "red background" concept set has exactly the activations
of ordinary shapes images, i.e. it is a random set, and must not come out significant. The "cross" concept
(crosses from another draw of the generator) is what the model decides by, and must.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import whatmatters as wm
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.vision.shapes import make_shapes


class ChannelMean(nn.Module):
    def forward(self, x):
        return x.mean(1, keepdim=True)


@pytest.fixture(scope="module")
def shapes_model():
    torch.manual_seed(0)
    x, y, _ = make_shapes(600, 16, seed=0, strokes=0, blobs=0)
    keep = (y == 0) | (y == 3)
    x, y = x[keep], (y[keep] == 3).long()  # 1: cross, 0: circle
    model = nn.Sequential(
        ChannelMean(), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(25):
        for b in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def concepts():
    xc, yc, mc = make_shapes(400, 16, seed=2, strokes=0, blobs=0)
    base, background = xc[:50], ~mc[:50, None]
    shift = torch.tensor([0.15, -0.15, 0.0]).view(1, 3, 1, 1)  # channel mean unchanged
    tinted = base + shift * background
    assert torch.allclose(tinted.mean(1), base.mean(1), atol=1e-6)
    return {"cross": xc[yc == 3][:50], "red_background": tinted}


def test_used_concept_is_significant_and_invisible_one_is_not(shapes_model):
    xt, yt, _ = make_shapes(400, 16, seed=1, strokes=0, blobs=0)
    crosses = xt[yt == 3][:40]
    assert (shapes_model(crosses).argmax(1) == 1).float().mean() > 0.6  # the model does tell crosses
    pool = make_shapes(400, 16, seed=3, strokes=0, blobs=0)[0]
    imp = wm.explain(shapes_model, crosses, "tcav", target=1, concepts=concepts(), layers=["9", "11"], random=pool)
    assert imp.unit == "concept" and not imp.per_sample
    assert list(imp.names) == ["cross@9", "cross@11", "red_background@9", "red_background@11"]
    p = dict(zip(imp.names, imp.extra["p_values"]))
    score = dict(zip(imp.names, imp.values.tolist()))
    null = imp.extra["random_scores"].mean(1)
    for j, layer in enumerate(["9", "11"]):
        assert p[f"cross@{layer}"] < 0.05 and score[f"cross@{layer}"] > null[j], layer
        assert p[f"red_background@{layer}"] > 0.05, layer
    assert imp.extra["significant"] == [True, True, False, False]


def test_bad_concepts_and_layers(shapes_model):
    x = make_shapes(8, 16, seed=4)[0]
    good = {"a": x[:4]}
    with pytest.raises(InputError, match="at least 2"):
        wm.explain(shapes_model, x, "tcav", concepts={"one": x[:1]}, layers="9")
    with pytest.raises(InputError, match="shaped like the data"):
        wm.explain(shapes_model, x, "tcav", concepts={"small": x[:3, :, :8, :8]}, layers="9")
    with pytest.raises(InputError, match="dict"):
        wm.explain(shapes_model, x, "tcav", concepts=x, layers="9")
    with pytest.raises(MethodError, match="layers="):
        wm.explain(shapes_model, x, "tcav", concepts=good)
    with pytest.raises(ModelError, match="no layer named"):
        wm.explain(shapes_model, x, "tcav", concepts=good, layers=["99"])
    with pytest.raises(MethodError, match="n_random"):
        wm.explain(shapes_model, x, "tcav", concepts=good, layers="9", n_random=1)
    for bad in (torch.zeros(4), [9], {"9": 1}):  # not names: a clear error, not torch's truth-value error
        with pytest.raises(MethodError, match="layers"):
            wm.explain(shapes_model, x, "tcav", concepts=good, layers=bad)
    with pytest.raises(MethodError, match="set_size"):
        wm.explain(shapes_model, x, "tcav", concepts=good, layers="9", set_size="x")


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 1))
def test_concept_sets_below_two_examples_are_refused(n):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    x = torch.randn(6, 4)
    with pytest.raises(InputError):
        wm.explain(model, x, "tcav", concepts={"c": torch.randn(n, 4)}, layers="1")
