"""LIFT principal-weight sparse tuning and PST sparse training: ground truth, sparse optimizer state, schedules,
the user's model untouched, bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import whatmatters as wm
from whatmatters.core.errors import InputError, ModelError
from whatmatters.tune import LIFT, PST, cubic_sparsity, principal_magnitude
from whatmatters.tune.memory import optimizer_state_bytes


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3))


def train(tuner, steps: int = 30, lr: float = 1e-2, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g)
    opt = torch.optim.Adam(tuner.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(tuner.model(x), y)
        loss.backward()
        tuner.step(opt)
        losses.append(float(loss.detach()))
    return losses


def snapshot(model: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    return [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]


def test_principal_magnitude_is_the_truncated_svd_and_finds_the_low_rank_structure():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)
    spikes = torch.zeros(40, 30)
    spikes.view(-1)[torch.randperm(1200, generator=g)[:20]] = 8.0  # large entries outside the structure
    weight = low + spikes
    u, s, vh = np.linalg.svd(weight.double().numpy(), full_matrices=False)
    reference = np.abs((u[:, :2] * s[:2]) @ vh[:2])
    np.testing.assert_allclose(principal_magnitude(weight, 2).numpy(), reference, rtol=1e-4, atol=1e-4)
    k = 60  # 5 %
    top_low = set(low.abs().flatten().topk(k).indices.tolist())
    top_spikes = set(spikes.flatten().nonzero().flatten().tolist())
    lift = set(principal_magnitude(weight, 2).flatten().topk(k).indices.tolist())
    magnitude = set(weight.abs().flatten().topk(k).indices.tolist())
    assert top_spikes <= magnitude  # |W| takes every spike: it does not see the structure
    assert len(lift & top_spikes) <= len(top_spikes) // 4  # seed 0: 5 of 20
    assert len(lift & top_low) >= 0.8 * k and len(lift & top_low) >= len(magnitude & top_low) + 8  # 51 vs 40
    imp = wm.compress.score(mlp(), "lift", rank=3)
    torch.testing.assert_close(imp["2"].values, principal_magnitude(mlp()[2].weight, 3))


def test_lift_updates_only_the_chosen_entries_with_sparse_optimizer_state():
    model = mlp()
    before = snapshot(model)
    tuner = LIFT(model, fraction=0.1, rank=2, modules=r"^[02]$")
    counts = {n: layer.values.numel() for n, layer in tuner.layers.items()}
    assert counts == {"0": round(0.1 * 192), "2": 16} and tuner.trainable == sum(counts.values())
    losses = train(tuner)
    assert losses[-1] < losses[0]
    # Adam state: exp_avg and exp_avg_sq of the k values, one step counter per tensor
    assert tuner.peak["optimizer_state"] == sum(2 * 4 * k + 4 for k in counts.values())
    assert tuner.peak["gradients"] == 4 * sum(counts.values())
    merged = tuner.merged()
    assert all(isinstance(merged[i], nn.Linear) for i in (0, 2, 4))
    for name, mask in tuner.masks().items():
        change = merged.get_submodule(name).weight - model.get_submodule(name).weight
        assert (change[~mask] == 0).all() and (change[mask] != 0).float().mean() > 0.9
    torch.testing.assert_close(merged[4].weight, model[4].weight)  # not in modules=, not in train=: frozen
    for (n, p, flag), (n2, p2, flag2) in zip(before, snapshot(model)):
        assert n == n2 and flag == flag2 and torch.equal(p, p2)  # the user's model is untouched
    assert [p.requires_grad for p in merged.parameters()] == [True] * 6


def test_lift_reselection_keeps_the_function_and_restarts_the_state():
    tuner = LIFT(mlp(), fraction=0.2, rank=2, modules=r"^[02]$", train=r"^4\.")
    train(tuner, steps=5)
    opt = torch.optim.Adam(tuner.parameters(), lr=1e-2)
    x = torch.randn(5, 12)
    tuner.model(x).sum().backward()
    opt.step()
    out = tuner.model(x).detach()
    old = {n: layer.index.clone() for n, layer in tuner.layers.items()}
    tuner.reselect(opt)
    torch.testing.assert_close(tuner.model(x), out)
    assert all((layer.values == 0).all() and layer.values not in opt.state for layer in tuner.layers.values())
    assert any(not torch.equal(old[n], layer.index) for n, layer in tuner.layers.items())
    assert optimizer_state_bytes(opt) == sum(8 * p.numel() + 4 for p in tuner.model[4].parameters())


def test_lift_magnitude_baseline_chooses_the_largest_weights():
    model = mlp()
    tuner = LIFT(model, fraction=0.25, score="magnitude", modules=r"^2$")
    chosen = tuner.masks()["2"]
    assert model[2].weight.abs()[chosen].min() >= model[2].weight.abs()[~chosen].max()


def test_cubic_schedule_rises_to_the_target():
    values = [cubic_sparsity(t, 0.75, 100) for t in range(101)]
    assert values[:11] == [0.0] * 11 and values[70:] == [0.75] * 31
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert math.isclose(values[40], 0.75 * (1 - 0.5**3))


@pytest.mark.parametrize("method", ["pst", "movement", "magnitude"])
def test_pst_reaches_the_target_sparsity_and_learns_its_scores(method):
    model = mlp()
    before = snapshot(model)
    tuner = PST(model, sparsity=0.75, steps=20, method=method, rank=2, score_rank=2, modules=r"^[02]$")
    train(tuner, steps=20)
    assert tuner.sparsity == 0.75
    merged = tuner.merged()
    x = torch.randn(6, 12)
    torch.testing.assert_close(merged(x), tuner.model(x))  # the merged model is the trained one
    for name in ("0", "2"):
        weight = merged.get_submodule(name).weight
        assert int((weight == 0).sum()) == round(0.75 * weight.numel())
    score_numbers = {"pst": (16 + 12) * 3 + (10 + 16) * 3, "movement": 16 * 12 + 10 * 16, "magnitude": 0}
    assert tuner.score_parameters() == score_numbers[method]
    layer = tuner.layers["0"]
    if method != "magnitude":  # the straight-through mask carries gradient to the learned score
        tuner.model(torch.randn(4, 12)).sum().backward()
        name = "score_Q" if method == "pst" else "score"
        assert getattr(layer, name).grad.abs().sum() > 0
    for (n, p, flag), (_, p2, flag2) in zip(before, snapshot(model)):
        assert flag == flag2 and torch.equal(p, p2), n


def test_sparse_tuners_refuse_a_pattern_matching_nothing_and_nan_weights():
    with pytest.raises(ModelError, match=r"no nn.Linear layer matches"):
        LIFT(mlp(), modules="attention")
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        LIFT(model)
    with pytest.raises(ModelError, match="NaN"):
        PST(model, steps=5, rank=2, score_rank=2)
    with pytest.raises(ModelError, match="NaN"):
        wm.compress.score(model, "principal_magnitude")


@settings(max_examples=30, deadline=None)
@given(fraction=st.one_of(st.floats(allow_nan=True), st.integers(-3, 3), st.booleans()))
def test_lift_refuses_a_fraction_outside_zero_one(fraction):
    if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1:
        return
    with pytest.raises(InputError, match="fraction"):
        LIFT(mlp(), fraction=fraction)


@settings(max_examples=30, deadline=None)
@given(rank=st.integers(-5, 40))
def test_rank_must_fit_every_matrix(rank):
    if 1 <= rank <= 10:  # the tuned matrix is 10 x 16
        assert LIFT(mlp(), rank=rank, modules=r"^2$").trainable == 8
        return
    with pytest.raises(InputError, match="rank"):
        LIFT(mlp(), rank=rank, modules=r"^2$")
    with pytest.raises(InputError, match="rank"):
        PST(mlp(), steps=5, rank=rank, score_rank=2, modules=r"^2$")


@settings(max_examples=30, deadline=None)
@given(sparsity=st.one_of(st.floats(allow_nan=True), st.sampled_from([1.0, -0.1, 1, True])))
def test_pst_refuses_a_sparsity_outside_zero_one(sparsity):
    if isinstance(sparsity, float) and 0 <= sparsity < 1:
        return
    with pytest.raises(InputError, match="sparsity"):
        PST(mlp(), sparsity=sparsity, steps=5, rank=2, score_rank=2)


def test_trainer_callback_runs_the_sparsity_schedule():
    transformers = pytest.importorskip("transformers")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 24

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(12, generator=g), "labels": torch.tensor(i % 3)}

    tuner = PST(Net(), sparsity=0.5, steps=6, rank=2, score_rank=2, modules=r"net\.[02]$")
    args = transformers.TrainingArguments(
        output_dir="/tmp/wm-tune-sparse-trainer",
        max_steps=6,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
        learning_rate=1e-2,
    )
    transformers.Trainer(model=tuner.model, args=args, train_dataset=Data(), callbacks=[tuner.callback()]).train()
    assert tuner.steps == 6 and tuner.sparsities[-1] == 0.5
    assert tuner.peak["gradients"] > 0 and tuner.peak["optimizer_state"] > 0
    weight = tuner.merged().net[0].weight
    assert int((weight == 0).sum()) == weight.numel() // 2
