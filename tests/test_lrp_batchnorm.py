"""LRP on BatchNorm models equals LRP on the same network with BatchNorm folded by hand (float64), for
every composite, in Sequential models and ResNet blocks; on the folded fixture it equals zennit's goldens.

Together: ours(BN model) == ours(hand-folded) and ours(hand-folded) == zennit(hand-folded). zennit with its
own canonizer differs from both by ~1e-5 relative: its MergeBatchNorm keeps each BatchNorm's eps (see
benchmarks/make_lrp_goldens.py), which is why test_lrp.py compares to those goldens more loosely.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import benchmark_script
from torch import nn

from whatmatters.core.errors import MethodError
from whatmatters.explain._lrp import COMPOSITES, lrp, merge_batchnorm

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lrp"
GOLDENS = benchmark_script("make_lrp_goldens")
NETS = benchmark_script("nets")
# float64: relative to the largest |relevance| AND absolute (both must hold)
RTOL, ATOL = 1e-10, 1e-12


class TinyResNet(nn.Module):
    """Stem conv + BN, one identity BasicBlock and one with a downsample (conv + BN) branch, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.block1, self.block2 = NETS.BasicBlock(6, 6, 1), NETS.BasicBlock(6, 8, 2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def _tiny_resnet() -> nn.Module:
    torch.manual_seed(1)
    return GOLDENS.randomize_batchnorm(TinyResNet()).double()


def _fold_resnet(model: TinyResNet) -> nn.Module:
    """The hand-folded copy: each conv replaced by conv+BN folded, each BN by Identity."""
    out = copy.deepcopy(model)
    out.conv1, out.bn1 = GOLDENS.fold(model.conv1, model.bn1), nn.Identity()
    for name in ("block1", "block2"):
        src, dst = getattr(model, name), getattr(out, name)
        dst.conv1, dst.bn1 = GOLDENS.fold(src.conv1, src.bn1), nn.Identity()
        dst.conv2, dst.bn2 = GOLDENS.fold(src.conv2, src.bn2), nn.Identity()
        if src.downsample is not None:
            dst.downsample = nn.Sequential(GOLDENS.fold(src.downsample[0], src.downsample[1]), nn.Identity())
    return out.eval()


def _fixture() -> nn.Module:
    model = GOLDENS.fixture_cnn()
    model.load_state_dict(torch.load(FIXTURES / "cnn.pt"))
    return model.eval()


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol:.3g}"
    assert diff <= rtol * ref.abs().max().item(), f"relative difference {diff / ref.abs().max().item():.3g} > {rtol}"


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
@pytest.mark.parametrize("net", ["sequential", "resnet"])
def test_batchnorm_model_equals_hand_folded_network(composite, net):
    if net == "sequential":
        model = _fixture().double()
        folded = GOLDENS.fold_fixture(model)
        x = torch.tensor(np.load(FIXTURES / "goldens.npz")["inputs"], dtype=torch.float64)
    else:
        model = _tiny_resnet()
        folded = _fold_resnet(model)
        x = torch.randn(4, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).clamp(-2, 2)
    t = torch.arange(len(x)) % 4
    assert torch.allclose(model(x), folded(x), rtol=0, atol=1e-12)  # the hand fold is the same function
    ours, _ = lrp(model, x, t, composite, low=GOLDENS.LOW, high=GOLDENS.HIGH)
    ref, _ = lrp(folded, x, t, composite, low=GOLDENS.LOW, high=GOLDENS.HIGH)
    assert ref.abs().max() > 0
    _close(ours, ref, RTOL, ATOL)


@pytest.mark.parametrize("composite", GOLDENS.COMPOSITES)
def test_hand_folded_network_equals_zennit(composite):
    """float32, against zennit's relevance on the folded fixture (goldens): measured <= 5e-7 relative."""
    data = np.load(FIXTURES / "goldens.npz")
    folded = GOLDENS.fold_fixture(_fixture())
    x, t = torch.tensor(data["inputs"]), torch.tensor(data["targets"])
    ours, _ = lrp(folded, x, t, composite, low=GOLDENS.LOW, high=GOLDENS.HIGH)
    ref = torch.tensor(data[f"folded_{composite}"])
    _close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_merge_batchnorm_folds_resnet_blocks_and_leaves_model_alone():
    model = _tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged, names = merge_batchnorm(model)
    assert set(names) == {"bn1", "block1.bn1", "block1.bn2", "block2.bn1", "block2.bn2", "block2.downsample.1"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    assert torch.allclose(merged(x), model(x), atol=1e-12)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in model.state_dict().items() if k in before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _BatchNormFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


class _SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.out(self.bn(h) + h)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.fc(x))
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = h * 2
        return self.out(h)


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (_BatchNormFirst(), "'bn': its input is not the output of a Conv/Linear"),
        (_SharedOutput(), "'bn': the output of 'fc' is also used elsewhere"),
        (_Untraceable(), "'bn': the model cannot be traced"),
    ],
)
def test_unfoldable_batchnorm_is_refused_by_name(model, says):
    model.eval()
    x = torch.randn(3, 4)
    with pytest.raises(MethodError, match="canonize=False") as err:
        lrp(model, x, 0)
    assert says in str(err.value)
    rel, _ = lrp(model, x, 0, canonize=False)  # the way out named in the message works
    assert rel.shape == x.shape
