"""Golden LRP relevance maps from zennit for ``tests/test_lrp.py``.

Writes ``tests/fixtures/lrp/cnn.pt`` (state_dict of :func:`fixture_cnn`, BatchNorm statistics
included) and ``tests/fixtures/lrp/goldens.npz`` (inputs, targets and zennit's input relevance for
the composites below, all with zennit's ``SequentialMergeBatchNorm`` canonizer; the initial
relevance is the target logit, ``one_hot * output``), and zennit's relevance on the same network with
every BatchNorm folded into its convolution by hand (:func:`fold_fixture`, keys ``folded_<composite>``):
the BN-free ground truth. zennit's ``MergeBatchNorm`` leaves each BatchNorm in place with mean 0, variance
1 and its ``eps``, so the canonized network divides by ``sqrt(1 + eps)`` at every BatchNorm: that, not
the rules, is the 1e-5 (up to 2e-3 with the epsilon composite in float64) relative difference between
zennit with its canonizer and the folded network; whatmatters' merge equals the folded network to 1e-15.

zennit imports torchvision only for its torchvision-specific canonizers; without torchvision installed,
:func:`zennit_available` puts a stand-in for ``torchvision.models.resnet`` in ``sys.modules`` (those
canonizers are not used here), so ``pip install --no-deps zennit`` is enough::

    pip install --no-deps zennit==0.5.1
    PYTHONPATH=. python benchmarks/make_lrp_goldens.py
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
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


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (from the global seed); the model in eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def build() -> tuple[nn.Sequential, torch.Tensor]:
    """The fixture model with random weights and BatchNorm statistics, and 6 input images (3 x 16 x 16)."""
    torch.manual_seed(SEED)
    model = randomize_batchnorm(fixture_cnn())
    x = torch.randn(len(TARGETS), 3, 16, 16).clamp(LOW, HIGH)
    return model, x


def fold(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` computing ``bn(layer(x))`` (eval mode): ``w * s`` and ``(b - mean) * s + beta``
    with ``s = gamma / sqrt(var + eps)``, written out independently of whatmatters' canonizer."""
    new = copy.deepcopy(layer)
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(s)
    new.weight = nn.Parameter(layer.weight.detach() * s.reshape(-1, *[1] * (layer.weight.ndim - 1)))
    new.bias = nn.Parameter((bias - bn.running_mean) * s + bn.bias.detach())
    return new


def fold_fixture(model: nn.Sequential) -> nn.Sequential:
    """:func:`fixture_cnn` with its three BatchNorms folded by hand (BN-free, the same function)."""
    layers = list(model)
    for conv, bn in ((0, 1), (4, 5), (12, 13)):
        layers[conv], layers[bn] = fold(layers[conv], layers[bn]), nn.Identity()
    return nn.Sequential(*layers).eval()


def zennit_available() -> bool:
    """Whether zennit imports. Without torchvision, a stand-in for ``torchvision.models.resnet`` is in
    ``sys.modules`` only while zennit is imported (other libraries, transformers, must not see it)."""
    if importlib.util.find_spec("zennit") is None:
        return False
    stand_in: dict[str, types.ModuleType] = {}
    if "zennit" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        resnet = types.ModuleType("torchvision.models.resnet")
        resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})  # only zennit's torchvision canonizers use these
        resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})
        models = types.ModuleType("torchvision.models")
        models.resnet = resnet
        vision = types.ModuleType("torchvision")
        vision.models = models
        stand_in = {"torchvision": vision, "torchvision.models": models, "torchvision.models.resnet": resnet}
        sys.modules.update(stand_in)
    try:
        import zennit  # noqa: F401
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)
    return True


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
    if not zennit_available():
        raise SystemExit("zennit is not installed: pip install --no-deps zennit==0.5.1")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    model, x = build()
    targets = torch.tensor(TARGETS)
    torch.save(model.state_dict(), FIXTURES / "cnn.pt")
    out = {"inputs": x.numpy(), "targets": targets.numpy(), "low": np.float32(LOW), "high": np.float32(HIGH)}
    folded = fold_fixture(model)
    for name in COMPOSITES:
        out[name] = zennit_relevance(model, x, targets, name).numpy()
        out[f"folded_{name}"] = zennit_relevance(folded, x, targets, name).numpy()
    np.savez_compressed(
        FIXTURES / "goldens.npz",
        **out,
        zennit_version=np.array(metadata.version("zennit")),
        torch_version=np.array(torch.__version__),
    )
    print(f"wrote {FIXTURES} with zennit {metadata.version('zennit')}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
