"""Golden LRP relevance maps from zennit for ``tests/test_lrp.py``.

Writes ``tests/fixtures/lrp/cnn.pt`` (state_dict of :func:`fixture_cnn`, BatchNorm statistics
included) and ``tests/fixtures/lrp/goldens.npz`` (inputs, targets and zennit's input relevance for
the composites below, all with zennit's ``SequentialMergeBatchNorm`` canonizer; the initial
relevance is the target logit, ``one_hot * output``). zennit imports torchvision, which stays out
of the main environment; run it from a separate virtual environment::

    python -m venv /tmp/venv-zennit-tv
    /tmp/venv-zennit-tv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy
    /tmp/venv-zennit-tv/bin/pip install --no-deps zennit
    /tmp/venv-zennit-tv/bin/python benchmarks/make_lrp_goldens.py
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lrp"
SEED = 0
TARGETS = [0, 3, 1, 4, 2, 2]
LOW, HIGH = -2.0, 2.0  # input range for the z-beta box rule (inputs are clipped to it)
COMPOSITES = ["epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1", "epsilon_plus_flat"]


def fixture_cnn() -> nn.Sequential:
    """A small CNN with BatchNorm (biased and bias-free convs), max/avg pooling and two Linear layers."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 5),
    )


def build() -> tuple[nn.Sequential, torch.Tensor]:
    """The fixture model with random weights and BatchNorm statistics, and 6 input images (3 x 16 x 16)."""
    torch.manual_seed(SEED)
    model = fixture_cnn()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model.eval()
    x = torch.randn(len(TARGETS), 3, 16, 16).clamp(LOW, HIGH)
    return model, x


def zennit_composite(name: str):
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import (
        EpsilonAlpha2Beta1,
        EpsilonGammaBox,
        EpsilonPlus,
        EpsilonPlusFlat,
        LayerMapComposite,
        layer_map_base,
    )
    from zennit.rules import Epsilon
    from zennit.types import Convolution

    canon = [SequentialMergeBatchNorm()]
    if name == "epsilon":
        layer_map = [*layer_map_base(), (Convolution, Epsilon()), (nn.Linear, Epsilon())]
        return LayerMapComposite(layer_map=layer_map, canonizers=canon)
    if name == "epsilon_gamma_box":
        return EpsilonGammaBox(low=LOW, high=HIGH, canonizers=canon)
    return {
        "epsilon_plus": EpsilonPlus,
        "epsilon_alpha2_beta1": EpsilonAlpha2Beta1,
        "epsilon_plus_flat": EpsilonPlusFlat,
    }[name](canonizers=canon)


def zennit_relevance(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, name: str) -> torch.Tensor:
    """zennit's input relevance (same shape as ``x``) for the target logits."""
    from zennit.attribution import Gradient

    def initial(out: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(out).scatter_(1, targets[:, None], 1.0) * out

    with Gradient(model=model, composite=zennit_composite(name)) as attributor:
        _, rel = attributor(x, initial)
    return rel.detach()


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    model, x = build()
    targets = torch.tensor(TARGETS)
    torch.save(model.state_dict(), FIXTURES / "cnn.pt")
    out = {"inputs": x.numpy(), "targets": targets.numpy(), "low": np.float32(LOW), "high": np.float32(HIGH)}
    for name in COMPOSITES:
        out[name] = zennit_relevance(model, x, targets, name).numpy()
    np.savez_compressed(FIXTURES / "goldens.npz", **out, zennit_version=np.array(metadata.version("zennit")))
    print(f"wrote {FIXTURES} with zennit {metadata.version('zennit')}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
