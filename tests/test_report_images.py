"""The HTML report of image explanations: a methods x images grid of heatmap overlays, and the metrics table."""

import base64
import io

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from helpers import html_tags
from torch import nn

import whatmatters as wm
from whatmatters.evaluate import benchmark
from whatmatters.report import plots
from whatmatters.report.html import render_report, write_report

torch.set_num_threads(1)


def imgs(text, cls=None):
    return [a for a in html_tags(text, "img") if cls is None or a.get("class") == cls]


def png(uri):
    assert uri.startswith("data:image/png;base64,")
    array = mpimg.imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)), format="png")
    return np.round(array[..., :3] * 255).astype(np.uint8)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def bench():
    model = TinyCNN().eval()
    images = torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    result = benchmark(
        model, images, ["saliency", "grad_cam"], ["deletion_auc", "insertion_auc"], target=0, progress=False
    )
    return result, images


def test_benchmark_report_has_one_overlay_per_method_and_image(bench, tmp_path):
    result, images = bench
    path = write_report(result, tmp_path / "r.html", data=images, max_images=4)
    text = path.read_text()
    assert '<section id="overlays">' in text and 'href="#overlays"' in text
    inputs, overlays = imgs(text, "input"), imgs(text, "overlay")
    assert [a["alt"] for a in inputs] == [f"input image {i}" for i in range(4)]
    # the reference row (random scores) is in the table but not in the grid
    assert [a["alt"] for a in overlays] == [f"{m} on image {i}" for m in ("saliency", "grad_cam") for i in range(4)]
    for a in inputs + overlays:  # 12 px images shown at 96 px, nearest-neighbour for the image
        assert png(a["src"]).shape == (96, 96, 3) and a["width"] == "96"
    # the input cell is the image itself, min-max scaled
    shown = png(inputs[1]["src"])
    x = images[1]
    expected = ((x - x.min()) / (x.max() - x.min())).permute(1, 2, 0).numpy()
    assert np.abs(shown[::8, ::8].astype(float) / 255 - expected).max() <= 1 / 255
    # the metrics table, with seconds, is there too; grey per-method maps are no longer drawn
    assert 'table class="metrics"' in text and "insertion_auc" in text and "seconds" in text
    assert "per-sample attribution maps" not in text
    assert "http://" not in text and "https://" not in text and "<script" not in text


def test_overlay_colours_are_the_blend_of_image_and_colour_map():
    image = torch.full((1, 3, 4, 4), 0.25)
    image[0, :, 0, 0] = 0.75  # min-max scaling sends 0.25 -> 0 and 0.75 -> 1
    unsigned = torch.zeros(1, 4, 4)
    unsigned[0, 2, 3] = 5.0
    rgb = plots.overlay_cells(unsigned, image, cell=4, alpha=0.5)
    inferno = matplotlib.colormaps["inferno"]
    hot, cold = np.array(inferno(1.0)[:3]), np.array(inferno(0.0)[:3])
    assert np.array_equal(rgb[0, 2, 3], np.round(0.5 * hot * 255).astype(np.uint8))  # on a black pixel
    assert np.array_equal(rgb[0, 0, 0], np.round((0.5 + 0.5 * cold) * 255).astype(np.uint8))  # on a white one
    signed = torch.zeros(1, 4, 4)
    signed[0, 1, 1], signed[0, 3, 3] = 2.0, -2.0
    rgb = plots.overlay_cells(signed, None, cell=4)
    red, blue = rgb[0, 1, 1].astype(int), rgb[0, 3, 3].astype(int)
    assert np.array_equal(red, np.round(np.array(matplotlib.colormaps["RdBu_r"](1.0)[:3]) * 255))  # dark red
    assert np.array_equal(blue, np.round(np.array(matplotlib.colormaps["RdBu_r"](0.0)[:3]) * 255))  # dark blue
    assert np.array_equal(rgb[0, 0, 1], np.round(np.array(matplotlib.colormaps["RdBu_r"](0.5)[:3]) * 255))
    # images of another size than the maps: the maps are resized to the images
    big = plots.overlay_cells(unsigned, torch.rand(1, 3, 8, 8), cell=16)
    assert big.shape == (1, 16, 16, 3)


def test_overlay_undoes_the_normalization():
    x = torch.rand(2, 3, 6, 6)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normalized = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    cells = plots.image_cells(normalized, cell=6, mean=mean, std=std)
    assert np.abs(cells.astype(float) / 255 - x.permute(0, 2, 3, 1).numpy()).max() <= 0.5 / 255 + 1e-9
    text = render_report(
        wm.Importance(torch.randn(2, 6, 6), unit="pixel", method="m"), data=normalized, mean=mean, std=std
    )
    assert np.array_equal(png(imgs(text, "input")[0]["src"]), plots.image_cells(normalized, mean=mean, std=std)[0])


def test_importances_without_images_draw_the_maps_alone():
    a = wm.Importance(torch.randn(3, 3, 8, 8), unit="pixel", method="saliency")
    b = wm.Importance(torch.rand(3, 8, 8), unit="pixel", method="grad_cam")
    text = render_report([a, b])
    assert not imgs(text, "input") and len(imgs(text, "overlay")) == 6
    assert np.array_equal(png(imgs(text, "overlay")[4]["src"]), plots.overlay_cells(b.values)[1])
    assert "pass the explained images" in text
    # images that cannot be drawn (5 channels, too few) give the maps alone, not an error
    assert not imgs(render_report([a, b], data=torch.rand(3, 5, 8, 8)), "input")
    assert not imgs(render_report([a, b], data=torch.rand(2, 3, 8, 8)), "input")


def test_tabular_reports_have_no_overlays():
    imp = wm.Importance(torch.randn(6, 4), names=("a", "b", "c", "d"), method="ablation")
    text = render_report(imp, data=np.zeros((6, 4)))
    assert 'id="overlays"' not in text and not imgs(text, "overlay") and not imgs(text, "input")
    aggregated = wm.Importance(torch.randn(3, 8, 8), unit="pixel", per_sample=False, method="mean map")
    assert not imgs(render_report(aggregated), "overlay")  # one aggregated map: drawn in its own section


def test_cli_report_of_saved_pixel_scores(tmp_path):
    from typer.testing import CliRunner

    from whatmatters.cli import app

    imp = wm.Importance(torch.rand(4, 8, 8), unit="pixel", method="grad_cam")
    imp.save(tmp_path / "cam.parquet")
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(tmp_path / "cam.parquet"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(imgs(out.read_text(), "overlay")) == 4
    # with the image files, the maps are drawn over them and the inputs get their own row
    import matplotlib.pyplot as plt

    files = []
    for i in range(4):
        files += ["--images", str(tmp_path / f"img{i}.png")]
        plt.imsave(files[-1], np.random.default_rng(i).random((8, 8, 3)))
    with_images = tmp_path / "with_images.html"
    args = ["report", str(tmp_path / "cam.parquet"), "--out", str(with_images), *files, "--image-size", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = with_images.read_text()
    assert len(imgs(text, "overlay")) == 4 and len(imgs(text, "input")) == 4
    missing = CliRunner().invoke(app, [*args[:4], "--images", str(tmp_path / "none.png")])
    assert missing.exit_code == 2 and "none.png" in missing.output
