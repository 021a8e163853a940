"""A self-contained HTML report: one file, inline CSS, images as base64 PNG, no scripts, no external URLs."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from whatmatters._version import __version__
from whatmatters.core.errors import InputError
from whatmatters.core.importance import Importance
from whatmatters.report import plots
from whatmatters.report import text as text_heatmaps
from whatmatters.report.concepts import concept_cells, is_concept_bank

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; margin: 0;
       background: #f4f6f8; color: #1d2733; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
header { background: #1d3557; color: #fff; padding: 22px 28px; }
header h1 { margin: 0 0 8px; font-size: 1.6em; font-weight: 600; max-width: 1180px; margin-inline: auto; }
header dl { display: flex; flex-wrap: wrap; gap: 4px 28px; margin: 0 auto; max-width: 1180px; font-size: .9em; }
header dt { opacity: .7; } header dd { margin: 0 0 0 6px; font-weight: 500; }
header .item { display: flex; }
section { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08); padding: 18px 22px;
          margin-top: 22px; }
h2 { font-size: 1.2em; margin: 0 0 10px; color: #1d3557; }
h3 { font-size: 1.02em; margin: 0 0 6px; }
p.note { color: #56606b; font-size: .88em; margin: 4px 0 12px; }
table.metrics { border-collapse: collapse; font-size: .92em; font-variant-numeric: tabular-nums; }
table.metrics th, table.metrics td { padding: 6px 12px; border-bottom: 1px solid #e3e7eb; text-align: right; }
table.metrics th { background: #eef2f6; vertical-align: bottom; }
table.metrics th small { display: block; font-weight: normal; color: #66707a; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics td.best { background: #d8f0dd; font-weight: 700; color: #14532d; }
table.metrics td.na { color: #9aa3ab; }
table.metrics tr.ref td { color: #66707a; font-style: italic; }
.errors { color: #8a1c1c; font-size: .86em; margin-top: 10px; }
.errors p { margin: 0; } .errors ul { margin: 4px 0 0; padding-left: 20px; }
.arrow { color: #1d3557; }
.grid { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 0; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: .82em; color: #56606b; margin-top: 4px; }
.method { border-top: 1px solid #e3e7eb; padding-top: 14px; margin-top: 14px; }
.method:first-of-type { border-top: none; margin-top: 0; padding-top: 0; }
.prov { font-size: .82em; color: #46505b; margin: 2px 0 10px; }
.prov code { background: #f1f3f5; padding: 1px 4px; border-radius: 3px; }
nav { font-size: .9em; margin-top: 14px; }
nav a { margin-right: 14px; color: #1d3557; }
.scroll { overflow-x: auto; }
table.overlays { border-collapse: collapse; font-size: .82em; }
table.overlays th, table.overlays td { padding: 2px 3px; }
table.overlays th[scope=row] { text-align: right; font-weight: 600; padding-right: 8px; white-space: nowrap; }
table.overlays thead th { font-weight: normal; color: #56606b; }
table.overlays img { display: block; image-rendering: pixelated; }
table.concepts img { display: inline-block; margin-right: 2px; }
.heatmap { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: .9em; line-height: 2; }
.textrow { white-space: pre-wrap; } .textrow .idx { color: #9aa3ab; margin-right: 8px; }
.tok { border-radius: 3px; padding: 1px 0; } .gen { font-weight: 700; color: #1d3557; }
footer { color: #7a848e; font-size: .8em; margin-top: 28px; text-align: center; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_benchmark(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("table", "importances"))


def labelled(importances: Sequence[Importance]) -> dict[str, Importance]:
    """Method names as labels, made unique (``ablation``, ``ablation #2``)."""
    out: dict[str, Importance] = {}
    for imp in importances:
        base = imp.method or "importance"
        label, i = base, 1
        while label in out:
            i += 1
            label = f"{base} #{i}"
        out[label] = imp
    return out


def _is_cloud(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("rank_ranges", "median_importance"))


def _collect(result: Any) -> tuple[Any, dict[str, Importance]]:
    """(benchmark result or None, label -> Importance)."""
    if _is_cloud(result):  # a RashomonCloud: its median importance, and its own section
        imp = result.median_importance()
        return None, {imp.method: imp}
    if isinstance(result, Importance):
        return None, {result.method or "importance": result}
    if _is_benchmark(result):
        return result, dict(result.importances)
    if isinstance(result, Mapping) and all(isinstance(v, Importance) for v in result.values()):
        return None, {str(k): v for k, v in result.items()}
    if isinstance(result, (list, tuple)) and all(isinstance(v, Importance) for v in result):
        return None, labelled(result)
    raise InputError(
        f"cannot build a report from a {type(result).__name__}: pass a BenchmarkResult (whatmatters.evaluate."
        "benchmark), an Importance, or a list or dict of Importance objects"
    )


def describe_model(model: Any) -> str:
    """A one-line description: class, library and size."""
    if model is None:
        return "not given"
    if isinstance(model, str):
        return model
    if isinstance(model, torch.nn.Module):
        n = sum(p.numel() for p in model.parameters())
        return f"{type(model).__name__} (PyTorch, {n:,} parameters)"
    steps = getattr(model, "steps", None)
    if isinstance(steps, list):
        return " → ".join(type(step).__name__ for _, step in steps) + " (scikit-learn pipeline)"
    module = type(model).__module__.split(".")[0]
    return f"{type(model).__name__} ({module})" if module not in ("builtins", "__main__") else type(model).__name__


def _data_shape(data: Any, importances: Mapping[str, Importance]) -> str:
    if data is not None:
        shape = getattr(data, "shape", None) or np.shape(data)
        return " × ".join(str(int(s)) for s in shape)
    for imp in importances.values():
        units = "×".join(map(str, imp.unit_shape))
        if imp.per_sample:
            return f"{imp.n_samples} samples × {units} {imp.unit}s"
        return f"{units} {imp.unit}s (aggregated)"
    return "unknown"


def _format(value: Any, seconds: bool = False) -> str:
    if value is None:
        return "–"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _e(value)
    if not math.isfinite(v):
        return "–"
    return f"{v:.3g}" if seconds else f"{v:.4g}"


def _reference(result: Any) -> str | None:
    """Label of the random-scores reference row of a benchmark, if any."""
    return getattr(result, "reference", None)


def _metrics_table(result: Any) -> str:
    table = result.table
    reference = _reference(result)
    info: Mapping[str, tuple[str, bool]] = dict(getattr(result, "metric_info", {}) or {})
    info.setdefault("seconds", ("cost", False))
    columns = [c for c in table.columns if c != "error"]
    best: dict[str, set[Any]] = {}
    ranked = table.drop(index=[reference], errors="ignore") if reference is not None else table
    for col in columns:
        if col not in info:
            continue
        values = np.asarray(ranked[col], dtype=float)
        finite = np.isfinite(values)
        if finite.sum() < 2:
            continue
        target = np.nanmax(values) if info[col][1] else np.nanmin(values)
        best[col] = {idx for idx, v in zip(ranked.index, values) if np.isfinite(v) and v == target}
    head = ["<th>method</th>"]
    for col in columns:
        if col in info:
            category, higher = info[col]
            arrow = "↑" if higher else "↓"
            tip = f"{'higher' if higher else 'lower'} is better"
            head.append(
                f'<th title="{_e(tip)}">{_e(col)} <span class="arrow" aria-label="{_e(tip)}">{arrow}</span>'
                f"<small>{_e(category)}</small></th>"
            )
        else:
            head.append(f"<th>{_e(col)}</th>")
    rows = []
    for idx, row in table.iterrows():
        is_ref = reference is not None and idx == reference
        label = f"{_e(idx)} <small>(reference: random scores)</small>" if is_ref else _e(idx)
        cells = [f"<td>{label}</td>"]
        for col in columns:
            text = _format(row[col], seconds=col == "seconds")
            classes = ["best"] if idx in best.get(col, ()) else []
            if text == "–":
                classes.append("na")
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{cls}>{text}</td>")
        rows.append('<tr class="ref">' if is_ref else "<tr>")
        rows[-1] += "".join(cells) + "</tr>"
    errors = ""
    if "error" in table.columns:
        failed = [(idx, msg) for idx, msg in table["error"].items() if isinstance(msg, str) and msg]
        if failed:
            items = "".join(f"<li><b>{_e(idx)}</b>: {_e(msg)}</li>" for idx, msg in failed)
            errors = f'<div class="errors"><p>Failed (scores shown as –):</p><ul>{items}</ul></div>'
    return (
        '<div class="scroll"><table class="metrics"><thead><tr>'
        + "".join(head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
        + errors
    )


_CURVE_NOTES = {
    "deletion": "units removed most important first: a faithful ranking makes the output fall fast (small area)",
    "insertion": "units inserted most important first: a faithful ranking makes the output rise fast (large area)",
}


def _curve_order(kind: str) -> tuple[int, str]:
    base = kind.split(" (")[0]
    return ({"deletion": 0, "insertion": 1}.get(base, 2), kind)


# Figures are drawn at _DPI and shown at 100 pixels per inch: sharp on high-density screens.
_DPI = 150


def _img(fig: Any, alt: str, caption: str | None = None) -> str:
    """A <figure> with ``fig`` as an inline PNG (the figure is closed)."""
    png = plots.figure_to_png(fig, dpi=_DPI)
    width, height = (int.from_bytes(png[i : i + 4], "big") * 100 // _DPI for i in (16, 20))
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (
        f'<figure style="max-width:{width}px"><img src="{uri}" alt="{_e(alt)}" width="{width}" '
        f'height="{height}">{cap}</figure>'
    )


def agreement_matrix(importances: Mapping[str, Importance]):
    """Pairwise Spearman correlation of the importances' mean |score| per unit, as a DataFrame.

    The same measure as ``BenchmarkResult.agreement``. None when fewer than two importances share
    one unit shape.
    """
    import pandas as pd

    from whatmatters.evaluate.agreement import rank_agreement

    items = list(importances.items())
    if len(items) < 2 or len({imp.unit_shape for _, imp in items}) != 1:
        return None
    labels = [label for label, _ in items]
    aggregated = [imp.aggregate() for _, imp in items]
    matrix = np.eye(len(items))
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            matrix[i, j] = matrix[j, i] = rank_agreement(aggregated[i], aggregated[j])["spearman"]
    return pd.DataFrame(matrix, index=labels, columns=labels)


def _images(data: Any) -> Any:
    """``data`` as an array when it may hold images (3 or 4 dimensions), else None."""
    if data is None or hasattr(data, "columns"):
        return None
    shape = getattr(data, "shape", None) or np.shape(data)
    return data if len(shape) in (3, 4) else None


def _provenance(imp: Importance) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in imp.params.items()) or "defaults"
    target = imp.target
    if isinstance(target, list) and len(target) > 8:
        target = f"per sample ({len(target)} values)"
    parts = [
        f"unit <code>{_e(imp.unit)}</code>",
        f"shape <code>{_e(tuple(imp.values.shape))}</code>",
        f"target <code>{_e(target)}</code>",
        f"seed <code>{_e(imp.seed)}</code>",
        f"seconds <code>{_format(imp.seconds, seconds=True)}</code>",
        f"params <code>{_e(params)}</code>",
    ]
    return '<p class="prov">' + " · ".join(parts) + "</p>"


def _method_section(
    label: str, imp: Importance, k: int, max_samples: int, data: Any = None, in_grid: bool = False
) -> str:
    figures = []
    if text_heatmaps.is_text(imp):  # tokens / words: the text itself, coloured
        return (
            f'<div class="method"><h3>{_e(label)}</h3>{_provenance(imp)}'
            + text_heatmaps.html_heatmap(imp, max_samples)
            + "</div>"
        )
    if len(imp.unit_shape) == 1:
        n_bars = min(k, imp.n_units)
        fig = plots.new_figure(4.2, 0.22 * n_bars + 1.1)
        plots.bar_chart(imp, ax=fig.subplots(), k=k, title=f"{label}: top {n_bars} {imp.unit}s")
        figures.append(_img(fig, f"ranked bar chart of {label}"))
    if len(imp.unit_shape) == 1 and imp.per_sample:
        n_units = min(30, imp.n_units)
        n_rows = min(max_samples, imp.n_samples or 1)
        fig = plots.new_figure(min(6.3, 0.16 * n_units + 2.0), max(2.0, 0.1 * n_rows + 2.2))
        plots.sample_heatmap(imp, ax=fig.subplots(), max_samples=max_samples, title=f"{label}: per-sample scores")
        figures.append(
            _img(
                fig,
                f"per-sample attribution heatmap of {label}",
                "red raises the explained output, blue lowers it; units sorted by mean |score|",
            )
        )
    if len(imp.unit_shape) > 1 and not in_grid:
        n_maps = min(8, imp.n_samples or 1)
        fig = plots.new_figure(2.0 * n_maps + 1.0, 2.5)
        plots.sample_maps(imp, fig=fig, max_samples=8, title=f"{label}: per-sample maps", images=data)
        figures.append(_img(fig, f"per-sample attribution maps of {label}"))
    if is_concept_bank(imp):
        figures.append(_concept_gallery(label, imp, data))
    anchor = "m-" + "".join(c if c.isalnum() else "-" for c in label)
    return (
        f'<div class="method" id="{_e(anchor)}"><h3>{_e(label)}</h3>{_provenance(imp)}'
        + ('<p class="prov">Maps: see <a href="#overlays">the overlays</a>.</p>' if in_grid else "")
        + f'<div class="grid">{"".join(figures)}</div></div>'
    )


def _concept_gallery(label: str, imp: Importance, images: Any) -> str:
    """A table with one row per concept: its importance, most representative crops, and maps over images."""
    if images is None:
        return '<p class="prov">Pass the explained images as <code>data=</code> to see the concepts\' crops.</p>'
    rows = []
    for name, value, crops, maps in concept_cells(imp, images):
        crop_html = "".join(_png_img(c, f"{label} {name} crop {i}", "input") for i, c in enumerate(crops))
        map_html = "".join(_png_img(c, f"{label} {name} on image {i}", "overlay") for i, c in enumerate(maps))
        rows.append(f'<tr><th scope="row">{_e(name)}<br>{value:.3f}</th><td>{crop_html}</td><td>{map_html}</td></tr>')
    return (
        '<div class="scroll"><table class="overlays concepts"><thead><tr><th>concept, importance</th>'
        "<th>most representative crops</th><th>where it is (layer resolution)</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _png_img(array: np.ndarray, alt: str, cls: str) -> str:
    """An inline ``<img>`` of an RGB uint8 array, shown at its pixel size."""
    uri = "data:image/png;base64," + base64.b64encode(plots.array_to_png(array)).decode("ascii")
    height, width = array.shape[:2]
    return f'<img class="{cls}" src="{uri}" alt="{_e(alt)}" width="{width}" height="{height}">'


def _grid_members(shown: Mapping[str, Importance]) -> dict[str, Importance]:
    """The per-sample importances with 2-D (or channels x 2-D) units: drawn in the overlay grid."""
    return {
        label: imp
        for label, imp in shown.items()
        if imp.per_sample and len(imp.unit_shape) in (2, 3) and not text_heatmaps.is_text(imp)
    }


def _overlay_section(
    members: Mapping[str, Importance], images: Any, max_images: int, mean: Any = None, std: Any = None
) -> str:
    """Methods (rows) x images (columns): each method's map over each input image, one PNG per cell."""
    n = min(max_images, *(imp.n_samples or 1 for imp in members.values()))
    under = None
    if images is not None and len(images) >= n:
        try:
            under = plots.image_cells(images[:n], mean=mean, std=std)
        except InputError:  # not (n, 1 or 3, H, W) images: draw the maps alone
            under = None
    head = ["<th></th>"] + [f"<th>image {i}</th>" for i in range(n)]
    rows = []
    if under is not None:
        cells = "".join(f"<td>{_png_img(under[i], f'input image {i}', 'input')}</td>" for i in range(n))
        rows.append(f'<tr><th scope="row">input</th>{cells}</tr>')
    for label, imp in members.items():
        rgb = plots.overlay_cells(imp.values[:n], images[:n] if under is not None else None, mean=mean, std=std)
        cells = "".join(f"<td>{_png_img(rgb[i], f'{label} on image {i}', 'overlay')}</td>" for i in range(n))
        rows.append(f'<tr><th scope="row">{_e(label)}</th>{cells}</tr>')
    note = (
        "Each method's map drawn over the input image (half transparent), one column per image."
        if under is not None
        else "The maps alone (pass the explained images as <code>data=</code> to draw them over the images)."
    )
    note += (
        " Maps that are never negative (CAMs) run from black/purple (0) to yellow (the map's 99th percentile); "
        "signed maps are red where the pixel raises the explained output and blue where it lowers it, "
        "symmetric at the map's 99th percentile of |score|. Each map is scaled on its own; channels are summed."
    )
    return (
        f'<section id="overlays"><h2>Maps over the images</h2><p class="note">{note}</p>'
        '<div class="scroll"><table class="overlays"><thead><tr>'
        + "".join(head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div></section>"
    )


def _cloud_section(cloud: Any, k: int) -> str:
    """The cloud plot, the rank ranges (plot and table) and the interactions of a RashomonCloud."""
    from whatmatters.report import rashomon

    info = cloud.info
    kept = len(cloud.models)
    losses = info.get("losses")
    note = f"{kept} models" + (
        f" of {len(losses)} candidates within {info.get('tolerance')} of the best held-out {info.get('loss')} "
        f"({float(np.min(losses)):.4g})"
        if losses is not None
        else ""
    )
    figs = []
    for draw, alt in ((rashomon.cloud_plot, "importance cloud"), (rashomon.rank_plot, "rank ranges")):
        fig = plots.new_figure(6.5, 0.32 * min(k, len(cloud.names)) + 1.3)
        draw(cloud, ax=fig.subplots(), k=k)
        figs.append(_img(fig, alt))
    if cloud.pairs:
        fig = plots.new_figure(5.5, 0.32 * min(15, len(cloud.pairs)) + 1.3)
        rashomon.interaction_plot(cloud, ax=fig.subplots())
        figs.append(_img(fig, "pairwise interactions"))
    frame = cloud.rank_ranges().head(k)
    head = "".join(f"<th>{_e(c)}</th>" for c in ["feature", *frame.columns])
    body = "".join(
        "<tr><td>" + _e(name) + "</td>" + "".join(f"<td>{_format(v)}</td>" for v in row) + "</tr>"
        for name, row in zip(frame.index, frame.to_numpy())
    )
    return (
        f'<section id="rashomon"><h2>Rashomon set: importance across near-equally good models</h2>'
        f'<p class="note">{_e(note)}. Features in red (unstable = 1) reach the top in some model while '
        "their rank moves by several places across the set: trust their rank less. Interactions: share of "
        'the output variance due to the pair acting together.</p><div class="grid">' + "".join(figs) + "</div>"
        f'<div class="scroll"><table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
        "</table></div></section>"
    )


def render_report(
    result: Any,
    title: str = "whatmatters report",
    data: Any = None,
    *,
    model: Any = None,
    k: int = 20,
    max_samples: int = 40,
    max_images: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> str:
    """The report as an HTML string (see :func:`write_report`)."""
    bench, importances = _collect(result)
    if not importances:
        raise InputError("the result holds no importances to report")
    reference = _reference(bench)
    model = model if model is not None else getattr(bench, "model", None)
    methods = list(bench.table.index) if bench is not None else list(importances)
    shown = {label: imp for label, imp in importances.items() if label != reference}
    units = sorted({imp.unit for imp in importances.values()})
    meta = {
        **({"model": describe_model(model)} if model is not None else {}),
        "data": _data_shape(data, importances),
        "units": ", ".join(units),
        "methods": str(len([m for m in methods if m != reference])),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "whatmatters": __version__,
    }
    header = "".join(f'<div class="item"><dt>{_e(k_)}</dt><dd>{_e(v)}</dd></div>' for k_, v in meta.items())
    sections: list[str] = []
    nav: list[tuple[str, str]] = []

    if bench is not None and len(bench.table):
        nav.append(("metrics", "Metrics"))
        ref_note = (
            f" The row {_e(reference)} scores units at random: a method should beat it."
            if reference is not None
            else ""
        )
        sections.append(
            '<section id="metrics"><h2>Metrics</h2><p class="note">One row per method. ↑: higher is better, '
            "↓: lower is better; the best value of each column is highlighted. Seconds: wall time of the "
            f"scoring call.{ref_note}</p>" + _metrics_table(bench) + "</section>"
        )

    if _is_cloud(result):
        nav.append(("rashomon", "Rashomon set"))
        sections.append(_cloud_section(result, k))

    ordered = [m for m in methods if m in shown] + [m for m in shown if m not in methods]
    members = _grid_members({m: shown[m] for m in ordered})
    if members:  # pixel maps: a methods x images grid of overlays, right after the metrics
        nav.append(("overlays", "Overlays"))
        sections.append(_overlay_section(members, _images(data), max_images, mean, std))

    curve_data = getattr(bench, "curves", None) or {}
    # "<kind>_random" curves (each method's units in random order) repeat what the reference row shows
    kinds = {kind for by_kind in curve_data.values() for kind in by_kind if not kind.split(" (")[0].endswith("_random")}
    kinds = sorted(kinds, key=_curve_order)
    if kinds:
        figs = []
        for kind in kinds:
            fig = plots.new_figure(5.0, 3.6)
            plots.curves(curve_data, kind=kind, ax=fig.subplots(), reference=reference)
            figs.append(_img(fig, f"{kind} curves", _CURVE_NOTES.get(kind.split(" (")[0])))
        nav.append(("curves", "Curves"))
        sections.append(
            '<section id="curves"><h2>Deletion and insertion curves</h2><p class="note">Mean output for the '
            "explained target over the samples, as units are removed from (deletion) or restored into "
            "(insertion) the input in the order each method ranks them.</p>"
            '<div class="grid">' + "".join(figs) + "</div></section>"
        )

    agreement = getattr(bench, "agreement", None) if bench is not None else agreement_matrix(importances)
    if agreement is not None and len(agreement):
        known = [label for label in agreement.index if np.isfinite(np.asarray(agreement.loc[label], float)).any()]
        agreement = agreement.loc[known, known]
    if agreement is not None and len(agreement) >= 2:
        size = min(9.0, max(3.2, 0.5 * len(agreement) + 2.0))
        fig = plots.new_figure(size + 0.9, size)
        plots.agreement_heatmap(agreement, ax=fig.subplots())
        nav.append(("agreement", "Agreement"))
        sections.append(
            '<section id="agreement"><h2>Agreement between methods</h2><p class="note">Spearman rank correlation '
            "of the methods' mean |score| per unit. 1: same ranking; 0: unrelated; −1: reversed.</p>"
            + _img(fig, "method agreement heatmap")
            + "</section>"
        )

    ordered = [m for m in methods if m in shown] + [m for m in shown if m not in methods]
    images = _images(data)
    notes = []
    if any(text_heatmaps.is_text(imp) for imp in shown.values()):
        notes.append(
            "Text: each token (or word) on a background that is red where it raises the explained output and blue "
            "where it lowers it, strongest at the line's largest |score| (hover for the score); a generative "
            "model's lines explain the token after the arrow."
        )
    if any(len(imp.unit_shape) == 1 and not text_heatmaps.is_text(imp) for imp in shown.values()):
        notes.append(
            "Bars: the most important units (length: mean |score| over samples; red if the unit raises the "
            "explained output on average, blue if it lowers it; methods that give one score per unit are drawn "
            "as they are, grey when no score is negative). Heatmap: the score of every shown sample and unit."
        )
    if any(
        len(imp.unit_shape) > 1 and label not in members and not text_heatmaps.is_text(imp)
        for label, imp in shown.items()
    ):
        notes.append(
            "Maps: scores per pixel (channels summed"
            + (", over the input image" if images is not None else "")
            + "); red raises the explained output, blue lowers it."
        )
    nav.append(("methods", "Methods"))
    sections.append(
        f'<section id="methods"><h2>Scores by method</h2><p class="note">{" ".join(notes)}</p>'
        + "".join(_method_section(m, shown[m], k, max_samples, images, m in members) for m in ordered)
        + "</section>"
    )
    links = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in nav)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><dl>{header}</dl></header><main><nav>{links}</nav>"
        + "".join(sections)
        + f"<footer>made with whatmatters {_e(__version__)}</footer></main></body></html>\n"
    )


def write_report(
    result: Any,
    path: str | Path,
    title: str = "whatmatters report",
    data: Any = None,
    *,
    model: Any = None,
    k: int = 20,
    max_samples: int = 40,
    max_images: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Path:
    """Write a single self-contained HTML file and return its path.

    Args:
        result: a ``BenchmarkResult`` from ``whatmatters.evaluate.benchmark`` (metrics table, curves,
            agreement and charts), or an ``Importance``, a list or a dict of them (charts and agreement).
        path: where to write the ``.html`` file (parent folders are created).
        title: the page title.
        data: the explained data, for its shape in the header.
        model: the model (or a description string), for the header.
        k: bars per ranked bar chart.
        max_samples: rows per per-sample heatmap.
        max_images: columns of the overlay grid (pixel importances: methods x images, each map over
            its image when ``data`` holds the images).
        mean, std: the images' normalization, undone to show them (default: each image min-max scaled).
    """
    text = render_report(
        result, title, data, model=model, k=k, max_samples=max_samples, max_images=max_images, mean=mean, std=std
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
