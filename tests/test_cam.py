"""CAM family: parity with pytorch-grad-cam, CF-CAM against a per-image oracle of the authors' code,
ViTs, a ground-truth CNN, bad input and model state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import benchmark_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import whatmatters as wm
from whatmatters.core.adapters import wrap
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.layers import choose_layer, token_grid, tokens_to_map
from whatmatters.core.task import Task
from whatmatters.explain import cam as cam_module

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "cam"
CAMS = ["grad_cam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam", "eigen_cam", "score_cam", "cf_cam"]
REFERENCE = ["grad_cam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam", "eigen_cam", "score_cam"]


@pytest.fixture(scope="module")
def golden():
    maker = benchmark_script("make_cam_goldens")
    model = maker.fixture_cnn()
    model.load_state_dict(torch.load(FIXTURES / "cnn.pt", weights_only=True))
    model.eval()
    data = dict(np.load(FIXTURES / "goldens.npz"))
    return model, data, maker.LAYER


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("method", REFERENCE)
def test_parity_with_pytorch_grad_cam(golden, method):
    """Maps equal pytorch-grad-cam 1.5.7's (goldens from benchmarks/make_cam_goldens.py).

    Measured: correlation 1.000000 for every image and method; max abs difference <= 8.4e-7 (float32
    rounding). Asserted: correlation >= 0.999 and max abs difference <= 1e-4.
    """
    model, data, layer = golden
    images = torch.from_numpy(data["images"])
    imp = wm.explain(model, images, method, target=data["targets"], layer=layer)
    ours, ref = imp.values.numpy(), data[method]
    assert ours.shape == ref.shape == (4, 32, 32)
    for a, b in zip(ours, ref):
        assert _corr(a, b) >= 0.999
    assert np.abs(ours - ref).max() <= 1e-4
    assert imp.unit == "pixel" and imp.method == method and imp.extra["layer"] == layer


def test_eigen_projection_matches_reference_up_to_sign(golden):
    model, data, layer = golden
    acts = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, o: acts.setdefault("a", o.detach()))
    with torch.no_grad():
        model(torch.from_numpy(data["images"]))
    handle.remove()
    raw = cam_module.principal_projection(acts["a"], sign_correction=False).numpy()
    fixed = cam_module.principal_projection(acts["a"], sign_correction=True).numpy()
    for ours, corrected, ref in zip(raw, fixed, data["eigen_projection"]):
        assert abs(_corr(ours, ref)) >= 0.999  # the SVD's sign is arbitrary
        assert np.allclose(np.abs(ours), np.abs(ref), atol=1e-4 * np.abs(ref).max())
        assert corrected.max() >= abs(corrected.min())  # the sign rule: the larger extreme is positive


# ------------------------------------------------------------------------------------ CF-CAM
def _cf_cam_oracle(acts: np.ndarray, grads: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One image at a time, loops and all, as the authors' code (jerryp-hfut/CF-CAM) describes it."""
    from sklearn.cluster import DBSCAN

    out = []
    for a, g in zip(acts, grads):
        c, h, w = a.shape
        feats = a.reshape(c, -1)
        norms = np.linalg.norm(feats, axis=1)
        important = norms >= np.percentile(norms, 75)
        rest = np.where(~important)[0]
        dist = np.linalg.norm(feats[rest][:, None] - feats[rest][None], axis=2)
        np.fill_diagonal(dist, np.inf)
        eps = max(np.percentile(dist[np.isfinite(dist)], 25), 1e-5)
        labels = DBSCAN(eps=eps, min_samples=max(2, int(len(rest) * 0.05))).fit(feats[rest]).labels_
        weights, keep = {}, []
        for i in np.where(important)[0]:
            weights[i] = g[i].mean()
            keep.append(i)
        yy, xx = np.meshgrid(np.arange(h) - h / 2, np.arange(w) - w / 2, indexing="ij")
        spatial = np.exp(-(yy**2 + xx**2) / (2 * 5.0**2))
        for k in range(labels.max() + 1):
            members = rest[labels == k]
            mean = g[members].mean(0)
            kernel = spatial * np.exp(-((mean - mean.mean()) ** 2) / (2 * 0.1**2))
            kernel = kernel / (kernel.sum() + 1e-6)
            filt = torch.nn.functional.conv2d(
                torch.from_numpy(mean)[None, None].double(), torch.from_numpy(kernel)[None, None], padding="same"
            )
            for i in members:
                weights[i] = float(filt.mean())
                keep.append(i)
        keep = np.array(sorted(keep))
        wts = np.array([weights[i] for i in keep])
        wts = np.exp(wts - wts.max()) / np.exp(wts - wts.max()).sum()
        cam = np.maximum((wts[:, None, None] * a[keep]).sum(0), 0)
        up = torch.nn.functional.interpolate(torch.from_numpy(cam)[None, None], size=size, mode="bilinear")[0, 0]
        out.append((up / up.max()).numpy() if up.max() > 0 else up.numpy())
    return np.stack(out)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("layer", ["6", "10"])  # 16 channels at 16 x 16 (even filter size), 32 at 8 x 8
