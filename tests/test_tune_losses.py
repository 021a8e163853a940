"""Loss-based reweighting and driveability losses: known weights, ordinal targets, safety maps, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from whatmatters.core.errors import InputError
from whatmatters.tune.losses import (
    SafetyWeightedLoss,
    SoftOrdinalLoss,
    check_ordinal,
    safety_weights,
    soft_ordinal_targets,
)
from whatmatters.tune.reweight import LossWeightedSampler, loss_weights, weighted_loss


def test_weights_follow_the_loss_rank_in_the_batch():
    losses = torch.arange(20, dtype=torch.float32).flip(0)  # example 19 is the easiest, 0 the hardest
    w = loss_weights(losses, easy=0.25, hard=0.9)
    assert w.mean().item() == pytest.approx(1.0)
    easiest, medium, hardest = w[19], w[10], w[0]
    assert medium > easiest > hardest  # medium-hard up, easy down, the hardest (likely noise) capped lowest
    assert torch.equal(w[15:], torch.full((5,), easiest.item()))
    assert torch.equal(w[:2], torch.full((2,), hardest.item()))
    x = torch.rand(7, requires_grad=True)
    weighted_loss(x).backward()
    torch.testing.assert_close(x.grad, loss_weights(x) / 7)  # weights carry no gradient


def test_sampler_draws_the_medium_hard_examples_more():
    sampler = LossWeightedSampler(10, num_samples=4000)
    assert sampler.weights().unique().tolist() == [1.0]
    sampler.update(torch.arange(10), torch.arange(10, dtype=torch.float32))
    counts = torch.bincount(torch.tensor(list(sampler)), minlength=10)
    assert counts[5] > 2 * counts[0] and counts[5] > 5 * counts[9]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 10), min_size=1, max_size=30), st.integers(0, 29))
def test_nan_losses_are_refused(values, where):
    losses = torch.tensor(values)
    losses[where % len(values)] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        loss_weights(losses)


def test_soft_ordinal_targets_are_a_softmax_of_negative_distances():
    target = soft_ordinal_targets(torch.tensor([[0, 2]]), torch.tensor([[0.0, 1, 2], [1, 0, 1], [2, 1, 0]]), 1.0)
    assert target.shape == (1, 3, 2)
    torch.testing.assert_close(target[0, :, 0], torch.softmax(-torch.tensor([0.0, 1, 2]), 0))
    assert target[0, 0, 0] > target[0, 1, 0] > target[0, 2, 0]
    loss = SoftOrdinalLoss(3, scale=50.0)  # very sharp targets: cross-entropy
    logits, labels = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    torch.testing.assert_close(loss(logits, labels), F.cross_entropy(logits, labels), atol=1e-4, rtol=1e-4)
    near = torch.zeros(1, 3, 1, 1)
    near[0, 1] = 5.0  # predicts level 1 for a level-2 pixel: cheaper than predicting level 0
    far = torch.zeros(1, 3, 1, 1)
    far[0, 0] = 5.0
    two = torch.full((1, 1, 1), 2)
    assert SoftOrdinalLoss(3)(near, two) < SoftOrdinalLoss(3)(far, two)


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 6), st.data())
def test_non_ordinal_distances_are_refused(k, data):
    d = (torch.arange(k)[:, None] - torch.arange(k)[None, :]).abs().float()
    i = data.draw(st.integers(0, k - 1).filter(lambda i: max(i, k - 1 - i) >= 2))
    far = max(range(k), key=lambda j: abs(j - i))  # at least 2 levels away
    d[i, far] = d[far, i] = 0.5  # closer than the level next to i on the way there
    with pytest.raises(InputError, match="not ordinal"):
        check_ordinal(d)


def test_safety_weights_mark_edges_the_road_ahead_and_danger():
    levels = torch.zeros(1, 8, 8, dtype=torch.long)
    levels[:, :, 3:] = 2  # road on the right
    classes = torch.zeros_like(levels)
    classes[0, 0, 7] = 4
    w = safety_weights(levels, classes, boundary=2.0, front=1.0, danger=3.0, danger_classes=(4,))
    assert w[0, 0, 0] == 1.0  # far from the edge, top row, not dangerous
    assert w[0, 0, 2] == 3.0 and w[0, 0, 3] == 3.0  # the driveable / non-driveable edge
    assert w[0, 7, 4] == 2.0  # in front of the vehicle
    assert w[0, 0, 7] == 4.0  # a dangerous class
    logits = torch.randn(1, 3, 8, 8)
    loss = SafetyWeightedLoss(danger_classes=(4,))(logits, levels, classes)
    per_pixel = -(
        soft_ordinal_targets(levels, check_ordinal(torch.tensor([[0.0, 1, 2], [1, 0, 1], [2, 1, 0]])), 2.0)
        * F.log_softmax(logits, 1)
    ).sum(1)
    weight = safety_weights(levels, classes, danger_classes=(4,))
    torch.testing.assert_close(loss, (weight * per_pixel).sum() / weight.sum())
    with pytest.raises(InputError, match="classes"):
        safety_weights(levels, danger_classes=(4,))


def test_driving_scenes_have_the_known_levels_and_the_unet_segments_them():
    from whatmatters.tune.driving import LEVELS, OBSTACLE, TinyUNet, driving_scenes, segmentation_scores

    images, classes, levels = driving_scenes(6, size=32, seed=0)
    assert images.shape == (6, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(levels, LEVELS[classes]) and LEVELS.tolist() == [0, 2, 1, 1, 0]
    assert (classes[:, 0] == 0).all() and (classes[:, -1, 16] != 0).all()  # sky on top, never at the bottom
    assert (classes == OBSTACLE).any()
    assert torch.equal(driving_scenes(6, seed=0)[0], images)
    logits = TinyUNet()(images)
    assert logits.shape == (6, 3, 32, 32)
    perfect = segmentation_scores(levels, levels, levels >= 0)
    assert perfect == {"miou": 1.0, "ordinal_error": 0.0, "critical_error": 0.0}
    off = segmentation_scores(torch.zeros_like(levels), levels, levels == 2)
    assert off["critical_error"] == 1.0 and off["ordinal_error"] == pytest.approx(levels.float().mean().item())
