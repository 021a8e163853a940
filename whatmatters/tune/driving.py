"""Synthetic driving scenes with a known driveability per class, and a tiny U-Net to segment them.

A scene ``(3, H, W)``: sky above a random horizon, a road narrowing towards the horizon, sidewalk or grass on
both sides, a few obstacles (cars, cones) on and beside the road, with colour jitter and pixel noise. Classes and
their ordinal driveability level (0 = not driveable, 1 = with care, 2 = driveable) are in ``CLASSES``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# class id -> (name, driveability level, base RGB colour)
CLASSES = {
    0: ("sky", 0, (0.45, 0.65, 0.95)),
    1: ("road", 2, (0.42, 0.42, 0.45)),
    2: ("sidewalk", 1, (0.70, 0.62, 0.55)),
    3: ("grass", 1, (0.30, 0.60, 0.25)),
    4: ("obstacle", 0, (0.80, 0.15, 0.12)),
}
LEVELS = torch.tensor([CLASSES[c][1] for c in sorted(CLASSES)])
OBSTACLE = 4


def driving_scenes(n: int, size: int = 32, *, seed: int = 0, obstacles: int = 2) -> tuple[torch.Tensor, ...]:
    """``(images (n, 3, size, size), classes (n, size, size), levels (n, size, size))``, seeded."""
    g = torch.Generator().manual_seed(seed)

    def u(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g)

    ys = torch.arange(size).float()[None, :, None]
    xs = torch.arange(size).float()[None, None, :]
    horizon = u(n, 1, 1, low=0.3, high=0.5) * size
    centre = u(n, 1, 1, low=0.35, high=0.65) * size
    depth = ((ys - horizon) / (size - horizon)).clamp(0, 1)  # 0 at the horizon, 1 at the bottom
    half_road = depth * u(n, 1, 1, low=0.3, high=0.45) * size
    half_side = half_road + depth * u(n, 1, 1, low=0.1, high=0.2) * size
    off = (xs - centre).abs()
    side = torch.where(u(n, 1, 1) < 0.5, 2, 3).long()
    classes = torch.where(off <= half_road, 1, torch.where(off <= half_side, side, 3)).long()
    classes = torch.where(ys < horizon, 0, classes)
    for _ in range(obstacles):  # boxes growing with depth, on or near the road
        oy = u(n, 1, 1, low=0.2, high=0.9)
        row = horizon + oy * (size - horizon)
        width = (1.5 + 4 * oy) * size / 32
        ox = centre + u(n, 1, 1, low=-1.2, high=1.2) * oy * 0.4 * size
        box = ((ys - row).abs() <= width / 2 + 0.5) & ((xs - ox).abs() <= width)
        classes = torch.where(box & (ys >= horizon) & (u(n, 1, 1) < 0.85), OBSTACLE, classes)
    palette = torch.tensor([CLASSES[c][2] for c in sorted(CLASSES)])  # (C, 3)
    jitter = 1 + u(n, len(CLASSES), 3, low=-0.15, high=0.15)
    colours = palette[None] * jitter  # (n, C, 3)
    colours[:, OBSTACLE] = u(n, 3)  # obstacles in any colour: told apart by shape and place, not by hue
    images = torch.gather(colours, 1, classes.view(n, -1, 1).expand(-1, -1, 3)).view(n, size, size, 3)
    images = (images.permute(0, 3, 1, 2) + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return images, classes, LEVELS[classes]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())


class TinyUNet(nn.Module):
    """Two-level U-Net (``width`` and ``2 * width`` channels) for ``(n, 3, H, W)`` images, H and W divisible by 4."""

    def __init__(self, classes: int = 3, width: int = 12) -> None:
        super().__init__()
        self.down1, self.down2 = _block(3, width), _block(width, 2 * width)
        self.middle = _block(2 * width, 2 * width)
        self.up2, self.up1 = _block(4 * width, width), _block(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.down1(x)
        b = self.down2(F.max_pool2d(a, 2))
        c = self.middle(F.max_pool2d(b, 2))
        b = self.up2(torch.cat([F.interpolate(c, scale_factor=2.0), b], 1))
        return self.head(self.up1(torch.cat([F.interpolate(b, scale_factor=2.0), a], 1)))


def segmentation_scores(pred: torch.Tensor, levels: torch.Tensor, critical: torch.Tensor, k: int = 3) -> dict:
    """mIoU over the ``k`` levels, the mean absolute level difference and the error rate on ``critical`` pixels."""
    inter = torch.stack([((pred == c) & (levels == c)).sum() for c in range(k)]).float()
    union = torch.stack([((pred == c) | (levels == c)).sum() for c in range(k)]).float()
    return {
        "miou": float((inter / union.clamp_min(1)).mean()),
        "ordinal_error": float((pred - levels).abs().float().mean()),
        "critical_error": float((pred != levels)[critical].float().mean()),
    }