def test_cf_cam_matches_per_image_oracle(golden, layer):
    model, data, _ = golden
    images = torch.from_numpy(data["images"])
    targets = torch.from_numpy(data["targets"])
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
    try:
        out = model(images)
        store["a"].retain_grad()
        out.gather(1, targets[:, None]).sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    oracle = _cf_cam_oracle(
        store["a"].detach().double().numpy(), store["a"].grad.double().numpy(), tuple(images.shape[-2:])
    )
    imp = wm.explain(model, images, "cf_cam", target=targets, layer=layer)
    ours = imp.values.numpy()
    assert sum(imp.extra["clusters"]) > 0  # the filtered-cluster path is exercised
    for a, b in zip(ours, oracle):
        assert _corr(a, b) >= 0.999
    assert np.abs(ours - oracle).max() <= 1e-3
    one_by_one = wm.explain(model, images, "cf_cam", target=targets, layer=layer, batch_size=1).values
    assert torch.allclose(one_by_one, imp.values, atol=1e-5)


def test_cf_cam_drops_noise_channels_and_weights_positively():
    """Channels that DBSCAN calls noise get no weight; every kept channel a positive one."""
    torch.manual_seed(0)
    n, c, h, w = 3, 40, 6, 6
    acts = torch.rand(n, c, h, w)
    acts[:, 30:] *= 5  # ten channels with large norms: the important ones
    grads = torch.randn(n, c, h, w) * 1e-2
    from whatmatters.explain import cfcam

    batch = cam_module.CamBatch(acts, grads, torch.zeros(n, 3, 12, 12), torch.zeros(n, dtype=torch.long), None, 8)
    cam, extra = cfcam._cf_cam_map(
        batch, keep_quantile=0.75, eps_quantile=0.25, min_samples_frac=0.05, sigma=5.0, range_sigma=0.1
    )
    assert cam.shape == (n, h, w)
    assert extra["important_channels"] == [10, 10, 10]
    assert all(10 <= k <= c for k in extra["kept_channels"])
    labels = cfcam.cluster_channels(acts.flatten(2), acts.flatten(2).norm(dim=2) >= 0, 0.25, 0.05)
    assert (labels == -2).all()  # everything important: nothing to cluster


# ------------------------------------------------------------------------------------ ViTs
class TinyViT(nn.Module):
    """A plain torch ViT (CLS token, nn.TransformerEncoderLayer blocks, whose fused fast path torch
    turns off while a hook is attached)."""

    def __init__(self, dim: int = 32, depth: int = 2, patch: int = 8, n_classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        block = nn.TransformerEncoderLayer(dim, 2, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.encoder(t))[:, 0])


@pytest.fixture(scope="module")
def hf_vit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    return transformers.ViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def torch_vit():
    torch.manual_seed(0)
    return TinyViT().eval()


def _sane(values: torch.Tensor, n: int) -> None:
    assert values.shape == (n, 32, 32)
    assert torch.isfinite(values).all()
    top = values.flatten(1).amax(1)
    assert values.min() >= 0 and torch.all((top == 0) | ((top - 1).abs() < 1e-5))  # normalised, or all zero
    assert (values.flatten(1).std(1) > 1e-3).any()  # a random model may rectify one image's map away


@pytest.mark.parametrize("method", CAMS)
def test_vit_cams_run_out_of_the_box(hf_vit, torch_vit, method):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for model, layer in ((hf_vit, "vit.layers.1.layernorm_before"), (torch_vit, "encoder.layers.1.norm1")):
        imp = wm.explain(model, x, method)
        assert imp.extra["layer"] == layer  # the last block's first norm, chosen automatically
        assert imp.extra["feature_shape"] == [32, 4, 4]  # CLS dropped, 16 patches on a 4 x 4 grid
        _sane(imp.values, 3)


