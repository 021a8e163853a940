"""Occlusion: hide a window of the image, watch the target output drop (Zeiler & Fergus, 2014).

A ``window`` slides over the image with ``stride``; every window position gives one occluded copy
(all channels hidden together, pixels inside the window replaced by the ``baseline``). A pixel's
score is the mean, over the windows that cover it, of ``f(x) - f(x_occluded)``, which is exactly
captum's ``Occlusion`` with ``sliding_window_shapes=(C, h, w)`` and ``strides=(C, s, s)``: captum
returns that same value for each channel, so its output summed over channels is ``C`` times ours.
Window positions also follow captum: starts at ``0, s, 2s, ...`` until the window reaches the far
border, the last window cut at the border, so every pixel is covered.

All windows of all images are sent to the model in a few batched calls (``task.score``); the
occluded copies are built in chunks of about ``ELEMENTS_PER_CHUNK`` values on the model's device.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F

from whatmatters.core.adapters import TorchModel
from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task

# Values of occluded copies built at once (64 MB in float32); bounds memory, not the number of model calls.
ELEMENTS_PER_CHUNK = 2**24


def _pair(value: Any, name: str, default: tuple[int, int]) -> tuple[int, int]:
    if value is None:
        return default
    items = (value, value) if isinstance(value, numbers.Integral) else tuple(value)
    if len(items) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        raise MethodError(f"{name} must be an int or (height, width) ints, got {value!r}")
    if min(items) < 1:
        raise MethodError(f"{name} must be at least 1 pixel, got {value!r}")
    return int(items[0]), int(items[1])


def window_starts(size: int, window: int, stride: int) -> torch.Tensor:
    """Start indices of the windows along one axis (captum's: ``ceil((size - window) / stride) + 1`` of them)."""
    return torch.arange(math.ceil((size - window) / stride) + 1) * stride


def window_masks(hw: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Boolean masks ``(m, H, W)`` of every window position, row-major (last windows cut at the border)."""
    axes = []
    for size, w, s in zip(hw, window, stride):
        starts = window_starts(size, w, s)
        pos = torch.arange(size)
        axes.append((pos >= starts[:, None]) & (pos < starts[:, None] + w))  # (k, size)
    rows, cols = axes
    return (rows[:, None, :, None] & cols[None, :, None, :]).flatten(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(n, C, H, W)`` images (reflect padding; radius 3 sigma, within the image)."""
    radius = max(1, min(math.ceil(3 * sigma), min(images.shape[-2:]) - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _baseline(task: Task, x: torch.Tensor, baseline: Any, window: tuple[int, int]) -> torch.Tensor:
    """What hidden pixels become, broadcastable to ``x`` ``(n, C, H, W)``."""
    if isinstance(baseline, str):
        if baseline == "zero":
            return torch.zeros((), dtype=x.dtype, device=x.device)
        if baseline == "mean":  # one colour: the per-channel mean of the background (or of the data)
            ref = task.background if task.background is not None else task.inputs
            ref = ref.to(x.device, x.dtype)
            return ref.mean(dim=(0, *range(2, ref.ndim)), keepdim=True)[0] if ref.ndim == 4 else ref.mean()
        if baseline == "blur":  # each image blurred with sigma = half the window
            images = x if x.ndim == 4 else x.unsqueeze(1)
            blurred = gaussian_blur(images, max(window) / 2)
            return blurred if x.ndim == 4 else blurred.squeeze(1)
        raise MethodError(f"unknown baseline {baseline!r}; use 'zero', 'mean', 'blur', a number or an array")
    if isinstance(baseline, bool):
        raise MethodError(f"baseline must be 'zero', 'mean', 'blur', a number or an array, got {baseline!r}")
    value = baseline.detach() if isinstance(baseline, torch.Tensor) else torch.as_tensor(baseline)
    value = value.to(x.device, x.dtype)
    if value.ndim == x.ndim and value.shape[0] != x.shape[0]:
        raise MethodError(f"baseline has {value.shape[0]} samples for {x.shape[0]} inputs; give one or one per input")
    try:
        torch.broadcast_shapes(value.shape, x.shape[1:] if value.ndim < x.ndim else x.shape)
    except RuntimeError:
        raise MethodError(
            f"baseline of shape {tuple(value.shape)} does not fit inputs of shape {tuple(x.shape)}: give a number, "
            "one value per channel (C, 1, 1), one image (C, H, W) or one per input (n, C, H, W)"
        ) from None
    return value


@scorer("occlusion", family="perturbation", units="pixel")
def occlusion(
    task: Task,
    *,
    window: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    baseline: Any = "zero",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Occlusion: a pixel's score is the mean output drop over the sliding windows that hide it.

    Args:
        window: window ``(height, width)`` or one int (square); default: an eighth of the image's
            shorter side (at least 1 pixel), so the cost does not grow with the resolution.
        stride: step between windows; default: half the window (at least 1), so windows overlap
            and maps are smoother than the window grid. Must not exceed the window (as captum).
        baseline: what hidden pixels become: ``"zero"`` (captum's default), ``"mean"`` (the
            per-channel mean colour of the background or the data), ``"blur"`` (the image blurred
            with a Gaussian of sigma = half the window), a number, or an array of shape ``(C, 1, 1)``,
            ``(C, H, W)`` or ``(n, C, H, W)``.

    Channels are hidden together; values are ``(n, H, W)`` maps (as CAMs). ``extra`` holds the
    window, the stride and the number of windows per image. Cost: ``windows + 1`` model rows per image.
    """
    x = task.inputs
    if x.ndim not in (3, 4):
        raise InputError(f"occlusion needs images (n, C, H, W) or (n, H, W), got data of shape {tuple(x.shape)}")
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    side = max(1, min(hw) // 8)
    win = _pair(window, "window", (side, side))
    std = _pair(stride, "stride", (max(1, win[0] // 2), max(1, win[1] // 2)))
    for axis, size, w, s in zip(("height", "width"), hw, win, std):
        if w > size:
            raise MethodError(f"window {w} is larger than the image {axis} {size}; use a smaller window")
        if s > w and w < size:
            raise MethodError(f"stride {s} is larger than the window {w} along the {axis}: pixels would be skipped")
    device = task.model.device if isinstance(task.model, TorchModel) else x.device
    x = x.to(device)
    base = _baseline(task, x, baseline, win)
    masks = window_masks(hw, win, std).to(device)  # (m, H, W)
    m = len(masks)
    # windows per chunk: about ELEMENTS_PER_CHUNK values, rounded to whole model calls where possible
    rows_per_call = task.rows_per_call()
    rows = max(1, ELEMENTS_PER_CHUNK // max(1, x[0].numel()))
    rows = max(rows_per_call, rows // rows_per_call * rows_per_call)
    chunk = max(1, rows // len(x))
    full = task.score(x.unsqueeze(1), "occlusion").to(device)  # (n, 1)
    drops = []
    for start in range(0, m, chunk):  # chunks of windows bound memory; each goes to the model in big batches
        mk = masks[start : start + chunk]
        mk = mk.unsqueeze(1) if x.ndim == 4 else mk  # (k, 1, H, W): all channels hidden together
        b = base.unsqueeze(1) if base.ndim == x.ndim else base
        variants = torch.where(mk, b, x.unsqueeze(1))  # (n, k, C, H, W)
        drops.append(full - task.score(variants, "occlusion").to(device))
    drop = torch.cat(drops, dim=1)  # (n, m)
    maskf = masks.to(drop.dtype)
    total = torch.einsum("nm,mhw->nhw", drop, maskf)
    values = total / maskf.sum(0)  # every pixel is covered at least once
    return values, {"window": list(win), "stride": list(std), "windows": m}
