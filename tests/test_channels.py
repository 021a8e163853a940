"""Channel scores and channel removal for plain PyTorch CNNs / MLPs (whatmatters.compress.channels)."""

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from whatmatters.compress import score
from whatmatters.compress.channels import channels_by_layer, plan, prune_channels
from whatmatters.compress.remove import n_parameters
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.importance import Importance
from whatmatters.vision.nets import ShapesCNN


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return model.eval()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
        )
    )  # fmt: skip


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        x = F.relu(x + h)
        return self.fc(x.mean((2, 3)))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else x  # data-dependent control flow


class WithUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.odd = Untraceable()
        self.b = nn.Conv2d(4, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(self.odd(self.a(x)))))


X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _with_values(imp: Importance, values: torch.Tensor) -> Importance:
    return dataclasses.replace(imp, values=values)


def _lowest_at(imp: Importance, chosen: dict[str, list[int]]) -> Importance:
    """The importance with scores 0 at the chosen channels and 1 + random elsewhere."""
    parts = channels_by_layer(imp)
    values = []
    for name, v in parts.items():
        new = 1 + torch.rand(len(v), generator=torch.Generator().manual_seed(len(v)))
        new[chosen.get(name, [])] = 0
        values.append(new)
    return _with_values(imp, torch.cat(values))