def test_vit_grad_cam_equals_full_backward_and_user_reshape(hf_vit):
    """Stopping autograd at the layer gives the gradients of a full backward pass; reshape= works."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    layer = hf_vit.get_submodule("vit.layers.1.layernorm_before")
    store = {}
    handle = layer.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
    try:
        logits = hf_vit(x).logits
        store["a"].retain_grad()
        logits[:, 2].sum().backward()
    finally:
        handle.remove()
        hf_vit.zero_grad(set_to_none=True)
    a = store["a"][:, 1:].detach().reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
    g = store["a"].grad[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
    cam = torch.relu((g.mean((2, 3))[:, :, None, None] * a).sum(1, keepdim=True))
    expected = torch.nn.functional.interpolate(cam, size=(32, 32), mode="bilinear")[:, 0]
    expected = (expected - expected.amin((1, 2), keepdim=True)) / (
        expected.amax((1, 2), keepdim=True) - expected.amin((1, 2), keepdim=True)
    )
    got = wm.explain(hf_vit, x, "grad_cam", target=2).values
    assert torch.allclose(got, expected, atol=1e-5)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:].reshape(len(t), 4, 4, t.shape[-1]).permute(0, 3, 1, 2)

    mine = wm.explain(hf_vit, x, "grad_cam", target=2, layer="vit.layers.1.layernorm_before", reshape=reshape)
    assert torch.allclose(mine.values, got, atol=1e-6)


class FusedWhenNoGrad(nn.Module):
    """Skips its ``norm`` submodule (a fused kernel stand-in) when autograd is off."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.conv(self.norm(x))
        return self.conv(
            torch.nn.functional.batch_norm(
                x, self.norm.running_mean, self.norm.running_var, self.norm.weight, self.norm.bias
            )
        )


