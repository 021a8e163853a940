"""LIME: parity with captum's Lime on the same perturbations and kernel, ground truth, tokens, bad input.

Parity tolerance: 1e-4 relative to the largest reference score. captum fits its surrogate in float32
(it casts the binary vectors, outputs and weights with ``.float()``); we fit in float64.
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
from whatmatters.explain.lime import grid_segments, weighted_ridge

captum_attr = pytest.importorskip("captum.attr")
linear_models = pytest.importorskip("captum._utils.models.linear_model")

RTOL = 1e-4


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double().eval()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    ).double().eval()  # fmt: skip


def our_switches(n: int, n_samples: int, k: int, seed: int = 0) -> torch.Tensor:
    """The on/off vectors lime draws (documented in whatmatters.explain.lime)."""
    return torch.rand((n, n_samples, k), generator=torch.Generator().manual_seed(seed)) < 0.5


def captum_lime(model, x, target, z, surrogate, alpha, baseline, feature_mask=None):
    """captum's Lime, one sample at a time, fed our perturbation vectors."""
    refs = []
    for i in range(len(x)):

        def perturb(_inp, rows=z[i], **_kw):
            for row in rows:
                yield row[None].long()

        cls = linear_models.SkLearnRidge if surrogate == "ridge" else linear_models.SkLearnLasso
        lime = captum_attr.Lime(model, interpretable_model=cls(alpha=alpha), perturb_func=perturb)
        mask = None if feature_mask is None else feature_mask[None, None].expand(1, *x.shape[1:])
        refs.append(
            lime.attribute(x[i : i + 1], target=int(target[i]), n_samples=z.shape[1], baselines=baseline,
                           feature_mask=mask)
        )  # fmt: skip
    return torch.cat(refs)


def assert_parity(ours, ref):
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=RTOL, atol=RTOL * float(ref.abs().max()))


