"""A self-contained HTML page of a tuning run: layer scores over steps, the layers chosen at each step."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from whatmatters._version import __version__
from whatmatters.core.errors import InputError

_CSS = (
    "body{font-family:Arial,sans-serif;margin:0 auto;max-width:1100px;padding:20px;color:#1d2733}"
    "h1{color:#1d3557}table{border-collapse:collapse;font-size:.85em}td,th{padding:3px 10px;"
    "border-bottom:1px solid #e3e7eb;text-align:right}img{max-width:100%}.note{color:#56606b;font-size:.88em}"
)


def _scores_figure(tuner: Any):
    from whatmatters.report import plots

    scores = np.array([r["scores"] for r in tuner.history])
    fig = plots.new_figure(7.5, 3.6)
    ax = fig.subplots()
    steps = [r["step"] for r in tuner.history]
    for j, name in enumerate(tuner.names):
        ax.plot(steps, scores[:, j], label=".".join(name.split(".")[-2:]), lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("layer score (higher = more important)")
    ax.legend(fontsize=7, ncol=2)
    return fig


def _choices_figure(tuner: Any):
    from whatmatters.report import plots

    grid = np.zeros((tuner.n_layers, len(tuner.history)))
    for i, r in enumerate(tuner.history):
        grid[r["active"], i] = 1
    fig = plots.new_figure(7.5, 0.3 * tuner.n_layers + 1.2)
    ax = fig.subplots()
    ax.imshow(grid, aspect="auto", cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
    ax.set_yticks(range(tuner.n_layers), [n.rsplit(".", 1)[-1] for n in tuner.names], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    return fig


def render_tune_report(tuner: Any, title: str = "whatmatters tune", summary: dict[str, Any] | None = None) -> str:
    """The page as a string: a summary table, the score and choice plots, and the per-step choices."""
    from whatmatters.report import plots

    if not tuner.history:
        raise InputError("the tuner has run no steps; train with tuner.step(...) before writing its report")
    e = html.escape
    rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in (summary or {}).items())
    steps = "".join(
        f"<tr><td>{r['step']}</td><td>{e(', '.join(str(a) for a in r['active']))}</td>"
        f"<td>{r.get('loss', float('nan')):.4f}</td></tr>"
        for r in tuner.history
    )
    names = "".join(f"<tr><td>{j}</td><td>{e(n)}</td></tr>" for j, n in enumerate(tuner.names))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1><table>{rows}</table>"
        '<h2>Layer scores over steps</h2><p class="note">The tuner\'s score of each layer after every step '
        "(IST: learned from suppression probes; LISA: the share of steps the layer trained).</p>"
        f'<img alt="layer scores over steps" src="{plots.figure_to_data_uri(_scores_figure(tuner))}">'
        '<h2>Layers chosen at each step</h2><p class="note">Dark: the layer trained at that step.</p>'
        f'<img alt="layers chosen per step" src="{plots.figure_to_data_uri(_choices_figure(tuner))}">'
        f"<h2>Layers</h2><table><tr><th>index</th><th>layer</th></tr>{names}</table>"
        f"<h2>Per-step choices</h2><table><tr><th>step</th><th>trained layers</th><th>loss</th></tr>{steps}</table>"
        f'<p class="note">made with whatmatters {e(__version__)}</p></body></html>\n'
    )


def write_tune_report(tuner: Any, path: str | Path, title: str = "whatmatters tune", **kwargs: Any) -> Path:
    """Write :func:`render_tune_report` to ``path`` (parent folders created) and return the path."""
    return write_page(render_tune_report(tuner, title, **kwargs), path)


def _loss_figure(losses: list[float], sparsities: list[float] | None):
    from whatmatters.report import plots

    fig = plots.new_figure(7.5, 3.2)
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses, lw=1.2, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if sparsities:
        twin = ax.twinx()
        twin.plot(range(1, len(sparsities) + 1), sparsities, color="#c0392b", lw=1.4, label="sparsity")
        twin.set_ylabel("sparsity (schedule)")
    return fig


def render_sparse_report(
    rows: list[dict[str, Any]],
    losses: list[float],
    title: str = "whatmatters tune",
    summary: dict[str, Any] | None = None,
    sparsities: list[float] | None = None,
) -> str:
    """The page of a weight-level sparse fine-tune (LIFT, PST): a summary, the loss (and sparsity) over steps and
    one row per tuned layer."""
    from whatmatters.report import plots

    if not losses or not rows:
        raise InputError("the sparse tuner has run no steps or tunes no layer; train it before writing its report")
    e = html.escape
    head = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in (summary or {}).items())
    columns = list(rows[0])
    table = "<tr>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{e(str(r[c]))}</td>" for c in columns) + "</tr>" for r in rows)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1><table>{head}</table>"
        "<h2>Loss over steps</h2>"
        f'<img alt="loss over steps" src="{plots.figure_to_data_uri(_loss_figure(losses, sparsities))}">'
        f"<h2>Tuned layers</h2><table>{table}</table>"
        f'<p class="note">made with whatmatters {e(__version__)}</p></body></html>\n'
    )


def write_page(text: str, path: str | Path) -> Path:
    """Write a rendered page to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