def test_fused_fast_path_falls_back_to_full_graph():
    """A layer skipped by a no-grad fast path is read from a pass with autograd on instead."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        FusedWhenNoGrad(),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    layer = model.get_submodule("1.norm")
    target = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ModelError, match="did not run"):
        cam_module._layer_pass(wrap(model), layer, "1.norm", x, target, True, False)
    acts, grads = cam_module._layer_pass(wrap(model), layer, "1.norm", x, target, True, True)
    assert acts.shape == grads.shape == (2, 4, 8, 8) and grads.abs().sum() > 0
    imp = wm.explain(model, x, "grad_cam", target=0, layer="1.norm")
    manual = torch.relu((grads.mean((2, 3))[:, :, None, None] * acts).sum(1))
    manual = (manual - manual.amin((1, 2), keepdim=True)) / (
        manual.amax((1, 2), keepdim=True) - manual.amin((1, 2), keepdim=True)
    )
    assert torch.allclose(imp.values, manual, atol=1e-5)


def test_token_grid():
    assert token_grid(197, (224, 224)) == (1, 14, 14)
    assert token_grid(198, (224, 224)) == (2, 14, 14)  # CLS + distillation token
    assert token_grid(261, (224, 224)) == (5, 16, 16)  # CLS + 4 registers, patch 14
    assert token_grid(16 * 8 + 1, (128, 64)) == (1, 16, 8)  # non-square image
    assert token_grid(7, (32, 32)) == (3, 2, 2)  # the fewest extra tokens that leave a patch grid
    assert token_grid(3, (32, 32)) is None  # a single patch is no map
    t = torch.arange(2 * 17 * 3.0).reshape(2, 17, 3)
    m = tokens_to_map(t, (32, 32))
    assert m.shape == (2, 3, 4, 4) and torch.equal(m[:, :, 0, 1], t[:, 2])


# ------------------------------------------------------------------------------------ ground truth
def _square_images(n: int = 6, size: int = 32, side: int = 6) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    gen = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(n, 3, size, size, generator=gen)
    boxes = []
    for i in range(n):
        r, c = torch.randint(0, size - side + 1, (2,), generator=gen).tolist()
        x[i, :, r : r + side, c : c + side] += 1.0
        boxes.append((r, c))
    return x, boxes


def _evidence_cnn() -> nn.Sequential:
    """Class 0's evidence is a bright square (channel 0 fires only there); class 1's is its absence."""
    torch.manual_seed(0)
    conv1, conv2, fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 1), nn.Linear(8, 2)
    with torch.no_grad():
        conv1.weight.normal_(0, 0.05)
        conv1.bias.zero_()
        conv1.weight[0] = 1 / 27
        conv1.bias[0] = -0.5
        conv2.weight.normal_(0, 0.05)
        conv2.bias.fill_(0.01)
        conv2.weight[0, 0, 0, 0] = 2.0
        fc.weight.normal_(0, 0.05)
        fc.bias.zero_()
        fc.weight[0, 0], fc.weight[1, 0] = 3.0, -3.0
    return nn.Sequential(conv1, nn.ReLU(), nn.MaxPool2d(2), conv2, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)


@pytest.mark.parametrize("method", CAMS)
def test_cam_peaks_where_the_evidence_is(method):
    x, boxes = _square_images()
    model = _evidence_cnn().eval()
    imp = wm.explain(model, x, method, target=0)
    assert imp.extra["layer"] == "4"  # the last spatial map, chosen automatically
    inside = torch.zeros(len(x), 32, 32, dtype=torch.bool)
    for i, (r, c) in enumerate(boxes):  # the square, widened by the receptive field and the pooling
        inside[i, max(r - 2, 0) : r + 8, max(c - 2, 0) : c + 8] = True
    v = imp.values
    for i in range(len(x)):
        assert inside[i].flatten()[v[i].argmax()]
        assert v[i][inside[i]].mean() >= 3 * v[i][~inside[i]].mean()
    # Gradient CAMs are class-discriminative: for class 1 (the square's absence) the square fades.
    # (Score-CAM's softmax over raw logits gives near-uniform weights on this model; Eigen- and CF-CAM
    # do not depend on the class, or barely.)
    if method in ("grad_cam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam"):
        other = wm.explain(model, x, method, target=1, normalize=False).values
        mine = wm.explain(model, x, method, target=0, normalize=False).values
        assert (other[inside].mean() < 0.5 * mine[inside].mean()).item()


# ------------------------------------------------------------------------------------ batching, dtype
@pytest.mark.parametrize("method", ["grad_cam", "score_cam", "eigen_cam"])
def test_batching_and_dtype(golden, method):
    model, data, layer = golden
    images = torch.from_numpy(data["images"])
    whole = wm.explain(model, images, method, target=data["targets"], layer=layer).values
    split = wm.explain(model, images, method, target=data["targets"], layer=layer, batch_size=3).values
    assert torch.allclose(whole, split, atol=1e-5)
    double = wm.explain(model.double(), images.double(), method, target=data["targets"], layer=layer).values
    model.float()
    assert double.dtype == torch.float64 and torch.allclose(double.float(), whole, atol=1e-4)


def test_inplace_relu_after_the_layer_reads_the_layer_output():
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)
    )
    inplace = nn.Sequential(*[nn.ReLU(inplace=True) if isinstance(m, nn.ReLU) else m for m in plain]).eval()
    x = torch.randn(2, 3, 16, 16)
    for method in ("grad_cam", "layer_cam", "eigen_cam"):
        a = wm.explain(plain.eval(), x, method, target=1, layer="0").values
        b = wm.explain(inplace, x, method, target=1, layer="0").values
        assert torch.allclose(a, b, atol=1e-6)


def test_autograd_stops_at_the_layer():
    """No backward pass reaches the layers before the explained one."""
    calls = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            calls.append(1)
            return g

    class SpyModule(nn.Module):
        def forward(self, x):
            return Spy.apply(x)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        SpyModule(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 2),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    wm.explain(model, x, "grad_cam", target=0, layer="3")
    assert calls == []
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------ bad input
def test_unknown_layer_lists_names(golden):
    model, data, _ = golden
    with pytest.raises(ModelError, match=r"no layer named 'layer4'.*named_modules"):
        wm.explain(model, data["images"], "grad_cam", target=0, layer="layer4")
    with pytest.raises(ModelError, match="Did you mean '10'"):
        wm.explain(model, data["images"], "grad_cam", target=0, layer="10x")


def test_non_spatial_layer_suggests_reshape(golden):
    model, data, _ = golden
    with pytest.raises(ModelError, match=r"outputs shape \(4, 5\), not a spatial map.*reshape="):
        wm.explain(model, data["images"], "grad_cam", target=0, layer="13")
    with pytest.raises(ModelError, match="reshape turned"):
        wm.explain(model, data["images"], "grad_cam", target=0, layer="10", reshape=lambda t: t.flatten(1))
    with pytest.raises(MethodError, match="reshape must be a callable"):
        wm.explain(model, data["images"], "grad_cam", target=0, layer="10", reshape="tokens")


def test_wrong_channels_or_size_give_clear_errors(golden, hf_vit):
    model, data, _ = golden
    gray = data["images"][:, :1]
    with pytest.raises(InputError, match=r"shape \(1, 1, 32, 32\).*channels"):
        wm.explain(model, gray, "grad_cam", target=0)
    with pytest.raises(InputError, match=r"shape \(1, 32, 32\).*channels"):
        wm.explain(model, data["images"][:, 0], "grad_cam", target=0)
    with pytest.raises(InputError, match=r"shape \(1, 3, 64, 64\)"):
        wm.explain(hf_vit, torch.randn(2, 3, 64, 64), "grad_cam", target=0)
    with pytest.raises(MethodError, match="not features"):
        wm.explain(model, np.zeros((4, 10)), "grad_cam", target=0)


def test_grayscale_model_works_and_rejects_rgb():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    x = torch.randn(3, 1, 20, 24)
    for method in CAMS:
        v = wm.explain(model.eval(), x, method, target=1).values
        assert v.shape == (3, 20, 24) and torch.isfinite(v).all()
    with pytest.raises(InputError, match="channels"):
        wm.explain(model, torch.randn(3, 3, 20, 24), "grad_cam", target=1)


def test_bad_parameters(golden):
    model, data, layer = golden
    with pytest.raises(MethodError, match="normalize must be"):
        wm.explain(model, data["images"], "grad_cam", target=0, layer=layer, normalize="sum")
    with pytest.raises(MethodError, match="keep_quantile"):
        wm.explain(model, data["images"], "cf_cam", target=0, layer=layer, keep_quantile=1.5)
    with pytest.raises(MethodError, match="sigma"):
        wm.explain(model, data["images"], "cf_cam", target=0, layer=layer, sigma=0)
    with pytest.raises(ModelError, match="not a submodule"):
        wm.explain(model, data["images"], "grad_cam", target=0, layer=nn.ReLU())


def test_shared_module_is_refused():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), relu, nn.Conv2d(4, 4, 3, padding=1), relu)
    model = nn.Sequential(model, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(ModelError, match="runs 2 times"):
        wm.explain(model, torch.randn(2, 3, 8, 8), "grad_cam", target=0, layer="0.1")
    imp = wm.explain(model, torch.randn(2, 3, 8, 8), "grad_cam", target=0)  # automatic choice avoids it
    assert imp.extra["layer"] == "0"


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(min_size=1, max_size=12).filter(lambda s: s not in {str(i) for i in range(14)}))
def test_any_unknown_layer_name_is_a_clear_error(golden, name):
    model, data, _ = golden
    with pytest.raises(ModelError, match="named_modules"):
        wm.explain(model, data["images"][:1], "grad_cam", target=0, layer=name)


# ------------------------------------------------------------------------------------ model state
class Bomb(nn.Module):
    """Raises on batches of three rows: in the middle of a CAM pass, after the layer's hook ran."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 3:
            raise RuntimeError("boom")
        return x


