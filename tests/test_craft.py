"""CRAFT on a real model: a small CNN trained here (a few seconds) on Fashion-MNIST sneakers and the rest.

Ground truth for the importance: removing the concepts CRAFT ranks first lowers the class score more than
removing random ones (deletion curve). The pieces are checked against references: the torch NMF against
scikit-learn's (reconstruction error), the projection against scipy's exact NNLS, the Sobol estimator against
the analytic total indices of an additive function.
"""

import numpy as np
import pytest
import torch
from helpers import html_tags
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import whatmatters as wm
from whatmatters.core.errors import InputError, MethodError
from whatmatters.explain.craft import concept_crops, concept_maps, concept_outputs, jansen_total, sobol_masks
from whatmatters.explain.nmf import nmf, project

SNEAKER = 7


@pytest.fixture(scope="module")
def fashion():
    from whatmatters.vision.pretrained import load_fashion_mnist

    try:
        x, y = load_fashion_mnist("train", 4000)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    for b in torch.cat([torch.randperm(len(x)) for _ in range(3)]).split(100):  # 3 epochs
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
    model.eval()
    xt, yt = load_fashion_mnist("test", 1000)
    assert (model(xt).argmax(1) == yt).float().mean() > 0.6
    images = xt[yt == SNEAKER][:16]
    imp = wm.explain(model, images, "craft", target=SNEAKER, layer="5", n_concepts=5, crop_size=14, stride=7,
                     n_designs=16)  # fmt: skip
    return model, images, imp


def deletion_masks(order: torch.Tensor) -> torch.Tensor:
    """Row j removes the first j concepts of ``order``."""
    k = len(order)
    keep = torch.ones(k + 1, k)
    steps = torch.arange(k + 1)[:, None] > torch.arange(k)[None, :]
    keep[:, order] = (~steps).float()
    return keep


def test_removing_top_concepts_lowers_the_class_score_more_than_random(fashion):
    model, images, imp = fashion
    assert imp.unit == "concept" and imp.names == tuple(f"c{i}" for i in range(5))
    assert bool((imp.values[:-1] >= imp.values[1:]).all())  # sorted, c0 first
    top = concept_outputs(model, images, imp, deletion_masks(torch.arange(5))).mean(0)
    g = torch.Generator().manual_seed(0)
    random = torch.stack(
        [concept_outputs(model, images, imp, deletion_masks(torch.randperm(5, generator=g))).mean(0) for _ in range(8)]
    ).mean(0)
    assert torch.isclose(top[0], random[0]) and torch.isclose(top[-1], random[-1])  # all kept / all removed
    assert top[1:-1].mean() < random[1:-1].mean() - 0.2 * (top[0] - top[-1]).abs()
    assert top[1] < random[1]  # the first concept removed matters more than a random one


