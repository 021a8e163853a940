"""Concept bottlenecks on the shapes set, whose concepts the generator knows (shape, size, colour).

Features: the cached shapes CNN's pooled layer (``load_or_train("cnn")``, trained once per machine). The class is
the shape, so the heads should read the shape concepts and ignore size and colour; flipping an image's shape
concepts must move the prediction to the new shape, flipping an irrelevant concept must hardly move it.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import whatmatters as wm
from whatmatters.core.errors import InputError, MethodError
from whatmatters.explain.bottleneck import concept_bank, embeddings, fit_cbm, fit_linear_head, fit_pcbm
from whatmatters.vision.nets import load_or_train
from whatmatters.vision.shape_concepts import CONCEPTS, shape_concepts
from whatmatters.vision.shapes import make_shapes

TRAIN = 800


@pytest.fixture(scope="module")
def shapes_features():
    net, _ = load_or_train("cnn")
    x, y, m = make_shapes(1200, 32, seed=5)
    return net, x, embeddings(net, x, "pool"), y, shape_concepts(x, y, m)


@pytest.fixture(scope="module")
def pcbm(shapes_features):
    _, _, f, y, c = shapes_features
    return fit_pcbm(f[:TRAIN], y[:TRAIN], concepts=c[:TRAIN], concept_names=CONCEPTS)


def accuracy(model, f, y):
    return float((model(f).argmax(1) == y).float().mean())


@pytest.mark.parametrize("kind", ["joint", "sequential", "pcbm", "pcbm_h"])
def test_bottleneck_is_as_accurate_and_interventions_move_the_prediction(shapes_features, pcbm, kind):
    _, _, f, y, c = shapes_features
    tr, te = slice(0, TRAIN), slice(TRAIN, None)
    if kind == "pcbm":
        model = pcbm
    elif kind == "pcbm_h":
        model = fit_pcbm(f[tr], y[tr], concepts=c[tr], concept_names=CONCEPTS, residual=True)
    else:
        model = fit_cbm(f[tr], c[tr], y[tr], concept_names=CONCEPTS, mode=kind, epochs=200)
        predicted = (model.concept_scores(f[te]) > 0.5).float()
        assert bool(((predicted == c[te]).float().mean(0)[:4] > 0.9).all())  # the shape concepts are predicted
    black_box = fit_linear_head(f[tr], y[tr], epochs=200)
    assert accuracy(model, f[te], y[te]) > accuracy(black_box, f[te], y[te]) - 0.05 > 0.85
    circles = f[te][y[te] == 0]
    before_logits, after = model(circles), model.intervene(circles, {"circle": 0, "square": 1})
    margin = lambda out: out[:, 1] - out[:, 0]  # noqa: E731  (square vs circle)
    assert bool((margin(after) > margin(before_logits)).all())  # every circle moves towards the square
    if kind != "pcbm_h":  # (PCBM-h's residual head reads the shape from the features too: it resists)
        assert float((after.argmax(1) == 1).float().mean()) > 0.8
    before = before_logits.argmax(1)
    recoloured = model.intervene(circles, {"red": 1 - c[te][y[te] == 0][:, 5]}).argmax(1)
    assert float((recoloured != before).float().mean()) < 0.2  # colour does not decide the shape


def test_concept_importance_is_an_importance_that_sums_to_the_logit(shapes_features, pcbm):
    _, _, f, y, _ = shapes_features
    model = pcbm
    imp = wm.explain(model, f[TRAIN:], "concept_bottleneck", target=y[TRAIN:])
    assert imp.unit == "concept" and imp.names == CONCEPTS and imp.values.shape == (len(f) - TRAIN, 6)
    logit = model(f[TRAIN:]).gather(1, y[TRAIN:, None])[:, 0]
    torch.testing.assert_close(imp.values.sum(1) + imp.extra["bias"], logit, atol=1e-4, rtol=1e-4)
    mean = imp.values.abs().mean(0)
    assert mean[:4].min() > mean[4:].max()  # the shape concepts matter most


def test_pcbm_from_a_tcav_style_concept_bank(shapes_features):
    net, x, f, y, c = shapes_features
    examples = {name: x[c[:, j] == 1][:40] for j, name in enumerate(CONCEPTS[:4])}
    bank, names = concept_bank(net, "pool", examples, random=x[TRAIN - 200 : TRAIN])
    assert bank.shape == (4, 64) and names == list(CONCEPTS[:4])
    model = fit_pcbm(f[:TRAIN], y[:TRAIN], bank=bank, concept_names=names)
    assert accuracy(model, f[TRAIN:], y[TRAIN:]) > 0.85


def test_bad_input(shapes_features):
    _, _, f, y, c = shapes_features
    with pytest.raises(InputError, match="binary"):
        fit_cbm(f[:50], c[:50] * 0.5, y[:50])
    with pytest.raises(InputError, match="one row per sample"):
        fit_cbm(f[:50], c[:40], y[:50])
    with pytest.raises(MethodError, match="mode"):
        fit_cbm(f[:50], c[:50], y[:50], mode="both")
    with pytest.raises(InputError, match=r"either concepts= .* or bank="):
        fit_pcbm(f[:50], y[:50])
    with pytest.raises(InputError, match="at least 2 samples with it"):
        fit_pcbm(f[:50], y[:50], concepts=torch.cat([c[:50, :4], torch.zeros(50, 1)], 1))
    with pytest.raises(InputError, match="2 classes"):
        fit_linear_head(f[:50], torch.zeros(50, dtype=torch.long))
    model = fit_cbm(f[:100], c[:100], y[:100], concept_names=CONCEPTS, epochs=5)
    with pytest.raises(InputError, match="unknown concept"):
        model.intervene(f[:5], {"stripes": 1})
    with pytest.raises(MethodError, match="Bottleneck"):
        wm.explain(torch.nn.Linear(64, 4).eval(), f[:5], "concept_bottleneck")


@settings(max_examples=20, deadline=None)
@given(n=st.integers(0, 6), k=st.integers(1, 4), value=st.sampled_from([0.0, 1.0, 2.0, -1.0, float("nan")]))
def test_concept_labels_are_binary_or_refused(n, k, value):
    f = torch.randn(8, 5)
    y = torch.arange(8) % 2
    concepts = torch.ones(8, k)
    concepts[:n] = 0
    concepts[-1, 0] = value
    try:
        model = fit_cbm(f, concepts, y, epochs=2)
    except InputError as err:
        assert "binary" in str(err) or "NaN" in str(err)
        assert value not in (0.0, 1.0)
        return
    assert value in (0.0, 1.0) and bool(torch.isfinite(model(f)).all())
