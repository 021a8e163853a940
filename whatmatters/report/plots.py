"""Matplotlib figures for importances and benchmark results.

Every function draws on ``ax`` when given, else on a new pyplot figure, and returns the axes. The
report builds its figures with :func:`new_figure` (not registered with pyplot, so nothing leaks) and
turns them into base64 PNG data URIs with :func:`figure_to_data_uri`, which also closes them.
Headless: the Agg backend is used when no display exists.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np

if not matplotlib.get_backend() or matplotlib.get_backend().lower() in ("", "agg"):
    matplotlib.use("Agg")

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from whatmatters.core.importance import Importance

POSITIVE = "#d6604d"  # red: raises the explained output
NEGATIVE = "#4393c3"  # blue: lowers it
NEUTRAL = "#6c7a89"  # unsigned scores
DIVERGING = "RdBu_r"  # red = pushes the target output up, blue = down


def new_figure(width: float, height: float) -> Figure:
    """A figure outside pyplot's registry (garbage-collected like any object, never shown)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _axes(ax: Any, width: float, height: float) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(width, height))
    return ax


def figure_to_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of ``fig``; the figure is closed afterwards."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def figure_to_data_uri(fig: Figure, dpi: int = 110) -> str:
    """``data:image/png;base64,...`` of ``fig`` (for self-contained HTML); the figure is closed."""
    return "data:image/png;base64," + base64.b64encode(figure_to_png(fig, dpi)).decode("ascii")


def _finite_limit(values: np.ndarray, quantile: float = 0.99) -> float:
    """A symmetric colour limit: the ``quantile`` of |values| (robust to a few outliers), never 0."""
    finite = np.abs(values[np.isfinite(values)])
    if finite.size == 0:
        return 1.0
    limit = float(np.quantile(finite, quantile)) if finite.size > 20 else float(finite.max())
    return limit if limit > 0 else (float(finite.max()) or 1.0)


