"""LIME and DeepLIFT find the object on images whose ground truth is known exactly (through wm.benchmark)."""

from __future__ import annotations

import torch
from torch import nn

import whatmatters as wm


def _objects(n: int = 8, size: int = 16, side: int = 4):
    """Black images, each with one bright square at a random place (aligned to LIME's 2x2 grid cells)."""
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n, 3, size, size, dtype=torch.float64)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    corners = torch.randint(0, (size - side) // 2 + 1, (n, 2), generator=g) * 2
    for i, (r, c) in enumerate(corners.tolist()):  # 8 images: building the data, not scoring it
        images[i, :, r : r + side, c : c + side] = 0.5 + 0.5 * torch.rand(
            3, side, side, generator=g, dtype=torch.float64
        )
        masks[i, r : r + side, c : c + side] = True
    return images, masks


def _reader() -> nn.Module:
    """A CNN that sees every pixel (1x1 convolution, ReLU, sum pooling), positive weights: with a black
    background and a black baseline only the object's pixels can change its class-0 output."""
    g = torch.Generator().manual_seed(1)
    conv, head = nn.Conv2d(3, 4, 1), nn.Linear(4, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.rand(conv.weight.shape, generator=g))
        conv.bias.zero_()
        head.weight.copy_(torch.rand(head.weight.shape, generator=g))
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).double().eval()


def test_lime_and_deeplift_point_at_the_object_and_put_their_mass_on_it():
    images, masks = _objects()
    methods = {"deeplift": {"baseline": "zero"}, "lime": {"baseline": 0.0, "n_samples": 128}}
    result = wm.benchmark(_reader(), images, methods, ["pointing_game", "relevance_mass"], target=0, relevant=masks)
    table = result.table
    assert (table.loc[list(methods), "pointing_game"] == 1.0).all(), table
    assert table.loc["deeplift", "relevance_mass"] > 0.999  # exactly 0 outside the object: x - baseline = 0 there
    # LIME's ridge surrogate (alpha=1) spreads a little weight over the 60 other cells through the sample
    # correlations of 128 random on/off draws; the object's 4 cells still hold most of it
    assert table.loc["lime", "relevance_mass"] > 0.8, table
    assert table.loc["random", "relevance_mass"] < 0.2  # a 4x4 square of 16x16: 1/16 of the pixels