def test_maps_crops_and_model_left_alone(fashion, tmp_path):
    model, images, imp = fashion
    maps = imp.extra["maps"]
    assert maps.shape == (16, 5, 7, 7) and bool((maps >= 0).all())
    torch.testing.assert_close(concept_maps(model, images, imp), maps, atol=1e-3, rtol=1e-2)
    loaded = wm.Importance.load(imp.save(tmp_path / "craft.parquet"))  # the bank travels through the file
    torch.testing.assert_close(concept_maps(model, images[:2], loaded), maps[:2], atol=1e-3, rtol=1e-2)
    crops = concept_crops(images, imp)
    assert crops.shape == (5, 8, 1, 14, 14)
    i, top, left = imp.extra["crops"][0, 0].tolist()
    torch.testing.assert_close(crops[0, 0], images[i, :, top : top + 14, left : left + 14])
    with pytest.raises(InputError, match="keep must be"):
        concept_outputs(model, images, imp, torch.ones(10))
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_nmf_matches_scikit_learn_and_projection_matches_nnls():
    from scipy.optimize import nnls
    from sklearn.decomposition import NMF

    g = torch.Generator().manual_seed(0)
    a = torch.rand(80, 6, generator=g, dtype=torch.float64) @ torch.rand(6, 30, generator=g, dtype=torch.float64)
    a = a + 0.05 * torch.rand(80, 30, generator=g, dtype=torch.float64)
    start = (torch.rand(80, 6, generator=g, dtype=torch.float64), torch.rand(6, 30, generator=g, dtype=torch.float64))
    u, h = nmf(a, 6, iters=300, tol=0, start=start)
    ref = NMF(6, solver="mu", init="custom", max_iter=300, tol=0)
    w = ref.fit_transform(a.numpy(), W=start[0].numpy(), H=start[1].numpy())
    # the same updates from the same start: the same factors, up to float64 rounding over 300 iterations
    torch.testing.assert_close(h, torch.from_numpy(ref.components_), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(u, torch.from_numpy(w), rtol=1e-6, atol=1e-9)
    b = torch.rand(20, 30, generator=g, dtype=torch.float64) * 2
    coeffs = project(b, h, iters=5000, tol=0)
    exact = torch.tensor(np.stack([nnls(h.T.numpy(), row)[0] for row in b.numpy()]))
    residual = lambda c: torch.linalg.vector_norm(b - c @ h, dim=1)  # noqa: E731
    torch.testing.assert_close(residual(coeffs), residual(exact), rtol=1e-3, atol=1e-6)


def test_jansen_total_indices_of_an_additive_function():
    weights = torch.tensor([3.0, 2.0, 1.0, 0.0])
    masks = sobol_masks(4, 512, seed=0)
    totals = jansen_total((masks @ weights)[None], 4, 512)[0].float()
    torch.testing.assert_close(totals, weights**2 / (weights**2).sum(), atol=0.03, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=4), nn.ReLU(), nn.Flatten(),
        nn.LazyLinear(3),
    )  # fmt: skip
    x = torch.rand(4, 1, 16, 16)
    model(x)
    return model.eval(), x


def test_bad_input(tiny):
    model, x = tiny
    with pytest.raises(InputError, match=r"smaller than one cell.*crop_size >= 4"):
        wm.explain(model, x, "craft", target=0, layer="3", crop_size=3)
    with pytest.raises(InputError, match="fewer than n_concepts"):
        wm.explain(model, x[:1], "craft", target=0, layer="3", crop_size=8, stride=8, n_concepts=5)
    with pytest.raises(InputError, match=r"negative activations.*negative='clamp'"):
        wm.explain(model, x, "craft", target=0, layer="2", crop_size=8, n_concepts=2)
    with pytest.warns(UserWarning, match="negative"):
        imp = wm.explain(model, x, "craft", target=0, layer="2", crop_size=8, n_concepts=2, negative="clamp")
    assert bool(torch.isfinite(imp.values).all())
    with pytest.raises(MethodError, match="power of two"):
        wm.explain(model, x, "craft", target=0, layer="3", crop_size=8, n_designs=24)
    with pytest.raises(MethodError, match="layer"):
        wm.explain(model, x, "craft", target=0, crop_size=8)


@settings(max_examples=25, deadline=None)
@given(crop=st.integers(-2, 20), stride=st.integers(0, 9), k=st.integers(1, 12))
def test_any_crop_setting_gives_scores_or_a_clear_error(tiny, crop, stride, k):
    model, x = tiny
    try:
        imp = wm.explain(model, x[:2], "craft", target=1, layer="3", crop_size=crop, stride=stride, n_concepts=k,
                         n_designs=4)  # fmt: skip
    except (InputError, MethodError) as err:
        assert any(w in str(err) for w in ("crop", "stride", "concepts", "n_concepts"))
        return
    assert imp.values.shape == (k,) and bool(torch.isfinite(imp.values).all()) and bool((imp.values >= 0).all())


def test_report_shows_each_concepts_crops_and_maps(fashion, tmp_path):
    from whatmatters.report import write_report

    _, images, imp = fashion
    text = write_report(imp, tmp_path / "craft.html", data=images).read_text()
    alts = [tag["alt"] for tag in html_tags(text, "img")]
    for c in range(5):
        assert sum(f"c{c} crop" in a for a in alts) == 6 and sum(f"c{c} on image" in a for a in alts) == 4
    assert "most representative crops" in text and "ranked bar chart" in " ".join(alts)