def bar_chart(importance: Importance, ax: Any = None, k: int = 20, title: str | None = None, **bar_kwargs: Any):
    """Horizontal bars of the ``k`` most important units (mean |score| over samples), largest on top.

    For per-sample scores a bar's colour is the sign of the unit's mean score: red when it raises the
    explained output on average, blue when it lowers it (the colours of the diverging heatmaps).
    Aggregated scores are drawn as they are: grey when none is negative (magnitudes such as
    KAN-L1 or D'Hondt seats), else red for positive and blue for negative scores.
    """
    flat = importance._flat().detach().cpu().double().numpy()
    length = np.abs(flat).mean(0) if importance.per_sample else flat[0]
    sign = flat.mean(0) if importance.per_sample else flat[0]
    order = np.argsort(-np.nan_to_num(np.abs(length), nan=-1.0), kind="stable")[:k]
    names = (
        _unit_labels(importance)
        if len(importance.unit_shape) == 1
        else [str(tuple(int(j) for j in np.unravel_index(i, importance.unit_shape))) for i in range(importance.n_units)]
    )
    labels = [names[i] for i in order][::-1]
    scores = length[order][::-1]
    if not importance.per_sample and not (np.nan_to_num(sign) < 0).any():
        colors = [NEUTRAL] * len(labels)
    else:
        colors = [NEGATIVE if s < 0 else POSITIVE for s in sign[order][::-1]]
    ax = _axes(ax, 6, 0.3 * len(labels) + 1.2)
    ax.barh(labels, scores, color=colors, **bar_kwargs)
    ax.set_xlabel("mean |score|" if importance.per_sample else "score")
    ax.set_title(title or f"{importance.method or 'importance'}: top {len(labels)} {importance.unit}s", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.figure.tight_layout()
    return ax


def _unit_labels(importance: Importance) -> list[str]:
    if importance.names is not None:
        return list(importance.names)
    return [str(i) for i in range(importance.n_units)]


def sample_heatmap(
    importance: Importance,
    ax: Any = None,
    max_samples: int = 40,
    max_units: int = 30,
    title: str | None = None,
):
    """Per-sample scores as a samples x units grid (diverging colours, units by mean |score|).

    Shows the first ``max_samples`` samples and the ``max_units`` units with the largest mean
    |score|, most important on the left. Only for one-dimensional units (features, tokens, ...);
    use :func:`sample_maps` for pixels.
    """
    if len(importance.unit_shape) != 1:
        from whatmatters.core.errors import InputError

        raise InputError(
            f"sample_heatmap needs one-dimensional units, got unit shape {importance.unit_shape}; use sample_maps"
        )
    values = importance._flat().detach().cpu().double().numpy()[:max_samples]
    labels = np.asarray(_unit_labels(importance))
    order = np.argsort(-np.nan_to_num(np.abs(values).mean(0), nan=-1.0), kind="stable")[:max_units]
    values, labels = values[:, order], labels[order]
    ax = _axes(ax, max(4.0, 0.28 * len(labels) + 2.0), max(2.0, 0.16 * len(values) + 2.2))
    limit = _finite_limit(values)
    image = ax.imshow(values, aspect="auto", cmap=DIVERGING, vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("sample" if importance.per_sample else "")
    if not importance.per_sample:
        ax.set_yticks([])
    n_total = importance.n_samples or 1
    shown = f"{len(values)} of {n_total} samples" if importance.per_sample else "aggregated"
    ax.set_title(title or f"{importance.method or 'importance'}: per-sample scores ({shown})", fontsize=10)
    bar = ax.figure.colorbar(image, ax=ax, fraction=0.035, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("score", fontsize=8)
    ax.figure.tight_layout()
    return ax


def _maps(importance: Importance) -> np.ndarray:
    """Per-sample 2-D maps ``(n, H, W)``: channels summed for ``(C, H, W)`` units."""
    values = importance.values.detach().cpu().double()
    if not importance.per_sample:
        values = values.unsqueeze(0)
    if values.ndim == 4:
        values = values.sum(1)
    elif values.ndim == 2:
        values = values.unsqueeze(1)
    elif values.ndim != 3:
        from whatmatters.core.errors import InputError

        raise InputError(f"cannot draw maps of unit shape {importance.unit_shape}; need (H, W) or (C, H, W)")
    return values.numpy()


def _display_images(images: Any, n: int, size: tuple[int, int]) -> np.ndarray | None:
    """Input images as grey ``(n, H, W)`` in [0, 1] (channels averaged; colours would mix with the map's),
    or None when they do not fit the maps."""
    array = images.detach().cpu().double().numpy() if hasattr(images, "detach") else np.asarray(images, dtype=float)
    array = array[:n]
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or tuple(array.shape[-2:]) != tuple(size) or len(array) < n:
        return None
    grey = array.mean(1)
    lo = grey.min(axis=(1, 2), keepdims=True)
    hi = grey.max(axis=(1, 2), keepdims=True)
    return (grey - lo) / np.where(hi > lo, hi - lo, 1.0)


def sample_maps(
    importance: Importance, fig: Any = None, max_samples: int = 8, title: str | None = None, images: Any = None
):
    """Per-sample maps of pixel (or other 2-D) importance side by side, channels summed.

    With ``images`` (the explained inputs, ``(n, C, H, W)`` or ``(n, H, W)``), each map is drawn
    half-transparent over its image.
    """
    maps = _maps(importance)[:max_samples]
    n = len(maps)
    if fig is None:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(2.0 * n + 0.8, 2.4))
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
    limit = _finite_limit(maps)
    under = _display_images(images, n, maps.shape[-2:]) if images is not None and importance.per_sample else None
    norm = matplotlib.colors.Normalize(-limit, limit)
    for i, (ax, m) in enumerate(zip(axes, maps)):
        if under is not None:
            ax.imshow(under[i], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        alpha = 0.65 if under is not None else 1.0
        ax.imshow(m, cmap=DIVERGING, norm=norm, interpolation="nearest", alpha=alpha)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"sample {i}" if importance.per_sample else "aggregated", fontsize=8)
    fig.suptitle(title or f"{importance.method or 'importance'}: per-sample maps", fontsize=10)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm, DIVERGING), ax=list(axes), fraction=0.02, pad=0.02)
    return fig


def agreement_heatmap(agreement: pd.DataFrame, ax: Any = None, title: str = "rank agreement (Spearman)"):
    """A methods x methods matrix of rank correlations in [-1, 1], values written in the cells."""
    matrix = np.asarray(agreement, dtype=float)
    labels = [str(c) for c in agreement.columns]
    size = max(3.2, 0.65 * len(labels) + 2.0)
    ax = _axes(ax, size + 0.8, size)
    image = ax.imshow(matrix, cmap=DIVERGING, vmin=-1, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(agreement.index)), [str(i) for i in agreement.index], fontsize=8)
    for (i, j), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if abs(value) > 0.6 else "black",
            )
    ax.set_title(title, fontsize=10)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.figure.tight_layout()
    return ax


