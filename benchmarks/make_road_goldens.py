"""Golden ROAD imputations and curves from Quantus for ``tests/test_road.py``.

Writes ``tests/fixtures/road/quantus_road.npz``: a small CNN's weights, single-channel images, labels,
attributions, Quantus' noisy linear imputation (noise 0) of given pixel sets, and Quantus' ROAD
MoRF curve (``quantus.ROAD``, noise 0, no normalisation). Quantus stays out of the main
environment; run from a virtual environment that has it::

    python -m venv /tmp/qenv && /tmp/qenv/bin/pip install torch quantus
    PYTHONPATH=. /tmp/qenv/bin/python benchmarks/make_road_goldens.py

Single-channel images because Quantus' ROAD broadcasts ``(1, H, W)`` attributions to the image's
shape and then ranks all ``C * H * W`` elements as if they were pixel indices (valid only for C = 1).
Noise 0 because Quantus draws its noise from NumPy's global generator; with noise the imputations
can only agree in distribution.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "road" / "quantus_road.npz"
PERCENTAGES = [10, 20, 30, 40, 50, 60, 70, 80, 90]


def fixture_cnn() -> nn.Sequential:
    """A small CNN for 1 x 16 x 16 images and 3 classes (weights from the fixture)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, 3),
    )


def main() -> None:
    import quantus
    from quantus.functions.perturb_func import noisy_linear_imputation

    rng = np.random.default_rng(0)
    n = 12
    x = rng.random((n, 1, 16, 16)).astype(np.float32)
    x[:, :, 4:12, 4:12] += np.linspace(-2, 2, n, dtype=np.float32)[:, None, None, None]  # class-dependent blob
    torch.manual_seed(0)
    model = fixture_cnn().eval()
    with torch.no_grad():  # logits that depend on the image: scaled, centred on the data
        model[-1].weight.mul_(40.0)
        model[-1].bias.zero_()
        model[-1].bias.sub_(model(torch.from_numpy(x)).median(0).values)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    a = rng.random((n, 1, 16, 16)).astype(np.float32)  # continuous scores: no ties in the order
    a[:, :, 4:12, 4:12] += 0.5
    # imputation of given pixel sets (one per image, growing, some touching the border)
    removed = np.zeros((n, 16, 16), dtype=bool)
    imputed = np.empty((n, 1, 16, 16))
    for i in range(n):
        removed[i] = rng.random((16, 16)) < (i + 1) / (n + 1)
        idx = np.nonzero(removed[i].reshape(-1))[0]
        imputed[i] = noisy_linear_imputation(x[i].astype(np.float64), idx, noise=0.0)
    metric = quantus.ROAD(
        percentages=PERCENTAGES, noise=0.0, abs=False, normalise=False, disable_warnings=True, return_aggregate=False
    )
    curve = metric(model=model, x_batch=x, y_batch=y, a_batch=a, channel_first=True, device="cpu")
    np.savez_compressed(
        FIXTURE,
        **{f"w_{k}": v.numpy() for k, v in model.state_dict().items()},
        x=x,
        y=y,
        a=a,
        removed=removed,
        imputed=imputed,
        percentages=np.array(PERCENTAGES),
        curve=np.array([curve[p] for p in PERCENTAGES], dtype=np.float64),
        quantus_version=np.array(metadata.version("quantus")),
    )
    print(f"wrote {FIXTURE}: curve {np.round(curve_values(curve), 3)}")


def curve_values(curve: dict) -> np.ndarray:
    return np.array([curve[p] for p in PERCENTAGES], dtype=np.float64)


if __name__ == "__main__":
    main()