def _snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "weights": [t.detach().clone() for t in model.state_dict().values()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()],
    }


def _same(a: dict, b: dict) -> bool:
    return (
        a["training"] == b["training"]
        and a["requires_grad"] == b["requires_grad"]
        and all(x is y for x, y in zip(a["grads"], b["grads"]))
        and all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
        and a["hooks"] == b["hooks"]
    )


@pytest.mark.parametrize("method", CAMS)
def test_model_state_restored_even_on_error(method):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        Bomb(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    model[0].weight.requires_grad_(False)  # a frozen part stays frozen, the rest stays trainable
    model[1].train()  # a submodule in training mode stays so, and its running statistics come back
    before = _snapshot(model)
    x = torch.randn(4, 3, 8, 8)
    grad_mode = torch.is_grad_enabled()
    imp = wm.explain(model, x, method, target=1, layer="2", batch_size=4, allow_train_mode=True)
    assert imp.values.shape == (4, 8, 8)
    assert _same(before, _snapshot(model)) and torch.is_grad_enabled() == grad_mode
    with pytest.raises(RuntimeError, match="boom"):
        wm.explain(model, x, method, target=1, layer="2", batch_size=3, allow_train_mode=True)
    assert _same(before, _snapshot(model)) and torch.is_grad_enabled() == grad_mode


def test_choose_layer_on_resnet_like_block():
    """The automatic choice names the innermost module of the last spatial map (ResNet's layer4[-1])."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(self.relu(x)) + x)  # relu runs twice: never chosen

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(Block(), Block()), nn.AdaptiveAvgPool2d(1))
    model = nn.Sequential(model, nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(1, 3, 8, 8)
    name, module = choose_layer(model, model, x)
    assert name == "0.1.1" and module is model[0][1][1]
    task = Task(wrap(model), x, torch.zeros(1, dtype=torch.long))
    values, extra = cam_module.grad_cam(task)
    assert extra["layer"] == "0.1.1" and values.shape == (1, 8, 8)


def test_batchnorm_running_stats_restored_in_train_mode():
    """BatchNorm's running statistics (updated in place without a version bump) come back too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2))
    model.train()
    before = [t.clone() for t in model.state_dict().values()]
    wm.explain(model, torch.randn(4, 3, 8, 8), "grad_cam", target=1, layer="2", allow_train_mode=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