def _zeroed(model: nn.Module, chosen: dict[str, list[int]], batchnorms: dict[str, str]) -> nn.Module:
    """A copy whose chosen output channels are zero at the BatchNorm output (or at the layer output without one)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, idx in chosen.items():
            layer = out.get_submodule(name)
            layer.weight[idx] = 0
            if layer.bias is not None:
                layer.bias[idx] = 0
            if name in batchnorms:
                bn = out.get_submodule(batchnorms[name])
                bn.weight[idx] = 0
                bn.bias[idx] = 0
    return out


def _check_equivalent(model, pruned, chosen, batchnorms, x):
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _zeroed(model, chosen, batchnorms)(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ removal
def test_removal_equals_zeroing_and_parameter_count():
    model = small_cnn()
    imp = score(model, "channel_l1")
    chosen = {"0": [1, 4, 6], "4": [0, 2, 3, 7, 11]}  # 3 of 8 and 5 of 12 = round(0.4 * C)
    pruned, report = prune_channels(model, _lowest_at(imp, chosen), 0.4, example_input=X)
    assert report.removed == chosen
    assert report.channels == {"0": (8, 5), "4": (12, 7)}
    assert report.skipped == {"9": "its output is a model output"}
    _check_equivalent(model, pruned, chosen, {"0": "1", "4": "5"}, X)
    r1, r2 = 3, 5
    expected = (
        (8 - r1) * 27 + (8 - r1) + 2 * (8 - r1)  # conv0 + bias, bn1
        + (12 - r2) * (8 - r1) * 9 + (12 - r2) + 2 * (12 - r2)  # conv4 + bias, bn5
        + 5 * (12 - r2) + 5  # linear
    )  # fmt: skip
    assert report.n_parameters_before == n_parameters(model)
    assert report.n_parameters_after == n_parameters(pruned) == expected
    assert pruned[0].out_channels == 5 and pruned[4].in_channels == 5 and pruned[9].in_features == 7
    assert pruned[1].running_mean.shape == (5,) and pruned[5].num_features == 7


def test_flatten_to_linear_removes_feature_blocks():
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                                        nn.Flatten(), nn.Linear(4 * 6 * 6, 3)))  # fmt: skip
    x = torch.randn(5, 3, 6, 6)
    imp = score(model, "bn_scale")
    chosen = {"0": [2]}
    pruned, report = prune_channels(model, _lowest_at(imp, chosen), 0.25, example_input=x)
    assert pruned[5].in_features == 3 * 36
    kept = torch.cat([torch.arange(c * 36, (c + 1) * 36) for c in (0, 1, 3)])
    assert torch.equal(pruned[5].weight, model[5].weight[:, kept])
    _check_equivalent(model, pruned, chosen, {"0": "1"}, x)
    assert report.n_parameters_before - report.n_parameters_after == 27 + 1 + 2 + 3 * 36


def test_mlp_with_batchnorm1d():
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.1), nn.Linear(10, 8),
                                        nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3)))  # fmt: skip
    x = torch.randn(7, 6)
    imp = score(model, "channel_l1")
    chosen = {"0": [0, 5, 9], "3": [1, 6]}
    pruned, report = prune_channels(model, _lowest_at(imp, chosen), 0.3, example_input=x)
    assert report.removed == chosen
    _check_equivalent(model, pruned, chosen, {"3": "4"}, x)


def test_shapes_cnn_removal_equals_zeroing():
    torch.manual_seed(0)
    model = _randomize_bn(ShapesCNN(width=8))
    x = torch.rand(4, 3, 32, 32)
    imp = score(model, "channel_l1")
    parts = channels_by_layer(imp)
    chosen = {n: list(range(0, len(v), 2)) for n, v in parts.items() if n != "classifier"}
    pruned, report = prune_channels(model, _lowest_at(imp, chosen), 0.5, example_input=x)
    assert report.removed == chosen and report.skipped == {"classifier": "its output is a model output"}
    bns = {n: f"features.{int(n.split('.')[1]) + 1}" for n in chosen}
    _check_equivalent(model, pruned, chosen, bns, x)
    assert pruned.classifier.in_features == 16
    assert report.n_parameters_after == n_parameters(pruned) < report.n_parameters_before


def test_residual_coupled_layers_are_skipped_with_reason():
    torch.manual_seed(0)
    model = _randomize_bn(Residual())
    x = torch.randn(3, 3, 8, 8)
    imp = score(model, "channel_l1")
    chosen = {"conv1": [1, 4]}
    pruned, report = prune_channels(model, _lowest_at(imp, chosen), 0.3, example_input=x)
    assert set(report.removed) == {"conv1"} and report.removed["conv1"] == [1, 4]
    assert "residual" in report.skipped["stem"] and "residual" in report.skipped["conv2"]
    assert report.skipped["fc"] == "its output is a model output"
    assert pruned.conv1.out_channels == 4 and pruned.bn1.num_features == 4 and pruned.conv2.in_channels == 4
    assert pruned.stem.out_channels == 8 and pruned.conv2.out_channels == 8
    _check_equivalent(model, pruned, chosen, {"conv1": "bn1"}, x)
    frame = report.to_frame()
    assert frame.loc["conv1", "after"] == 4 and "residual" in frame.loc["stem", "skipped"]


def test_grouped_convolutions_are_skipped():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1),
                          nn.Flatten(), nn.Linear(4 * 16, 2)).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    pruned, report = prune_channels(model, score(model, "channel_l1"), 0.5, example_input=x)
    assert "depthwise" in report.skipped["0"] and "depthwise" in report.skipped["2"]
    assert set(report.removed) == {"3"} and pruned[3].out_channels == 2 and pruned[5].in_features == 2 * 16


def test_global_allocation_removes_exact_count_and_keeps_one_per_layer():
    scores = {"a": torch.tensor([0.1, 0.2, 0.3]), "b": torch.tensor([5.0, 6.0]), "c": torch.tensor([0.0, 0.05])}
    gone = plan(scores, 0.5, "global")  # round(3.5) = 4 of 7; c's best (0.05) stays
    assert [g.tolist() for g in gone.values()] == [[True, True, False], [True, False], [True, False]]
    gone = plan(scores, 0.99, "global")
    assert all(int((~g).sum()) == 1 for g in gone.values())
    model = small_cnn()
    _, report = prune_channels(model, score(model, "channel_l1"), 0.5, allocation="global", example_input=X)
    assert report.n_removed == 10 and all(a >= 1 for _, a in report.channels.values())


def test_global_allocation_standardizes_scores_per_layer():
    """Scores of very different scale per layer: raw ranking empties the small layer; standardized takes both."""
    model = small_cnn()
    imp = score(model, "channel_l1")
    per = channels_by_layer(imp)
    scaled = torch.cat([v * (1000.0 if i == 0 else 1.0) for i, v in enumerate(per.values())])
    imp = dataclasses.replace(imp, values=scaled)
    _, raw = prune_channels(model, imp, 0.25, allocation="global", standardize=False, example_input=X)
    _, std = prune_channels(model, imp, 0.25, allocation="global", example_input=X)
    first = next(iter(per))
    assert not raw.removed.get(first) and std.removed.get(first) and raw.n_removed == std.n_removed
    with pytest.raises(InputError, match="standardize"):
        prune_channels(model, imp, 0.25, allocation="global", standardize="yes", example_input=X)


def test_input_model_unchanged():
    model = small_cnn().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    imp = score(model, "channel_taylor", data=X)
    pruned, _ = prune_channels(model, imp, 0.5, example_input=X)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model[0].out_channels == 8 and pruned[0].out_channels == 4 and pruned.training


def test_importance_round_trip_prunes_the_same(tmp_path):
    model = small_cnn()
    imp = score(model, "channel_l1")
    loaded = Importance.load(imp.save(tmp_path / "ch.parquet"))
    a = prune_channels(model, imp, 0.5, example_input=X).report
    b = prune_channels(model, loaded, 0.5, example_input=X).report
    assert a.removed == b.removed


# -------------------------------------------------------------------- scores
def test_bn_scale_is_abs_gamma():
    model = small_cnn()
    imp = score(model, "bn_scale")
    assert (
        imp.unit == "channel" and imp.extra["layers"] == ["0", "4"] and imp.extra["batchnorm"] == {"0": "1", "4": "5"}
    )
    assert torch.equal(imp.values, torch.cat([model[1].weight.abs(), model[5].weight.abs()]).detach())
    assert imp.names[:2] == ("0:0", "0:1")


def test_channel_l1_is_hand_computed():
    model = small_cnn()
    imp = score(model, "channel_l1")
    parts = channels_by_layer(imp)
    for name, layer in (("0", model[0]), ("4", model[4]), ("9", model[9])):
        hand = torch.tensor(
            [float(sum(abs(float(w)) for w in layer.weight[c].detach().flatten())) for c in range(len(layer.weight))]
        )
        torch.testing.assert_close(parts[name], hand, rtol=1e-5, atol=1e-6)
    assert len(imp.names) == 8 + 12 + 5


@pytest.mark.parametrize("labels", [True, False])
def test_channel_taylor_equals_autograd(labels):
    model = small_cnn()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    imp = score(model, "channel_taylor", data=[(X, y)] if labels else X)
    # the channels enter the next layer after MaxPool (3), after AdaptiveAvgPool (7), at the logits (9)
    points = {"0": model[3], "4": model[7], "9": model[9]}
    assert imp.extra["points"] == {"0": "_3", "4": "_7", "9": "_9"}
    totals = {
        n: torch.zeros(m.out_channels if n != "9" else 5) for n, m in (("0", model[0]), ("4", model[4]), ("9", None))
    }
    acts: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: acts.__setitem__(n, o)) for n, m in points.items()]
    for i in range(len(X)):
        out = model(X[i : i + 1])
        target = y[i : i + 1] if labels else out.argmax(1).detach()
        loss = F.cross_entropy(out, target)
        grads = torch.autograd.grad(loss, list(acts.values()))
        for (n, a), g in zip(acts.items(), grads):
            totals[n] += (a * g).reshape(1, a.shape[1], -1).sum(-1).abs()[0].detach()
    for h in handles:
        h.remove()
    parts = channels_by_layer(imp)
    for n, t in totals.items():
        torch.testing.assert_close(parts[n], t / len(X), rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_removal_tracks_taylor_loss_change():
    """The first-order estimate orders channels like the true loss change of removing them (a coarse check)."""
    model = small_cnn()
    imp = score(model, "channel_taylor", data=X)
    taylor = channels_by_layer(imp)["4"]
    base = F.cross_entropy(model(X), model(X).argmax(1)).item()
    true = []
    for c in range(12):
        zeroed = _zeroed(model, {"4": [c]}, {"4": "5"})
        with torch.no_grad():
            true.append(abs(F.cross_entropy(zeroed(X), model(X).argmax(1)).item() - base))
    true = torch.tensor(true)
    assert torch.corrcoef(torch.stack([taylor, true]))[0, 1] > 0.5


# ---------------------------------------------------------------- bad input
@settings(max_examples=25, deadline=None)
@given(st.one_of(st.floats(allow_nan=True).filter(lambda a: not 0 <= a < 1), st.just(True), st.text(max_size=3)))
def test_bad_amount(amount):
    model = small_cnn()
    with pytest.raises(InputError, match="amount must be"):
        prune_channels(model, score(model, "channel_l1"), amount, example_input=X)


def test_bad_importance_and_arguments():
    model = small_cnn()
    imp = score(model, "channel_l1")
    with pytest.raises(InputError, match="unit='channel'"):
        prune_channels(model, dataclasses.replace(imp, unit="neuron"), 0.3, example_input=X)
    with pytest.raises(InputError, match="channel Importance"):
        prune_channels(model, imp.values, 0.3, example_input=X)
    other = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 3)).eval()
    with pytest.raises(ModelError, match="another model"):
        prune_channels(other, imp, 0.3, example_input=X)
    with pytest.raises(InputError, match="allocation"):
        prune_channels(model, imp, 0.3, allocation="even", example_input=X)
    with pytest.raises(InputError, match="NaN"):
        prune_channels(model, _with_values(imp, torch.full_like(imp.values, float("nan"))), 0.3, example_input=X)
    with pytest.raises(InputError, match="example_input"):
        prune_channels(model, imp, 0.3, example_input=torch.randn(2, 5, 8, 8))
    with pytest.raises(InputError, match="unknown layer pattern"):
        score(model, "channel_l1", layers="nope")
    with pytest.raises(InputError, match="calibration data"):
        score(model, "channel_taylor")
    with pytest.raises(ModelError, match="bn_scale needs"):
        score(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), "bn_scale")
    with pytest.raises(ModelError, match=r"no nn\.Conv"):
        score(nn.Sequential(nn.ReLU()), "channel_l1")


def test_untraceable_module_is_named_and_layers_avoid_it():
    model = WithUntraceable().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ModelError, match=r"'odd'.*layers="):
        score(model, "bn_scale")
    with pytest.raises(ModelError, match=r"'odd'.*layers="):
        prune_channels(model, score(model, "channel_l1"), 0.5, example_input=x)
    imp = score(model, "channel_l1", layers=["^a$", "^b$", "^c$"])
    pruned, report = prune_channels(model, imp, 0.5, example_input=x)
    assert set(report.removed) == {"b"} and "odd" in report.skipped["a"] and pruned.c.in_channels == 3
    assert pruned.odd.conv.in_channels == 4


# ------------------------------------------------------ mean compensation
def _constant_channels(model: nn.Module, chosen: dict[str, list[int]], batchnorms: dict[str, str]) -> nn.Module:
    """Make the chosen channels constant after their BatchNorm (gamma = 0; beta > 0 or < 0 so relu(beta) varies)."""
    with torch.no_grad():
        for name, idx in chosen.items():
            bn = model.get_submodule(batchnorms[name])
            bn.weight[idx] = 0
            bn.bias[idx] = torch.linspace(-0.5, 1.5, len(idx))
    return model


def _unpadded() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, bias=False), nn.BatchNorm2d(6),
            nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3),
        )
    )  # fmt: skip


def test_compensation_is_exact_for_constant_channels():
    chosen = {"0": [1, 4, 6], "3": [0, 2]}
    model = _constant_channels(_unpadded(), chosen, {"0": "1", "3": "4"})
    imp = _lowest_at(score(model, "channel_l1"), chosen)
    cal = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x = torch.randn(5, 3, 8, 8)
    plain, _ = prune_channels(model, imp, 0.375, example_input=x)
    pruned, report = prune_channels(
        model, imp, 0.375, example_input=x, compensate=True, calibration=cal, recalibrate_bn=False
    )
    assert report.removed == chosen and report.compensated == ["3", "7"] and report.biases_created == ["3"]
    assert report.recalibrated == [] and pruned[3].bias.shape == (6 - 2,)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-5)  # conv (no padding) and flatten->Linear
        assert not torch.allclose(plain(x), model(x), atol=1e-2)
    assert report.n_parameters_after == n_parameters(pruned) == n_parameters(plain) + 4


def test_compensation_through_pooling_and_padded_conv():
    # constant channels of "0" reach conv "4" (padding=1) after MaxPool; of "4" reach the Linear after global pooling
    chosen = {"0": [2, 5, 7], "4": [1, 3, 8, 9, 10]}
    model = _constant_channels(small_cnn(), chosen, {"0": "1", "4": "5"})
    imp = _lowest_at(score(model, "channel_l1"), chosen)
    pruned, report = prune_channels(
        model, imp, 0.4, example_input=X, compensate=True, calibration=X, recalibrate_bn=False
    )
    assert report.removed == chosen and report.compensated == ["4", "9"] and report.biases_created == []
    with torch.no_grad():
        inner, inner_ref = pruned[:5](X), model[:5](X)  # conv "4": exact away from the zero-padded border
        torch.testing.assert_close(inner[..., 1:-1, 1:-1], inner_ref[..., 1:-1, 1:-1][:, pruned_rows(report)])
        assert not torch.allclose(inner[..., 0, :], inner_ref[:, pruned_rows(report)][..., 0, :], atol=1e-3)
    only_last, _ = prune_channels(
        model, imp, 0.4, example_input=X, compensate=True, calibration=X, recalibrate_bn=False, layers="^4$"
    )
    with torch.no_grad():
        torch.testing.assert_close(only_last(X), model(X), rtol=1e-5, atol=1e-5)  # Linear consumer: exact


def pruned_rows(report) -> list[int]:
    return [c for c in range(12) if c not in report.removed["4"]]


def test_compensation_uses_the_mean_of_non_constant_channels():
    model = small_cnn()
    imp = score(model, "channel_l1")
    pruned, report = prune_channels(
        model, imp, 0.5, example_input=X, compensate=True, calibration=X, recalibrate_bn=False, layers="^4$"
    )
    gone = report.removed["4"]
    with torch.no_grad():
        feats = model[:9](X)  # the Linear's inputs in the original model
        expected = model[9].bias + model[9].weight[:, gone] @ feats[:, gone].mean(0)
        torch.testing.assert_close(pruned[9].bias, expected, rtol=1e-5, atol=1e-6)
        # mean preserved: the average logit over the calibration data is unchanged
        torch.testing.assert_close(pruned(X).mean(0), model(X).mean(0), rtol=1e-4, atol=1e-5)


def test_calibration_as_batches_of_pairs_gives_the_same_means():
    model = small_cnn()
    imp = score(model, "channel_l1")
    y = torch.zeros(6, dtype=torch.long)
    a, _ = prune_channels(model, imp, 0.5, example_input=X, compensate=True, calibration=X, recalibrate_bn=False)
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    b, _ = prune_channels(model, imp, 0.5, example_input=X, compensate=True, calibration=batches, recalibrate_bn=False)
    with torch.no_grad():
        torch.testing.assert_close(a(X), b(X), rtol=1e-5, atol=1e-6)


def test_recalibrate_bn_is_the_cumulative_average_and_keeps_weights():
    model = small_cnn()
    imp = score(model, "channel_l1")
    plain, _ = prune_channels(model, imp, 0.5, example_input=X, compensate=True, calibration=X, recalibrate_bn=False)
    pruned, report = prune_channels(model, imp, 0.5, example_input=X, compensate=True, calibration=X, batch_size=2)
    assert report.recalibrated == ["1", "5"] and report.compensated == ["4", "9"]
    with torch.no_grad():
        h = pruned[0](X)  # the first BatchNorm's input does not depend on the other statistics
        means = torch.stack([c.mean((0, 2, 3)) for c in h.split(2)])
        variances = torch.stack([c.transpose(0, 1).reshape(h.shape[1], -1).var(1) for c in h.split(2)])
    torch.testing.assert_close(pruned[1].running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pruned[1].running_var, variances.mean(0), rtol=1e-5, atol=1e-6)
    assert int(pruned[1].num_batches_tracked) == 3 and pruned[1].momentum == 0.1 and not pruned.training
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), pruned.parameters()))
    assert not torch.allclose(plain[5].running_var, pruned[5].running_var)


def test_input_model_unchanged_with_calibration():
    model = small_cnn().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = [dict(m._forward_pre_hooks) for m in model.modules()]
    pruned, report = prune_channels(
        model, score(model, "channel_l1"), 0.5, example_input=X, compensate=True, calibration=X
    )
    assert report.compensated and report.recalibrated
    assert model.training and all(m.training for m in model.modules()) and pruned.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [dict(m._forward_pre_hooks) for m in model.modules()] == hooks_before
    assert model[1].momentum == 0.1 and all(not m._forward_pre_hooks for m in pruned.modules())


def test_bad_calibration():
    model = small_cnn()
    imp = score(model, "channel_l1")
    with pytest.raises(InputError, match=r"calibration samples have shape \(3, 9, 9\)"):
        prune_channels(model, imp, 0.5, example_input=X, calibration=torch.randn(4, 3, 9, 9))
    with pytest.raises(InputError, match="positionally"):
        prune_channels(model, imp, 0.5, example_input=X, calibration=torch.ones(4, 3, 8, 8, dtype=torch.long))
    with pytest.raises(InputError, match="NaN"):
        prune_channels(model, imp, 0.5, example_input=X, calibration=torch.full((2, 3, 8, 8), float("nan")))
    with pytest.raises(InputError, match="compensate=True needs calibration"):
        prune_channels(model, imp, 0.5, example_input=X, compensate=True)
    with pytest.raises(InputError, match="recalibrate_bn=True needs calibration"):
        prune_channels(model, imp, 0.5, example_input=X, recalibrate_bn=True)
    with pytest.raises(InputError, match="compensate must be"):
        prune_channels(model, imp, 0.5, example_input=X, calibration=X, compensate="yes")
    with pytest.raises(InputError, match="batch_size"):
        prune_channels(model, imp, 0.5, example_input=X, calibration=X, batch_size=0)
    mlp = _randomize_bn(nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3)))
    x = torch.randn(3, 6)
    with pytest.raises(InputError, match="more than one sample"):
        prune_channels(mlp, score(mlp, "channel_l1"), 0.5, example_input=x, calibration=x, batch_size=1)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=4).filter(lambda s: s != [3, 8, 8]))
def test_calibration_of_another_shape_is_rejected(shape):
    model = small_cnn()
    with pytest.raises(InputError, match="calibration samples have shape"):
        prune_channels(model, score(model, "channel_l1"), 0.5, example_input=X, calibration=torch.randn(2, *shape))


def test_calibration_recalibrates_batchnorm_and_compensation_is_opt_in():
    model = small_cnn()
    _, report = prune_channels(model, score(model, "channel_l1"), 0.5, example_input=X, calibration=X)
    assert report.recalibrated and not report.compensated and not report.biases_created
