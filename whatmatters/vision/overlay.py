"""Heatmaps over images: one overlay, or a grid of methods x images, drawn with matplotlib, saved as PNG.

Maps are ``(n, H, W)`` (``(n, C, H, W)`` maps are summed over channels) or an :class:`Importance`
of pixels; a map of another size than its image is resized bilinearly. A method whose maps are never
negative (CAMs) is drawn with a sequential colour map from 0 to each map's 99th percentile; signed
maps (gradients, occlusion) with a diverging one centred on 0 (red raises the output, blue lowers
it), symmetric at each map's 99th percentile of |score|. Each map is scaled on its own.
Figures are built without pyplot (no global state, any backend).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from whatmatters.core.errors import InputError

SEQUENTIAL = "inferno"
DIVERGING = "RdBu_r"


def display_images(images: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """Images ``(n, C, H, W)`` / ``(n, H, W)`` as displayable RGB ``(n, H, W, 3)`` in [0, 1].

    With ``mean``/``std`` the normalization is undone; otherwise each image is min-max scaled.
    """
    x = torch.as_tensor(images.detach().cpu() if isinstance(images, torch.Tensor) else np.asarray(images))
    x = x.to(torch.float64)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise InputError(f"images must be (n, 1 or 3, H, W) or (n, H, W), got {tuple(x.shape)}")
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x * s + m).clamp(0, 1)
    else:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


def as_maps(maps: Any, size: tuple[int, int] | None = None) -> np.ndarray:
    """Per-sample maps as ``(n, H, W)`` float64 (channels summed), resized to ``size`` when given."""
    is_array = isinstance(maps, (torch.Tensor, np.ndarray))
    values = maps if is_array or not hasattr(maps, "values") else maps.values  # an Importance
    if not is_array and getattr(maps, "per_sample", True) is False:
        values = values.unsqueeze(0) if isinstance(values, torch.Tensor) else np.asarray(values)[None]
    t = torch.as_tensor(values.detach().cpu() if isinstance(values, torch.Tensor) else np.asarray(values))
    t = t.to(torch.float64)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim == 4:
        t = t.sum(1)
    if t.ndim != 3:
        raise InputError(f"maps must be (n, H, W) or (n, C, H, W), got {tuple(t.shape)}")
    if size is not None and tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return t.numpy()


def _limits(m: np.ndarray, signed: bool | None = None) -> tuple[float, float, str]:
    """Colour limits and map of one heatmap; ``signed`` None: diverging only if the map has negative values."""
    finite = m[np.isfinite(m)]
    if finite.size == 0:
        return 0.0, 1.0, SEQUENTIAL
    if signed is None:
        signed = bool(finite.min() < 0)
    if not signed:
        hi = float(np.quantile(finite, 0.99))
        return 0.0, hi if hi > 0 else 1.0, SEQUENTIAL
    hi = float(np.quantile(np.abs(finite), 0.99))
    hi = hi if hi > 0 else 1.0
    return -hi, hi, DIVERGING


def draw_overlay(
    ax: Any,
    image: np.ndarray,
    heatmap: np.ndarray,
    alpha: float = 0.5,
    title: str | None = None,
    signed: bool | None = None,
):
    """Draw ``image`` ``(H, W, 3)`` and ``heatmap`` ``(H, W)`` over it on a matplotlib axes; returns the map artist.

    ``signed``: diverging colours centred on 0 (True), sequential from 0 (False), or by the map's sign (None).
    """
    lo, hi, cmap = _limits(heatmap, signed)
    ax.imshow(image, interpolation="nearest")
    artist = ax.imshow(heatmap, cmap=cmap, vmin=lo, vmax=hi, alpha=alpha, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return artist


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=110, bbox_inches="tight")


def overlay(
    image: Any,
    heatmap: Any,
    path: str | Path | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    alpha: float = 0.5,
    title: str | None = None,
):
    """One heatmap over one image (``(C, H, W)`` image, ``(H, W)`` map); saved as PNG when ``path`` is given.

    Returns the matplotlib Figure.
    """
    img = display_images(
        torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)[None], mean, std
    )[0]
    hm = as_maps(
        torch.as_tensor(heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)),
        img.shape[:2],
    )[0]
    fig = _figure(3.2, 3.2)
    ax = fig.subplots()
    artist = draw_overlay(ax, img, hm, alpha, title)
    fig.colorbar(artist, ax=ax, fraction=0.046, pad=0.03)
    _save(fig, path)
    return fig


def overlay_grid(
    maps: Mapping[str, Any],
    images: Any,
    path: str | Path | None = None,
    *,
    max_images: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    alpha: float = 0.5,
    image_titles: Sequence[str] | None = None,
    show_images: bool = True,
):
    """A grid of methods (rows) x images (columns): each method's map over each image.

    ``maps`` maps a row label (a method name) to an :class:`Importance` of pixels or an ``(n, H, W)``
    / ``(n, C, H, W)`` tensor; ``images`` are the explained inputs ``(n, C, H, W)`` (normalized with
    ``mean``/``std`` if given). The first row shows the images alone (``show_images``). Saved as
    PNG when ``path`` is given; returns the matplotlib Figure.
    """
    if not maps:
        raise InputError("no maps to draw; give {method name: Importance or (n, H, W) maps}")
    pictures = display_images(images, mean, std)
    n = min(len(pictures), max_images)
    size = pictures.shape[1:3]
    rows = {label: as_maps(value, size) for label, value in maps.items()}
    for label, m in rows.items():
        if len(m) < n:
            raise InputError(f"{label!r} has maps of {len(m)} images but {n} images are drawn")
    n_rows = len(rows) + int(show_images)
    fig = _figure(1.7 * n + 1.2, 1.7 * n_rows + 0.2)
    axes = np.asarray(fig.subplots(n_rows, n, squeeze=False))
    titles = list(image_titles) if image_titles is not None else [f"image {i}" for i in range(n)]
    r = 0
    if show_images:
        for i in range(n):
            axes[0, i].imshow(pictures[i], interpolation="nearest")
            axes[0, i].set_xticks([])
            axes[0, i].set_yticks([])
            axes[0, i].set_title(titles[i], fontsize=8)
        axes[0, 0].set_ylabel("input", fontsize=9)
        r = 1
    for label, m in rows.items():
        signed = bool((m[:n] < 0).any())  # one colour scheme per method, each map scaled on its own
        for i in range(n):
            draw_overlay(axes[r, i], pictures[i], m[i], alpha, None if show_images or r else titles[i], signed)
        axes[r, 0].set_ylabel(label, fontsize=9)
        r += 1
    fig.subplots_adjust(wspace=0.04, hspace=0.08)
    _save(fig, path)
    return fig
