"""Plots of a Rashomon importance cloud: importance per model, rank ranges, pairwise interactions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from whatmatters.report.plots import NEGATIVE, NEUTRAL, POSITIVE, _axes

if TYPE_CHECKING:
    from whatmatters.evaluate.rashomon_cloud import RashomonCloud


def _finish(ax: Any, labels: list[str], flagged: set[str], xlabel: str, title: str) -> Any:
    ax.set_yticks(range(len(labels)), labels)
    for tick, label in zip(ax.get_yticklabels(), labels):
        if label in flagged:
            tick.set_color(POSITIVE)
            tick.set_fontweight("bold")
    ax.set_ylim(len(labels) - 0.5, -0.5)  # the most important on top
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.figure.tight_layout()
    return ax


def cloud_plot(cloud: RashomonCloud, ax: Any = None, k: int = 20) -> Any:
    """Every kept model's importance of the ``k`` features with the highest median (one dot per model),
    the min-max range (thin line) and the quartiles (thick line); unstable features' names in red."""
    order = cloud.order()[:k]
    values = cloud.values.numpy()[:, order]
    labels = [cloud.names[j] for j in order]
    ax = _axes(ax, 6.5, 0.32 * len(labels) + 1.3)
    rows = np.arange(len(order))
    q1, q3 = np.quantile(values, [0.25, 0.75], axis=0)
    ax.hlines(rows, values.min(0), values.max(0), color=NEUTRAL, lw=1)
    ax.hlines(rows, q1, q3, color=NEGATIVE, lw=5, alpha=0.6)
    jitter = np.random.default_rng(0).uniform(-0.18, 0.18, values.shape)
    ax.scatter(values.ravel(), (rows + jitter).ravel(), s=9, color="#1d3557", alpha=0.6, zorder=3)
    ax.axvline(0, color="#999", lw=0.8)
    title = f"{cloud.method} over {len(cloud.models)} near-equally good models (red: unstable rank)"
    return _finish(ax, labels, set(cloud.unstable()), "importance", title)


def rank_plot(cloud: RashomonCloud, ax: Any = None, k: int = 20) -> Any:
    """The rank range (min to max over the set) and median rank of the ``k`` features of highest median."""
    order = cloud.order()[:k]
    r = cloud.ranks().numpy()[:, order]
    labels = [cloud.names[j] for j in order]
    ax = _axes(ax, 5.0, 0.32 * len(labels) + 1.3)
    rows = np.arange(len(order))
    ax.hlines(rows, r.min(0), r.max(0), color=NEGATIVE, lw=4, alpha=0.7)
    ax.scatter(np.median(r, 0), rows, color="#1d3557", zorder=3, s=16)
    return _finish(ax, labels, set(cloud.unstable()), "rank over the set (1 = most important)", "rank ranges")


def interaction_plot(cloud: RashomonCloud, ax: Any = None, k: int = 15) -> Any:
    """Median (bar) and min-max (line) interaction strength of the ``k`` strongest measured pairs."""
    frame = cloud.interactions().head(k)
    labels = [f"{a} × {b}" for a, b in zip(frame["feature_a"], frame["feature_b"])]
    ax = _axes(ax, 5.5, 0.32 * max(1, len(labels)) + 1.3)
    rows = np.arange(len(labels))
    ax.barh(rows, frame["strength_median"], color=NEUTRAL, alpha=0.8)
    ax.hlines(rows, frame["strength_min"], frame["strength_max"], color="#1d3557", lw=1.2)
    return _finish(ax, labels, set(), "share of output variance (superset importance)", "pairwise interactions")
