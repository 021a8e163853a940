"""Overlays (heatmap on image, methods x images grid) and image input in the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import whatmatters as wm
from whatmatters.core.errors import InputError
from whatmatters.vision import overlay as ov
from whatmatters.vision.nets import ShapesCNN
from whatmatters.vision.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

PNG = b"\x89PNG\r\n\x1a\n"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()


def test_display_images_undo_normalization():
    x = torch.rand(2, 3, 8, 8)
    shown = ov.display_images(normalize(x, IMAGENET_MEAN, IMAGENET_STD), IMAGENET_MEAN, IMAGENET_STD)
    assert shown.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(shown, x.permute(0, 2, 3, 1).double().numpy(), atol=1e-6)
    grey = ov.display_images(torch.arange(16.0).view(1, 4, 4))
    assert grey.shape == (1, 4, 4, 3) and grey.min() == 0 and grey.max() == 1
    with pytest.raises(InputError):
        ov.display_images(torch.rand(2, 5, 8, 8))


def test_as_maps_sums_channels_and_resizes():
    values = torch.ones(2, 3, 4, 4)
    maps = ov.as_maps(values)
    assert maps.shape == (2, 4, 4) and np.allclose(maps, 3)
    assert ov.as_maps(torch.rand(2, 4, 4), size=(8, 8)).shape == (2, 8, 8)
    with pytest.raises(InputError):
        ov.as_maps(torch.rand(2, 3, 4, 4, 1))


def test_colour_maps_follow_the_sign():
    assert ov._limits(np.array([[0.0, 2.0]]))[2] == ov.SEQUENTIAL
    lo, hi, cmap = ov._limits(np.array([[-1.0, 2.0]]))
    assert cmap == ov.DIVERGING and lo == -hi


def test_overlay_and_grid_png(tmp_path):
    x = torch.rand(3, 3, 16, 16)
    model = _model()
    occ = wm.explain(model, x, "occlusion", target=0, window=4)
    grads = torch.randn(3, 3, 16, 16)
    fig = ov.overlay(x[0], occ.values[0], tmp_path / "one.png", title="occlusion")
    assert fig is not None and (tmp_path / "one.png").read_bytes()[:8] == PNG
    ov.overlay_grid({"occlusion": occ, "random": grads, "coarse": torch.rand(3, 4, 4)}, x, tmp_path / "grid.png")
    data = (tmp_path / "grid.png").read_bytes()
    assert data[:8] == PNG and len(data) > 5000
    import matplotlib.image as mpimg

    picture = mpimg.imread(tmp_path / "grid.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 300  # 4 rows x 3 images
    with pytest.raises(InputError):
        ov.overlay_grid({}, x)
    with pytest.raises(InputError, match="maps of 1 images"):
        ov.overlay_grid({"short": torch.rand(1, 16, 16)}, x)


def test_cli_explain_image_files(tmp_path):
    typer_testing = pytest.importorskip("typer.testing")
    import matplotlib.image as mpimg

    from whatmatters.cli import app

    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        mpimg.imsave(path, (rng.random((40, 30, 3)) * 255).astype(np.uint8))
        files.append(str(path))
    torch.manual_seed(0)
    model_path = tmp_path / "cnn.pt"
    torch.save(ShapesCNN().eval(), model_path)
    out, picture = tmp_path / "occ.parquet", tmp_path / "occ.png"
    result = typer_testing.CliRunner().invoke(
        app,
        [
            "explain",
            str(model_path),
            *files,
            "-m",
            "occlusion",
            "--image-size",
            "32",
            "--image-norm",
            "none",
            "-p",
            "window=8",
            "-o",
            str(out),
            "--overlay",
            str(picture),
        ],
    )
    assert result.exit_code == 0, result.output
    imp = wm.Importance.load(out)
    assert imp.values.shape == (2, 32, 32) and imp.unit == "pixel"
    assert picture.read_bytes()[:8] == PNG
    bad = typer_testing.CliRunner().invoke(
        app, ["explain", str(model_path), files[0], "-m", "occlusion", "--image-norm", "zscore"]
    )
    assert bad.exit_code == 2 and "normalization" in bad.output


def test_one_colour_scheme_per_method():
    assert ov._limits(np.array([[0.0, 2.0]]), signed=True)[2] == ov.DIVERGING
    assert ov._limits(np.array([[-1.0, 2.0]]), signed=False)[:2] == (0.0, pytest.approx(1.97))