@pytest.mark.parametrize("surrogate,alpha", [("ridge", 1.0), ("lasso", 0.01)])
def test_lime_matches_captum_on_a_table(surrogate, alpha):
    model, x = mlp(), torch.randn(4, 6, dtype=torch.float64)
    target = model(x).argmax(1)
    imp = wm.explain(model, x, "lime", target=target, n_samples=64, baseline="zero", surrogate=surrogate, alpha=alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_lime(model, x, target, our_switches(4, 64, 6), surrogate, alpha, 0.0)
    assert imp.unit == "feature" and imp.values.shape == x.shape
    assert_parity(imp.values, ref)


def test_lime_matches_captum_on_grid_superpixels():
    model, x = cnn(), torch.rand(3, 3, 12, 12, dtype=torch.float64)
    target = model(x).argmax(1)
    imp = wm.explain(model, x, "lime", target=target, n_samples=48, n_segments=9, distance="euclidean",
                     kernel_width=3.0)  # fmt: skip
    segments = grid_segments(12, 12, 9)
    assert int(segments.max()) == 8 and imp.extra["n_features"].tolist() == [9, 9, 9]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        similarity = captum_attr._core.lime.get_exp_kernel_similarity_function("euclidean", 3.0)
        refs = []
        z = our_switches(3, 48, 9)
        for i in range(3):

            def perturb(_inp, rows=z[i], **_kw):
                for row in rows:
                    yield row[None].long()

            lime = captum_attr.Lime(model, linear_models.SkLearnRidge(alpha=1.0), similarity, perturb)
            mask = segments[None, None].expand(1, 3, 12, 12)
            refs.append(lime.attribute(x[i : i + 1], target=int(target[i]), n_samples=48, feature_mask=mask))
    assert_parity(imp.values, torch.cat(refs))


def test_weighted_ridge_equals_scikit_learn():
    from sklearn.linear_model import Ridge

    g = torch.Generator().manual_seed(0)
    z = (torch.rand(2, 40, 5, generator=g) < 0.5).double()
    y, w = torch.randn(2, 40, generator=g, dtype=torch.float64), torch.rand(2, 40, generator=g, dtype=torch.float64)
    coef, intercept = weighted_ridge(z, y, w, 0.7)
    for i in range(2):
        fit = Ridge(alpha=0.7).fit(z[i].numpy(), y[i].numpy(), sample_weight=w[i].numpy())
        np.testing.assert_allclose(coef[i].numpy(), fit.coef_, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(float(intercept[i]), fit.intercept_, rtol=1e-10, atol=1e-12)


def test_lime_recovers_a_linear_model_exactly():
    """For f(x) = w . x and baseline 0, switching feature j off removes w_j x_j: the surrogate is exact."""
    w = torch.tensor([3.0, -2.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double().eval()
    with torch.no_grad():
        model.weight.copy_(w[None])
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    imp = wm.explain(model, x, "lime", baseline="zero", alpha=1e-9, n_samples=100)
    torch.testing.assert_close(imp.values, w * x, rtol=1e-6, atol=1e-7)
    assert np.allclose(imp.extra["r2"], 1.0)
    top2 = wm.explain(model, x, "lime", baseline="zero", alpha=1e-9, n_samples=100, n_features=2)
    assert ((top2.values != 0).sum(1) <= 2).all()
    largest = (w * x).abs().topk(2, dim=1).indices
    assert torch.equal(top2.values.abs().topk(2, dim=1).indices.sort(1).values, largest.sort(1).values)


class TokenModel(nn.Module):
    """Scores a sequence by the token at position 2 only (token 7 is the evidence for class 1)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 1)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[7] = 4.0

    def forward(self, ids):
        e = self.embed(ids)[:, 2, 0]
        return torch.stack([-e, e], 1)


def test_lime_on_tokens_finds_the_token_that_matters():
    ids = torch.tensor([[1, 3, 7, 5, 2, 4], [7, 1, 7, 3, 3, 9]])
    imp = wm.explain(TokenModel().eval(), ids, "lime", target=1, n_samples=64)
    assert imp.unit == "token" and imp.values.shape == ids.shape
    assert (imp.values.abs().argmax(1) == 2).all()
    assert imp.values[1, 0].abs() < 0.05 * imp.values[1, 2]  # the other 7 is not at the scored position


def test_lime_slic_superpixels_follow_the_image():
    pytest.importorskip("skimage")
    from whatmatters.vision.shapes import make_shapes

    images = make_shapes(2, size=32, seed=0)[0].float()
    model = cnn().float()
    imp = wm.explain(model, images, "lime", segmentation="slic", n_segments=20, n_samples=32)
    assert imp.values.shape == images.shape and torch.isfinite(imp.values).all()
    assert (imp.extra["n_features"] > 4).all()


def test_lime_on_a_constant_model_warns_and_scores_zero():
    model = nn.Sequential(nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        model[0].weight.zero_()
    with pytest.warns(UserWarning, match="did not change"):
        imp = wm.explain(model, torch.randn(3, 4, dtype=torch.float64), "lime", target=0, n_samples=20)
    assert torch.equal(imp.values, torch.zeros_like(imp.values))


def test_lime_works_on_scikit_learn_models(cancer):
    X, _, model = cancer
    imp = wm.explain(model, X.iloc[:3], "lime", target=1, n_samples=200, n_features=5)
    assert imp.values.shape == (3, X.shape[1]) and ((imp.values != 0).sum(1) == 5).all()
    assert list(imp.names) == list(X.columns)


def test_lime_refuses_a_feature_mask_that_does_not_fit():
    model, x = mlp(), torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(InputError, match="feature_mask"):
        wm.explain(model, x, "lime", feature_mask=np.zeros(5, dtype=int))
    with pytest.raises(InputError, match="integer"):
        wm.explain(model, x, "lime", feature_mask=np.zeros(6))
    grouped = wm.explain(model, x, "lime", feature_mask=[0, 0, 1, 1, 2, 2], n_samples=32)
    assert torch.equal(grouped.values[:, 0], grouped.values[:, 1])


@settings(max_examples=30, deadline=None)
@given(
    st.one_of(
        st.fixed_dictionaries({"n_samples": st.one_of(st.integers(-3, 1), st.just(2.5), st.booleans())}),
        st.fixed_dictionaries({"kernel_width": st.one_of(st.floats(-5, 0), st.just(float("nan")))}),
        st.fixed_dictionaries({"surrogate": st.text(max_size=5)}),
        st.fixed_dictionaries({"distance": st.sampled_from(["l1", "Cosine", ""])}),
        st.fixed_dictionaries({"alpha": st.floats(max_value=-1e-9, allow_nan=False)}),
        st.fixed_dictionaries({"n_features": st.integers(max_value=0)}),
        st.fixed_dictionaries({"segmentation": st.sampled_from(["quad", "watershed"])}),
    )
)
def test_lime_bad_parameters_are_method_errors(params):
    data = torch.rand(1, 3, 6, 6, dtype=torch.float64) if "segmentation" in params else torch.randn(2, 6).double()
    model = cnn() if data.ndim == 4 else mlp()
    with pytest.raises(MethodError):
        wm.explain(model, data, "lime", **params)


def test_a_tiny_kernel_width_is_refused_not_nan():
    with pytest.raises(MethodError, match="kernel_width"):
        wm.explain(mlp(), torch.randn(2, 6, dtype=torch.float64), "lime", kernel_width=1e-200, n_samples=16)


def test_a_feature_mask_numpy_cannot_hand_to_torch_is_an_input_error():
    """Found by the parameter fuzz test: 2**63 becomes a uint64 array, which torch.as_tensor refuses."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    with pytest.raises(InputError, match="feature_mask must hold integer"):
        wm.explain(net, torch.randn(4, 3), "lime", target=0, feature_mask=2**63)
