"""The shapes ViT's conv stem and mean pooling, its cache key, and LRP / Grad-CAM on it (untrained and trained)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import whatmatters as wm
from whatmatters.core.errors import InputError
from whatmatters.explain._lrp import lrp
from whatmatters.vision import nets, shapes

torch.set_num_threads(1)


def _vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return nets.ShapesViT(**{**nets.VIT_SHAPES, **kw}).eval()


def test_conv_stem_and_mean_pooling_shapes():
    vit = _vit()
    assert vit.cls_token is None and vit.pos_embed.shape == (1, 64, 64)
    kinds = [type(m).__name__ for m in vit.patch_embed]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    x = torch.rand(3, 3, 32, 32)
    assert vit.patch_embed(x).shape == (3, 64, 8, 8)
    out = {}
    vit.blocks[-1].register_forward_hook(lambda m, i, o: out.setdefault("tokens", o))
    logits = vit(x)
    assert logits.shape == (3, 4) and out["tokens"].shape == (3, 64, 64)  # no CLS token
    # mean pooling: the head sees the average of the normed tokens
    assert torch.allclose(logits, vit.head(vit.norm(out["tokens"]).mean(1)), atol=1e-6)
    # an 8-pixel patch adds one more stride-2 conv; the CLS variant keeps one extra token
    assert len(_vit(patch=8).patch_embed) == 10 and _vit(patch=8)(x).shape == (3, 4)
    assert _vit(pool="cls").pos_embed.shape == (1, 65, 64)


def test_bad_vit_options():
    with pytest.raises(InputError, match="pool"):
        nets.ShapesViT(pool="max")
    with pytest.raises(InputError, match="power-of-two"):
        nets.ShapesViT(image_size=36, patch=6, conv_stem=True)
    with pytest.raises(InputError, match="multiple"):
        nets.ShapesViT(image_size=30, patch=4)


def test_fashion_vit_and_cnn_keep_their_architecture_and_cache_keys(monkeypatch):
    """The ViT recipe changed; the cached CNN and Fashion-MNIST ViT files must still be found and load."""
    monkeypatch.setattr(torch, "__version__", "2.13.0")  # the cache key holds torch's version
    assert nets.cache_path("cnn").name == "shapes-cnn-32px-4039424cf8613283.pt"
    assert nets.cache_path("fashion_vit").name == "fashion-mnist-fashion_vit-28px-92ae3f40c55d13e8.pt"
    fashion = nets.FashionViT()
    names = [n for n, _ in fashion.named_parameters()]
    stem = ["patch_embed.0.weight", "patch_embed.0.bias", "patch_embed.2.weight", "patch_embed.2.bias"]
    assert names[:2] == ["cls_token", "pos_embed"] and [n for n in names if n.startswith("patch_embed")] == stem
    assert [type(m).__name__ for m in fashion.patch_embed] == ["Conv2d", "GELU", "Conv2d"]
    monkeypatch.undo()
    for arch in ("cnn", "fashion_vit"):  # cached files load strictly into today's modules
        if nets.cache_path(arch).exists():
            assert "cache_path" in nets.load_or_train(arch)[1]


def test_vit_recipe_is_in_the_cache_key():
    assert nets.cache_path("vit") != nets.cache_path("vit", epochs=nets.DEFAULTS["vit"]["epochs"] + 1)
    assert nets.cache_path("vit").name.startswith("shapes-vit-32px-")


def test_lrp_is_conservative_on_the_conv_stem_vit():
    """Without biases (BatchNorm folded into its conv) input relevance sums to the logit, as for the CLS ViT."""
    vit = nets.ShapesViT(n_classes=4, image_size=8, patch=4, dim=16, depth=2, heads=2, stem=4, conv_stem=True)
    vit = vit.double()
    torch.manual_seed(1)
    vit.train()
    with torch.no_grad():  # non-trivial running statistics
        vit(torch.randn(16, 3, 8, 8, dtype=torch.float64))
        for name, p in vit.named_parameters():
            if name.endswith("bias") or name == "pos_embed":
                p.zero_()
    vit.eval()
    for m in vit.modules():
        if isinstance(m, nn.BatchNorm2d):  # folding the mean leaves no bias only if the mean is zero
            m.running_mean.zero_()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    rel, _ = lrp(vit, x, 2, "epsilon", epsilon=0.0)
    logit = vit(x)[:, 2].detach()
    assert (rel.flatten(1).sum(1) - logit).abs().max() <= 1e-8 * logit.abs().max()


@pytest.mark.parametrize("method", ["grad_cam", "lrp"])
def test_explain_runs_on_the_untrained_vit(method):
    vit = _vit()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    imp = wm.explain(vit, x, method=method, target=1)
    assert imp.values.shape == (3, 32, 32) and bool(torch.isfinite(imp.values).all())
    assert float(imp.values.abs().sum()) > 0


def _trained_vit() -> nn.Module:
    if not nets.cache_path("vit").exists():
        pytest.skip("no cached shapes ViT (run whatmatters.vision.nets.load_or_train('vit') once, ~4 minutes)")
    return nets.load_or_train("vit")[0]


def test_trained_vit_is_accurate_and_explainable():
    """The cached ViT classifies fresh images; LRP puts several times the object's share of the image on
    it (measured: 0.45 of the positive relevance on 10% of the pixels). Grad-CAM runs on its default
    layer (the last block's first norm) but does not localize on this ViT (measured: 0.12 on 11%), so
    only its shape and finiteness are checked."""
    vit = _trained_vit()
    x, y, masks = shapes.make_shapes(40, 32, seed=7)
    assert nets.accuracy(vit, x, y) > 0.85
    area = float(masks.float().mean())
    rel = wm.explain(vit, x, method="lrp", target=y).values.clamp_min(0).flatten(1)
    inside = (rel * masks.flatten(1)).sum(1) / rel.sum(1).clamp_min(1e-12)
    assert float(inside.mean()) > 2.5 * area, (float(inside.mean()), area)
    cam = wm.explain(vit, x, method="grad_cam", target=y).values
    assert cam.shape == (40, 32, 32) and bool(torch.isfinite(cam).all())
    assert float((cam.flatten(1).amax(1) > 0).float().mean()) > 0.9
