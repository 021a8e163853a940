"""Matplotlib figures for importances (headless: the Agg backend is used when no display exists)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import matplotlib

if not matplotlib.get_backend() or matplotlib.get_backend().lower() in ("", "agg"):
    matplotlib.use("Agg")

if TYPE_CHECKING:
    from whatmatters.core.importance import Importance


def bar_chart(importance: Importance, ax: Any = None, k: int = 20, title: str | None = None, **bar_kwargs: Any):
    """Horizontal bars of the ``k`` most important units (mean |score| over samples), largest on top."""
    import matplotlib.pyplot as plt

    agg = importance.aggregate("mean_abs") if importance.per_sample else importance
    top = agg.top(k)
    labels = [str(name) for name, _ in top][::-1]
    scores = [score for _, score in top][::-1]
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.3 * len(labels) + 1.2))
    colors = ["#c0392b" if s < 0 else "#2e86c1" for s in scores]
    ax.barh(labels, scores, color=colors, **bar_kwargs)
    ax.set_xlabel("mean |importance|" if importance.per_sample else "importance")
    ax.set_title(title or f"{importance.method}: top {len(labels)} {importance.unit}s")
    ax.figure.tight_layout()
    return ax
