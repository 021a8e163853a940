"""A synthetic image set with ground truth: which pixels decide the class is known.

Each image holds one object (a circle, square, triangle or cross) at a random position, size,
rotation and colour, pasted over clutter: a smooth random-colour background, pixel noise, soft
blobs and thin strokes. The clutter is drawn independently of the label, so only the object
decides the class, and the object's mask is returned with the image. Localization metrics
(pointing game, relevance mass in the mask) can then be checked against the truth.

Generation is vectorized in torch: every image of a chunk is drawn at once from coordinate grids
(no loops over pixels or images); chunks of ``CHUNK`` images bound the memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from whatmatters.core.errors import InputError

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
CHUNK = 1024


def _object_mask(label: int, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Mask of class ``label``'s shape in rotated object coordinates ``u, v`` (``(m, H, W)``) of radius ``r``."""
    if label == 0:  # circle
        return u**2 + v**2 <= r**2
    if label == 1:  # square of side 1.6 r: about the circle's area
        return torch.maximum(u.abs(), v.abs()) <= 0.8 * r
    if label == 2:  # equilateral triangle with circumradius 1.15 r: three half-planes at 120 degrees
        angles = torch.tensor([math.pi / 2 + 2 * math.pi * k / 3 for k in range(3)])
        proj = u.unsqueeze(-1) * angles.cos() + v.unsqueeze(-1) * angles.sin()
        return proj.amax(-1) <= 0.575 * r
    arm = 0.3 * r  # cross
    au, av = u.abs(), v.abs()
    return (torch.minimum(au, av) <= arm) & (torch.maximum(au, av) <= r)


def _segment_distance(px: torch.Tensor, py: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of pixels ``(H, W)`` to segments from ``a`` to ``b`` (``(n, k, 2)``): shape ``(n, k, H, W)``."""
    ax, ay = a[..., 0, None, None], a[..., 1, None, None]
    dx, dy = (b - a)[..., 0, None, None], (b - a)[..., 1, None, None]
    t = (((px - ax) * dx + (py - ay) * dy) / (dx**2 + dy**2).clamp_min(1e-6)).clamp(0, 1)
    return torch.hypot(px - ax - t * dx, py - ay - t * dy)


def _chunk(labels: torch.Tensor, size: int, g: torch.Generator, strokes: int, blobs: int, noise: float):
    n = len(labels)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    py, px = coords[:, None], coords[None, :]  # (H, 1), (1, W)

    # background: a smooth random-colour field (low-res noise, upsampled) around a random base colour
    base = rand(n, 3, 1, 1)
    field = F.interpolate(rand(n, 3, 4, 4) - 0.5, size=(size, size), mode="bicubic", align_corners=False)
    img = base + 0.35 * field
    # soft blobs: Gaussian bumps of random colour (no hard edge, so never mistaken for an object)
    centre = rand(n, blobs, 2) * size
    sigma = (0.05 + 0.07 * rand(n, blobs, 1, 1)) * size
    bump = torch.exp(
        -((px - centre[..., 0, None, None]) ** 2 + (py - centre[..., 1, None, None]) ** 2) / (2 * sigma**2)
    )  # (n, blobs, H, W)
    colour = rand(n, blobs, 3, 1, 1)
    weight = 0.6 * bump.unsqueeze(2)
    for j in range(blobs):  # a handful of layers, each over all images at once
        img = img * (1 - weight[:, j]) + colour[:, j] * weight[:, j]
    # thin strokes: anti-aliased line segments of random colour
    a, b = rand(n, strokes, 2) * size, rand(n, strokes, 2) * size
    ink = (1.0 - _segment_distance(px, py, a, b) / 0.9).clamp(0, 1)  # ~1.8 px wide
    colour = rand(n, strokes, 3, 1, 1)
    for j in range(strokes):
        img = img * (1 - ink[:, j, None]) + colour[:, j] * ink[:, j, None]

    # the object: random radius, centre (fully inside), rotation and a colour far from the background's
    r = (0.14 + 0.12 * rand(n)) * size
    cx = r + rand(n) * (size - 2 * r)
    cy = r + rand(n) * (size - 2 * r)
    theta = rand(n) * 2 * math.pi
    r, cx, cy, theta = (t[:, None, None] for t in (r, cx, cy, theta))
    dx, dy = px - cx, py - cy
    u = dx * torch.cos(theta) + dy * torch.sin(theta)
    v = -dx * torch.sin(theta) + dy * torch.cos(theta)
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for label in range(len(CLASSES)):  # one shape formula per class, on that class's images only
        rows = labels == label
        mask[rows] = _object_mask(label, u[rows], v[rows], r[rows])
    obj_colour = (base + 0.5) % 1.0 + 0.15 * (rand(n, 3, 1, 1) - 0.5)
    img = torch.where(mask.unsqueeze(1), obj_colour, img)
    img = img + noise * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1), mask


def make_shapes(
    n: int,
    size: int = 32,
    seed: int = 0,
    *,
    strokes: int = 3,
    blobs: int = 3,
    noise: float = 0.04,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` synthetic images whose class is decided by one object, with the object's mask.

    Args:
        n: number of images (classes are balanced: ``n // 4`` or one more each, in random order).
        size: height and width in pixels (at least 16).
        seed: seed of every random draw; the same arguments give the same images.
        strokes, blobs: distractors per image (drawn independently of the class).
        noise: standard deviation of the Gaussian pixel noise.

    Returns:
        ``images`` float32 ``(n, 3, size, size)`` in [0, 1], ``labels`` int64 ``(n,)`` indexing
        :data:`CLASSES`, and ``masks`` bool ``(n, size, size)``: the object's pixels.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive int (number of images), got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise InputError(f"size must be an int of at least 16 pixels, got {size!r}")
    if min(strokes, blobs) < 0 or noise < 0:
        raise InputError("strokes, blobs and noise must not be negative")
    g = torch.Generator().manual_seed(int(seed))
    labels = (torch.arange(n) % len(CLASSES))[torch.randperm(n, generator=g)]
    images, masks = [], []
    for start in range(0, n, CHUNK):
        img, mask = _chunk(labels[start : start + CHUNK], size, g, strokes, blobs, noise)
        images.append(img)
        masks.append(mask)
    return torch.cat(images), labels, torch.cat(masks)
