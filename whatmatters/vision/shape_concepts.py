"""Concepts the shapes generator knows, per image: the shape (one-hot), the object's size and its colour."""

from __future__ import annotations

import torch

from whatmatters.vision.shapes import CLASSES

CONCEPTS: tuple[str, ...] = (*CLASSES, "large", "red")


def shape_concepts(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Binary concepts ``(n, 6)`` of :func:`~whatmatters.vision.shapes.make_shapes` images (names: ``CONCEPTS``).

    The four shapes (from the labels); ``large``: the object covers more pixels than the median object of its
    shape; ``red``: the object's mean red value is above 0.5 (object colours are uniform per channel).
    """
    shape = torch.nn.functional.one_hot(labels, len(CLASSES)).float()
    area = masks.flatten(1).sum(1).float()
    median = torch.stack([area[labels == c].median() for c in range(len(CLASSES))])
    large = (area > median[labels]).float()
    red = (images[:, 0] * masks).flatten(1).sum(1) / area.clamp_min(1)
    return torch.cat([shape, large[:, None], (red > 0.5).float()[:, None]], 1)