def curves(
    curves_by_method: Mapping[str, Mapping[str, tuple[Any, Any]]],
    kind: str = "deletion",
    ax: Any = None,
    title: str | None = None,
    reference: str | None = None,
):
    """Deletion or insertion curves: mean target output against the fraction of units removed / inserted.

    ``curves_by_method`` maps a method to ``{kind: (fractions, mean outputs)}`` (``BenchmarkResult.curves``);
    the ``reference`` method (random scores) is drawn as a dashed grey line.
    """
    ax = _axes(ax, 5.5, 3.8)
    colors = matplotlib.colormaps["tab10"].colors
    drawn, i = 0, 0
    for method, by_kind in curves_by_method.items():
        if kind not in by_kind:
            continue
        fractions, outputs = (np.asarray(v, dtype=float).reshape(-1) for v in by_kind[kind])
        if method == reference:
            ax.plot(fractions, outputs, label=f"{method} (reference)", color="0.45", linestyle="--", linewidth=1.3)
        else:
            ax.plot(fractions, outputs, label=str(method), color=colors[i % len(colors)], linewidth=1.6)
            i += 1
        drawn += 1
    base = kind.split(" (")[0]
    verb = {"deletion": "removed", "insertion": "inserted"}.get(base, "changed")
    ax.set_xlabel(f"fraction of units {verb} (most important first)")
    ax.set_ylabel("mean target output")
    ax.set_title(title or f"{kind} curves", fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, frameon=False)
    ax.figure.tight_layout()
    return ax


def overlay_cells(
    maps: Any,
    images: Any = None,
    *,
    cell: int = 96,
    alpha: float = 0.5,
    signed: bool | None = None,
    mean: Any = None,
    std: Any = None,
) -> np.ndarray:
    """Heatmaps drawn over their images as RGB arrays ``(n, S, S', 3)`` uint8, all at once (no pyplot).

    ``maps``: an :class:`Importance` of pixels or ``(n, H, W)`` / ``(n, C, H, W)`` maps (channels
    summed); ``images``: the explained inputs ``(n, C, H, W)`` / ``(n, H, W)`` (undone with
    ``mean``/``std`` when given, else min-max scaled) or None for the maps alone. The colours are
    those of :mod:`whatmatters.vision.overlay`: maps that are never negative (``signed`` None and no
    negative value in any map, or ``signed=False``) in a sequential colour map from 0 to each map's
    99th percentile, signed maps in a diverging one centred on 0, symmetric at each map's 99th
    percentile of |score|. The longer image side is resized to ``cell`` pixels (images with
    nearest-neighbour upscaling or area downscaling, maps bilinearly).
    """
    import torch
    import torch.nn.functional as F

    from whatmatters.vision.overlay import DIVERGING as OVERLAY_DIVERGING
    from whatmatters.vision.overlay import SEQUENTIAL, as_maps, display_images

    m = torch.from_numpy(np.nan_to_num(as_maps(maps), nan=0.0, posinf=0.0, neginf=0.0))
    pictures = None
    if images is not None:
        pictures = torch.from_numpy(display_images(images, mean, std)).permute(0, 3, 1, 2)  # (n, 3, H, W)
        if len(pictures) < len(m):
            raise ValueError(f"{len(m)} maps but only {len(pictures)} images")
        pictures = pictures[: len(m)]
    height, width = pictures.shape[-2:] if pictures is not None else m.shape[-2:]
    scale = cell / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if pictures is not None and tuple(pictures.shape[-2:]) != size:
        mode = "nearest-exact" if scale >= 1 else "area"
        pictures = F.interpolate(pictures, size=size, mode=mode)
    if tuple(m.shape[-2:]) != size:
        m = F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    if signed is None:
        signed = bool((m < 0).any())
    flat = m.flatten(1)
    hi = torch.quantile(flat.abs() if signed else flat, 0.99, dim=1).view(-1, 1, 1)
    hi = torch.where(hi > 0, hi, torch.ones_like(hi))
    scaled = ((m / hi + 1) / 2 if signed else m / hi).clamp(0, 1).numpy()
    colours = matplotlib.colormaps[OVERLAY_DIVERGING if signed else SEQUENTIAL](scaled)[..., :3]  # (n, S, S', 3)
    if pictures is not None:
        colours = (1 - alpha) * pictures.permute(0, 2, 3, 1).numpy() + alpha * colours
    return np.round(np.clip(colours, 0, 1) * 255).astype(np.uint8)


def image_cells(images: Any, *, cell: int = 96, mean: Any = None, std: Any = None) -> np.ndarray:
    """The input images alone as RGB ``(n, S, S', 3)`` uint8, resized like :func:`overlay_cells`."""
    import torch
    import torch.nn.functional as F

    from whatmatters.vision.overlay import display_images

    pictures = torch.from_numpy(display_images(images, mean, std)).permute(0, 3, 1, 2)
    height, width = pictures.shape[-2:]
    scale = cell / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if tuple(pictures.shape[-2:]) != size:
        pictures = F.interpolate(pictures, size=size, mode="nearest-exact" if scale >= 1 else "area")
    return np.round(pictures.permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).astype(np.uint8)


def array_to_png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB ``(H, W, 3)`` uint8 array."""
    import matplotlib.image

    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, array, format="png")
    return buffer.getvalue()
