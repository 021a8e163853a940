"""Image preprocessing in torch (no torchvision): to tensor, resize, center crop, normalize, load files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from whatmatters.core.errors import InputError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def to_image_tensor(image: Any) -> torch.Tensor:
    """One image as float32 ``(3, H, W)`` in [0, 1].

    Accepts an ``(H, W)``, ``(H, W, 1|3|4)`` array (uint8 0..255 or float 0..1, as read from a file)
    or a ``(C, H, W)`` tensor with C in 1, 3, 4. Grey becomes RGB (replicated), alpha is dropped.
    """
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        channels_first = t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4)
        t = t if channels_first or t.ndim == 2 else t.permute(2, 0, 1)
    else:
        a = np.asarray(image)
        if a.ndim == 3:
            a = np.moveaxis(a, -1, 0)
        t = torch.from_numpy(np.ascontiguousarray(a))
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise InputError(
            f"an image must be (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels; got {tuple(t.shape)}"
        )
    if t.dtype == torch.bool:
        t = t.to(torch.float32)
    elif not t.is_floating_point():  # 8-bit (or 16-bit) integer pixels
        t = t.to(torch.float32) / (65535.0 if int(t.max()) > 255 else 255.0)
    t = t.to(torch.float32)
    if t.shape[0] == 4:
        t = t[:3]
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.contiguous()


def resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear, anti-aliased resize of ``(n, C, H, W)`` (or ``(C, H, W)``) to ``size`` (int: square)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    single = images.ndim == 3
    x = images.unsqueeze(0) if single else images
    if tuple(x.shape[-2:]) != hw:
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return x.squeeze(0) if single else x


def resize_shorter(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    return resize(images, (max(size, round(h * scale)), max(size, round(w * scale))))


def center_crop(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The central ``size`` window of ``(..., H, W)`` images."""
    ch, cw = (size, size) if isinstance(size, int) else size
    h, w = images.shape[-2:]
    if ch > h or cw > w:
        raise InputError(f"cannot crop {ch}x{cw} out of a {h}x{w} image; resize first")
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[..., top : top + ch, left : left + cw]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel, for ``(n, C, H, W)`` or ``(C, H, W)``."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - m) / s


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`normalize` (for display)."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return images * s + m


def preprocess(
    images: Any,
    size: int | None = 224,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    crop: bool = False,
) -> torch.Tensor:
    """Images (one array/tensor, a list of them, or an ``(n, C, H, W)`` tensor in [0, 1]) to a model batch.

    Each image is resized to ``size`` x ``size`` (``crop=True``: shorter side to ``size``, then the
    central square), and normalized with ``mean``/``std`` (None: left in [0, 1]).
    Returns float32 ``(n, 3, size, size)``.
    """
    if (isinstance(images, torch.Tensor) and images.ndim == 4) or isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise InputError("no images given")
    out = []
    for item in items:  # images of different sizes: one resize each (cheap next to the model)
        t = to_image_tensor(item)
        if size is not None:
            t = center_crop(resize_shorter(t, size), size) if crop else resize(t, size)
        out.append(t)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise InputError(f"images of different sizes {sorted(shapes)}; give size= to resize them to one")
    batch = torch.stack(out)
    if mean is not None and std is not None:
        batch = normalize(batch, mean, std)
    return batch


def read_image(path: str | Path) -> np.ndarray:
    """An image file (PNG/JPEG) as an array, with Pillow when installed, else matplotlib."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"cannot read {path.name}: images must be {', '.join(IMAGE_SUFFIXES)} files")
    if not path.exists():
        raise FileNotFoundError(2, "no image file", str(path))
    try:
        try:
            from PIL import Image
        except ImportError:
            import matplotlib.image as mpimg

            return np.asarray(mpimg.imread(path))
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB") if img.mode not in ("RGB", "L") else img)
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"could not read the image {path}: {err}") from None


def load_images(
    paths: Sequence[str | Path],
    size: int = 224,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    crop: bool = False,
) -> torch.Tensor:
    """PNG/JPEG files as one normalized float32 batch ``(n, 3, size, size)`` (see :func:`preprocess`)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return preprocess([read_image(p) for p in paths], size=size, mean=mean, std=std, crop=crop)


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` names a PNG/JPEG file (by its suffix)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def normalization(name: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(mean, std)`` of a named normalization: ``"imagenet"`` or ``"none"`` (pixels left in [0, 1])."""
    if name == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if name == "none":
        return None, None
    raise InputError(f"unknown image normalization {name!r}; use 'imagenet' or 'none'")
