"""The concept gallery of a CRAFT importance: per concept, its importance, representative crops and maps."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from whatmatters.core.importance import Importance
from whatmatters.report import plots


def is_concept_bank(imp: Importance) -> bool:
    """Whether ``imp`` carries a CRAFT concept bank (crops and maps to draw)."""
    return imp.unit == "concept" and {"crops", "maps", "crop_size"} <= set(imp.extra)


def concept_cells(
    imp: Importance, images: Any, *, n_crops: int = 6, n_maps: int = 4
) -> list[tuple[str, float, np.ndarray, np.ndarray]]:
    """Per concept: name, importance, its ``n_crops`` most representative crops and its maps over the first
    ``n_maps`` images, as RGB cells ``(m, S, S, 3)`` uint8 (maps at the layer's resolution, drawn bilinearly)."""
    from whatmatters.explain.craft import concept_crops

    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    crops = concept_crops(images, imp)[:, :n_crops]  # (k, m, C, s, s)
    k, m = crops.shape[:2]
    cells = plots.image_cells(crops.flatten(0, 1), cell=56)
    crop_rgb = cells.reshape(k, m, *cells.shape[1:])
    maps = torch.as_tensor(imp.extra["maps"], dtype=torch.float32)[:n_maps]  # (n, k, h, w)
    n = len(maps)
    over = plots.overlay_cells(maps.transpose(0, 1).flatten(0, 1), images[:n].repeat(k, *[1] * (images.ndim - 1)))
    over = over.reshape(k, n, *over.shape[1:])
    values = imp.values.double().tolist()
    names = list(imp.names or [f"c{i}" for i in range(k)])
    return [(names[c], values[c], crop_rgb[c], over[c]) for c in range(k)]
