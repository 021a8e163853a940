"""Plots and the self-contained HTML report (also rendered in headless Chromium when it is installed)."""

import base64
import html
import io
import re
import shutil
import subprocess
from types import SimpleNamespace

import matplotlib.colors
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import html_tags as tags

import whatmatters as wm
from whatmatters.report import plots
from whatmatters.report.html import render_report, write_report

NAMES = ["<b>radius</b> & co", *[f"feature {i}" for i in range(1, 12)]]


def make_importance(method, scale, seed, n=16, names=NAMES):
    rng = np.random.default_rng(seed)
    values = torch.tensor(rng.normal(size=(n, len(names))) * scale)
    return wm.Importance(values, names=names, method=method, params={"steps": 8}, target=0, seed=seed, seconds=0.25)


@pytest.fixture(scope="module")
def bench():
    """A hand-built BenchmarkResult with the documented attributes."""
    scale = np.linspace(3, 0.1, len(NAMES))
    methods = ["ablation", "integrated_gradients", "kernel_shap"]
    imps = {m: make_importance(m, scale, i) for i, m in enumerate(methods)}
    frac = np.linspace(0, 1, 11)
    curves = {
        m: {"deletion": (frac, np.exp(-3 * frac * (i + 1))), "insertion": (frac, 1 - np.exp(-3 * frac * (i + 1)))}
        for i, m in enumerate(methods)
    }
    imps["random"] = make_importance("random", np.ones(len(NAMES)), 9)
    curves["random"] = {"deletion": (frac, 1 - 0.5 * frac), "insertion": (frac, 0.5 * frac)}
    table = pd.DataFrame(
        {
            "deletion_auc": [0.31, 0.22, 0.25, 0.1],  # the reference row is never highlighted
            "insertion_auc": [0.71, 0.83, np.nan, 0.5],
            "seconds": [0.012, 0.5, 2.0, 0.0001],
            "error": [None, None, "insertion_auc: ValueError: <boom>", None],
        },
        index=[*methods, "random"],
    )
    agreement = pd.DataFrame([[1, 0.8, 0.5], [0.8, 1, 0.6], [0.5, 0.6, 1]], index=methods, columns=methods)
    info = {
        "deletion_auc": ("faithfulness", False),
        "insertion_auc": ("faithfulness", True),
        "seconds": ("cost", False),
    }
    return SimpleNamespace(
        table=table, importances=imps, curves=curves, agreement=agreement, metric_info=info, reference="random"
    )


