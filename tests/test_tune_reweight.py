"""Small-loss selection under injected label noise (finds the flipped labels, beats uniform), its sampler, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from whatmatters.core.errors import InputError, MethodError
from whatmatters.tune.reweight import (
    LossWeightedSampler,
    drop_schedule,
    loss_weights,
    scheme_weights,
    small_loss_weights,
    weighted_loss,
)


def noisy_blobs(seed: int = 0, n: int = 400, noise: float = 0.4):
    """4 Gaussian classes in 10-D; ``noise`` of the training labels moved to another class; a clean test set."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 10, generator=g)
    y = torch.randint(0, 4, (n + 200,), generator=g)
    x = centres[y] + torch.randn(n + 200, 10, generator=g)
    flipped = torch.rand(n, generator=g) < noise
    noisy = y[:n].clone()
    noisy[flipped] = (noisy[flipped] + torch.randint(1, 4, (int(flipped.sum()),), generator=g)) % 4
    return x[:n], noisy, flipped, x[n:], y[n:]


def train(small_loss: bool, steps: int = 300):
    x, y, flipped, test_x, test_y = noisy_blobs()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    weight_sum = torch.zeros(len(y))
    for step in range(steps):
        losses = F.cross_entropy(net(x), y, reduction="none")
        drop = drop_schedule(step, drop=0.4, warmup=50)
        loss = weighted_loss(losses, scheme="small_loss", drop=drop) if small_loss else losses.mean()
        weight_sum += small_loss_weights(losses, drop=drop)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (net(test_x).argmax(1) == test_y).float().mean().item()
    return accuracy, weight_sum[flipped].mean() / weight_sum[~flipped].mean()


def test_small_loss_selection_finds_the_flipped_labels_and_beats_uniform():
    uniform, _ = train(small_loss=False)
    selected, flipped_vs_clean = train(small_loss=True)
    assert flipped_vs_clean < 0.5  # the flipped examples got well under half the clean ones' weight
    assert selected > uniform + 0.1  # uniform memorizes the 40 % wrong labels (0.66 vs 0.82 clean test accuracy)


def test_small_loss_weights_drop_the_highest_losses_and_keep_the_mean():
    losses = torch.tensor([0.1, 5.0, 0.3, 2.0, 0.2])
    w = small_loss_weights(losses, drop=0.4)
    assert w.tolist() == pytest.approx([5 / 3, 0, 5 / 3, 0, 5 / 3])
    assert small_loss_weights(losses, drop=0.0).tolist() == [1.0] * 5
    assert small_loss_weights(torch.tensor([3.0]), drop=0.9).tolist() == [1.0]  # one example is always kept
    assert [drop_schedule(s, drop=0.3, warmup=10) for s in (0, 5, 10, 50)] == pytest.approx([0, 0.15, 0.3, 0.3])
    assert drop_schedule(0, drop=0.3, warmup=0) == 0.3
    x = torch.rand(6, requires_grad=True)
    weighted_loss(x, weights=torch.arange(6.0)).backward()
    torch.testing.assert_close(x.grad, torch.arange(6.0) / 6)


def test_small_loss_sampler_never_draws_the_dropped_examples():
    sampler = LossWeightedSampler(10, scheme="small_loss", num_samples=2000, drop=0.3)
    sampler.update(torch.arange(10), torch.arange(10, dtype=torch.float32))
    counts = torch.bincount(torch.tensor(list(sampler)), minlength=10)
    assert counts[7:].sum() == 0 and (counts[:7] > 200).all()
    sampler.options["drop"] = 0.0
    assert (torch.bincount(torch.tensor(list(sampler)), minlength=10) > 100).all()


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(0, 10), min_size=1, max_size=20), st.integers(0, 19), st.sampled_from(["bands", "small_loss"])
)
def test_nan_losses_and_nan_weights_are_refused(values, where, scheme):
    losses, weights = torch.tensor(values), torch.ones(len(values))
    weights[where % len(values)] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        weighted_loss(losses, weights=weights)
    losses[where % len(values)] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        weighted_loss(losses, scheme=scheme)


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.floats(max_value=-1e-6), st.floats(min_value=1.0), st.just(float("nan"))))
def test_shares_outside_their_range_are_refused(share):
    losses = torch.rand(8)
    with pytest.raises(InputError, match="drop"):
        small_loss_weights(losses, drop=share)
    with pytest.raises(InputError, match="drop"):
        drop_schedule(3, drop=share, warmup=10)
    if share > 1 or share < 0:
        with pytest.raises(InputError, match="easy"):
            loss_weights(losses, easy=share, hard=1.0)


def test_bad_schemes_options_and_weights_are_named():
    losses = torch.rand(4)
    with pytest.raises(MethodError, match="small_loss"):
        scheme_weights(losses, "co_teaching")
    with pytest.raises(MethodError, match="not drop"):
        LossWeightedSampler(4, drop=0.2)  # bands takes easy / hard / weights, not drop
    with pytest.raises(InputError, match="shape"):
        weighted_loss(losses, weights=torch.ones(3))
    with pytest.raises(InputError, match="not all 0"):
        weighted_loss(losses, weights=torch.zeros(4))
    with pytest.raises(InputError, match="step"):
        drop_schedule(-1, drop=0.2, warmup=5)


def test_train_loop_takes_a_reweighting_scheme_by_name_and_refuses_an_unknown_one():
    from whatmatters.tune.finetune import Split, train_loop

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.EmbeddingBag(20, 3, mode="sum")

        def forward(self, input_ids, attention_mask, labels, reduction="mean"):
            logits = self.emb(input_ids, per_sample_weights=attention_mask.float())
            return {"loss": torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)}

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (40, 6), generator=g)
    train = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    split = Split(train, torch.randint(0, 3, (40,), generator=g), train, torch.zeros(40, dtype=torch.long), 3)
    runs = {}
    for reweight in (False, True, "small_loss"):
        torch.manual_seed(0)
        model = Toy()
        runs[reweight] = train_loop(model, split, lambda *_: None, steps=3, batch_size=8, reweight=reweight)
    assert runs[False] != runs["small_loss"] and runs[True] != runs["small_loss"]
    calls = []
    with pytest.raises(MethodError, match="unknown reweighting scheme"):
        train_loop(Toy(), split, lambda *a: calls.append(a), steps=3, batch_size=8, reweight="smallest")
    assert not calls  # refused before the first step