def decode_png(uri):
    assert uri.startswith("data:image/png;base64,")
    raw = base64.b64decode(uri.split(",", 1)[1], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(io.BytesIO(raw), format="png")


def assert_self_contained(text):
    for attrs in tags(text):
        for key in ("src", "href", "action", "data"):
            value = attrs.get(key) or ""
            assert not re.match(r"\s*(https?:)?//", value), f"external {key}: {value[:80]}"
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", text), "external url() in CSS"
    assert "<script" not in text.lower() and "@import" not in text


@pytest.fixture(scope="module")
def bench_report(bench, tmp_path_factory):
    """The report of ``bench``, written once; and whether pyplot's open figures stayed the same."""
    before = set(plt.get_fignums())
    folder = tmp_path_factory.mktemp("report")
    path = write_report(bench, folder / "sub" / "report.html", title="a <title> & more", data=np.zeros((16, 12)))
    return path, set(plt.get_fignums()) == before


def test_benchmark_report_is_self_contained_and_complete(bench_report):
    path, no_figure_left_open = bench_report
    assert no_figure_left_open
    text = path.read_text(encoding="utf-8")
    assert_self_contained(text)
    imgs = tags(text, "img")
    # 2 curve charts + 1 agreement heatmap + (bar chart + per-sample heatmap) per method
    assert len(imgs) == 2 + 1 + 2 * 3
    for attrs in imgs:
        image = decode_png(attrs["src"])
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.05  # a drawn chart, not a blank canvas
        assert attrs["alt"]
    alts = " ".join(a["alt"] for a in imgs)
    for word in ("deletion curves", "insertion curves", "agreement", "bar chart of kernel_shap", "heatmap of ablation"):
        assert word in alts
    # header: title escaped, data shape, version
    assert "a &lt;title&gt; &amp; more" in text and "<title>a <title>" not in text
    assert "16 × 12" in text and wm.__version__ in text
    # metrics table: arrows, categories, the best value per column highlighted
    table = text[text.index('<table class="metrics">') : text.index("</table>")]
    assert "deletion_auc" in table and "↓" in table and "↑" in table and "faithfulness" in table
    best = re.findall(r'<td class="best">([^<]+)</td>', table)
    assert best == ["0.012", "0.22", "0.83"]  # row by row: ablation's seconds, then integrated_gradients x2
    assert '<td class="na">–</td>' in table  # NaN shown as a dash
    assert "error" not in table.split("</thead>")[0]  # the error column is listed below, not as a metric
    assert "kernel_shap</b>: insertion_auc: ValueError: &lt;boom&gt;" in text
    assert 'class="ref"' in table and "reference" in table
    assert "bar chart of random" not in alts  # the reference row gets no chart of its own


def test_report_of_a_real_benchmark(cancer, tmp_path):
    benchmark = pytest.importorskip("whatmatters.evaluate").benchmark
    x, y, _ = cancer
    x, y = x.iloc[::40, :8], y.iloc[::40]  # 15 rows of both classes
    from sklearn.linear_model import LogisticRegression

    small = LogisticRegression(max_iter=500).fit(x, y)
    result = benchmark(small, x, ["ablation", ("ablation", {"baseline": "zero"})], ["deletion_auc", "insertion_auc"])
    text = render_report(result, "real", data=x, model=small)
    assert_self_contained(text)
    assert "LogisticRegression (sklearn)" in text and "15 × 8" in text
    for label in result.table.index:
        assert html.escape(label) in text
    imgs = tags(text, "img")
    assert len(imgs) == 2 + 1 + 2 * 2  # curves, agreement, two methods (the random reference has no charts)
    for attrs in imgs:
        decode_png(attrs["src"])
    best = re.findall(r'<td class="best">([^<]+)</td>', text)
    expected = result.table.drop(index=result.reference)["deletion_auc"].min()
    assert f"{expected:.4g}" in best


def test_report_from_importances(tmp_path):
    scale = np.linspace(2, 0.1, len(NAMES))
    a, b = make_importance("ablation", scale, 0), make_importance("ablation", scale, 1)
    text = render_report([a, b])
    assert_self_contained(text)
    assert "Metrics" not in text and "Deletion and insertion" not in text
    assert "ablation #2" in text  # duplicate method names are told apart
    imgs = tags(text, "img")
    assert len(imgs) == 1 + 2 * 2 and any("agreement" in x["alt"] for x in imgs)
    single = render_report(a)
    assert len(tags(single, "img")) == 2 and "agreement" not in " ".join(x["alt"] for x in tags(single, "img"))
    assert "16 samples" in single


def test_report_escapes_method_names_and_params():
    imp = wm.Importance(
        torch.randn(4, 3), names=("x", "y", "z"), method="m<script>alert(1)</script>", params={"p": "<i>"}
    )
    text = render_report(imp, title="<script>t</script>")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;" in text and "&lt;i&gt;" in text


def test_report_draws_pixel_maps_and_aggregated_scores():
    pixels = wm.Importance(torch.randn(3, 3, 8, 8), unit="pixel", method="saliency")
    text = render_report(pixels)
    imgs = tags(text, "img")  # without the images: the maps alone, one cell per sample (tests/test_report_images.py)
    assert [i["alt"] for i in imgs] == [f"saliency on image {i}" for i in range(3)]
    decode_png(imgs[0]["src"])
    aggregated = wm.Importance(torch.tensor([0.5, -2.0, 1.0]), names=("a", "b", "c"), per_sample=False, method="g")
    assert len(tags(render_report(aggregated), "img")) == 1  # a bar chart; no per-sample heatmap without samples


def test_sample_maps_overlay_the_input_images():
    imp = wm.Importance(torch.randn(3, 3, 8, 8), unit="pixel", method="saliency")
    images = torch.rand(3, 3, 8, 8)
    fig = plots.sample_maps(imp, fig=plots.new_figure(6, 2), images=images)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 3  # one per sample
    under, over = panels[0].get_images()
    assert np.allclose(under.get_array(), (lambda g: (g - g.min()) / (g.max() - g.min()))(images[0].mean(0).numpy()))
    assert np.allclose(over.get_array(), imp.values[0].sum(0).numpy()) and over.get_alpha() < 1
    # images of another size are not drawn under the maps
    fig = plots.sample_maps(imp, fig=plots.new_figure(6, 2), images=torch.rand(3, 3, 4, 4))
    assert len(fig.axes[0].get_images()) == 1
    assert "over the input image" in render_report(imp, data=images)


def test_report_rejects_other_objects():
    with pytest.raises(wm.InputError, match="BenchmarkResult"):
        render_report({"a": 1})
    with pytest.raises(wm.InputError, match="BenchmarkResult"):
        render_report(np.zeros(3))


def test_bar_chart_ranks_and_colours_by_sign():
    values = torch.tensor([[1.0, -4.0, 0.5], [2.0, -2.0, -0.1]])
    imp = wm.Importance(values, names=("a", "b", "c"), method="m")
    fig = plots.new_figure(4, 3)
    ax = plots.bar_chart(imp, ax=fig.subplots(), k=2)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["a", "b"]  # largest on top (drawn last)
    widths = [p.get_width() for p in ax.patches]
    assert widths == pytest.approx([1.5, 3.0])
    colours = [p.get_facecolor()[:3] for p in ax.patches]
    assert colours[0][0] > colours[0][2] and colours[1][2] > colours[1][0]  # a: red (raises), b: blue (lowers)


def test_sample_heatmap_orders_units_and_is_symmetric():
    values = torch.tensor([[0.1, -5.0, 1.0], [0.2, 4.0, -1.0]], dtype=torch.float64)
    imp = wm.Importance(values, names=("a", "b", "c"), method="m")
    fig = plots.new_figure(4, 3)
    ax = plots.sample_heatmap(imp, ax=fig.subplots())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["b", "c", "a"]
    image = ax.get_images()[0]
    assert np.allclose(image.get_array(), values.numpy()[:, [1, 2, 0]])
    lo, hi = image.get_clim()
    assert lo == -hi and hi == pytest.approx(5.0)
    with pytest.raises(wm.InputError, match="sample_maps"):
        plots.sample_heatmap(wm.Importance(torch.randn(2, 3, 4, 4), unit="pixel"))


def test_agreement_heatmap_and_curves():
    frame = pd.DataFrame([[1.0, -0.25], [-0.25, 1.0]], index=["p", "q"], columns=["p", "q"])
    fig = plots.new_figure(4, 4)
    ax = plots.agreement_heatmap(frame, ax=fig.subplots())
    assert sorted(t.get_text() for t in ax.texts) == ["-0.25", "-0.25", "1.00", "1.00"]
    fig = plots.new_figure(4, 3)
    frac = np.linspace(0, 1, 5)
    ax = plots.curves({"p": {"deletion": (frac, 1 - frac)}, "q": {"insertion": (frac, frac)}}, ax=fig.subplots())
    assert len(ax.lines) == 1 and np.allclose(ax.lines[0].get_ydata(), 1 - frac)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["p"]


def test_figure_to_data_uri_closes_pyplot_figures():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    uri = plots.figure_to_data_uri(fig)
    assert fig.number not in plt.get_fignums()
    assert decode_png(uri).shape[2] in (3, 4)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_renders_in_headless_chromium(bench_report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium / chrome binary on PATH: cannot render the report in a real browser")
    path = bench_report[0]
    shot = tmp_path / "shot.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        f"--screenshot={shot}",
        "--window-size=1200,2400",
        path.as_uri(),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    imgs = tags(dom, "img")
    assert len(imgs) == 9 and all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    assert "a &lt;title&gt; &amp; more" in dom and 'class="metrics"' in dom
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1200)
    non_white = (pixels.min(-1) < 0.9).mean()
    assert non_white > 0.1, f"page looks blank ({non_white:.1%} non-white pixels)"
    # the charts are drawn: red and blue of the bars, heatmaps and curves (the page's own CSS has neither)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    red = ((r > 0.65) & (g < 0.5) & (b < 0.5)).sum()
    blue = ((b > 0.6) & (r < 0.45)).sum()
    assert red > 2000 and blue > 2000, (red, blue)


def test_bar_chart_of_unsigned_aggregated_scores_is_neutral():
    imp = wm.Importance(torch.tensor([3.0, 1.0, 2.0]), names=("a", "b", "c"), per_sample=False, method="seats")
    ax = plots.bar_chart(imp, ax=plots.new_figure(4, 3).subplots())
    assert {p.get_facecolor()[:3] for p in ax.patches} == {matplotlib.colors.to_rgb(plots.NEUTRAL)}
    signed = wm.Importance(torch.tensor([3.0, -1.0]), names=("a", "b"), per_sample=False, method="perm")
    ax = plots.bar_chart(signed, ax=plots.new_figure(4, 3).subplots())
    assert [p.get_width() for p in ax.patches] == [-1.0, 3.0]
    assert [p.get_facecolor()[:3] for p in ax.patches] == [
        matplotlib.colors.to_rgb(plots.NEGATIVE),
        matplotlib.colors.to_rgb(plots.POSITIVE),
    ]
