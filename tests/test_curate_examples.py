"""Example scores: ground truth on injected label noise, parity with naive loops, model state, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import whatmatters as wm
from whatmatters import curate
from whatmatters.curate import Checkpoint, ForgettingRecorder, train_models

N, NOISE, CLASSES, DIMS = 300, 0.1, 4, 6


def noisy_mixture(n=N, seed=0):
    """A 4-class Gaussian mixture with 10 % of the labels flipped to another class; returns the noise mask."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    centers = torch.randn(CLASSES, DIMS, generator=gen) * 3
    x = centers[y] + torch.randn(n, DIMS, generator=gen)
    flip = torch.randperm(n, generator=gen)[: int(NOISE * n)]
    noisy = y.clone()
    noisy[flip] = (y[flip] + torch.randint(1, CLASSES, (len(flip),), generator=gen)) % CLASSES
    mask = torch.zeros(n, dtype=torch.bool)
    mask[flip] = True
    return x, noisy, y, mask


def mlp():
    return nn.Sequential(nn.Linear(DIMS, 16), nn.ReLU(), nn.Linear(16, CLASSES))


@pytest.fixture(scope="module")
def noisy():
    x, y, clean, mask = noisy_mixture()
    run = train_models(mlp, x, y, epochs=5, seeds=2, lr=0.05, batch_size=32)
    return x, y, clean, mask, run


def precision_at_noise(values, mask, lowest=False):
    order = values.argsort(descending=not lowest)[: int(mask.sum())]
    return float(mask[order].float().mean())


@pytest.mark.parametrize(
    "method, which",
    [
        ("loss", "final"),
        ("el2n", "early"),
        ("grand", "early"),
        ("forgetting", "run"),
        ("tracin", "run"),
        ("trak", "final"),
    ],
)
def test_self_scores_rank_noisy_labels_first(noisy, method, which):
    x, y, _, mask, run = noisy
    model = {"final": run.models(), "early": run.models(epoch=2), "run": run}[which]
    imp = curate.score(model, data=x, y=y, method=method)
    assert imp.unit == "example" and imp.values.shape == (N,) and not imp.per_sample
    assert imp.method == method
    # random precision is NOISE = 0.1; every score finds most of the flipped labels
    assert precision_at_noise(imp.values, mask) > NOISE + 0.4, method


@pytest.mark.parametrize("method", ["tracin", "trak"])
def test_influence_on_clean_test_data_marks_noisy_examples_as_opponents(noisy, method):
    x, y, clean, mask, run = noisy
    test_x, test_y = x[~mask][:120], clean[~mask][:120]  # clean, correctly labelled examples
    model = run if method == "tracin" else run.models()
    imp = curate.score(model, data=x, y=y, method=method, test_data=test_x, test_y=test_y)
    assert precision_at_noise(imp.values, mask, lowest=True) > NOISE + 0.2


def test_scores_average_over_models_and_methods_are_listed(noisy):
    x, y, _, _, run = noisy
    a, b = run.models()
    both = curate.score([a, b], data=x, y=y, method="el2n").values
    one = [curate.score(m, data=x, y=y, method="el2n").values for m in (a, b)]
    torch.testing.assert_close(both, (one[0] + one[1]) / 2)
    assert {"loss", "el2n", "grand", "forgetting", "tracin", "trak"} <= set(wm.methods(verb="curate"))
    assert set(wm.methods(unit="example")) >= {"el2n", "trak"}


def test_grand_and_tracin_equal_naive_per_example_autograd(noisy):
    x, y, *_ = noisy
    models = [mlp(), mlp()]
    checkpoints = [Checkpoint(models[0], lr=0.1), Checkpoint(models[1], lr=0.02, epoch=1)]

    def naive_grad(model, i):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    rows = range(0, N, 37)
    expected_grand = torch.stack([torch.tensor([naive_grad(m, i).norm() for i in rows]) for m in models]).mean(0)
    got = curate.score(models, data=x, y=y, method="grand", batch_size=50).values[list(rows)]
    torch.testing.assert_close(got.float(), expected_grand, rtol=1e-5, atol=1e-6)

    test = [3, 4]
    mean_test = {id(m): sum(naive_grad(m, j) for j in test) / 2 for m in models}
    expected = [sum(c.lr * naive_grad(c.model, i) @ mean_test[id(c.model)] for c in checkpoints) for i in rows]
    got = curate.score(checkpoints, data=x, y=y, method="tracin", test_data=x[test], test_y=y[test]).values
    torch.testing.assert_close(got[list(rows)].float(), torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_trak_is_seeded_and_its_projection_matters_only_through_the_seed(noisy):
    x, y, _, _, run = noisy
    a = curate.score(run.models()[0], data=x, y=y, method="trak", dim=64, seed=1).values
    b = curate.score(run.models()[0], data=x, y=y, method="trak", dim=64, seed=1).values
    c = curate.score(run.models()[0], data=x, y=y, method="trak", dim=64, seed=2, projection_kind="gaussian").values
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the two projections agree on the ranking (Spearman) far above chance
    ranks = [v.argsort().argsort().double() for v in (a, c)]
    assert float(torch.corrcoef(torch.stack(ranks))[0, 1]) > 0.6


def test_forgetting_recorder_counts_transitions():
    rec = ForgettingRecorder(3)
    right, wrong = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    y0 = torch.tensor([0])
    for logits in (right, wrong, right, wrong):  # example 0: learned, forgotten twice
        rec.record(logits, y0, torch.tensor([0]))
    for logits in (right, right):  # example 1: learned, never forgotten
        rec.record(logits, y0, torch.tensor([1]))
    rec.record(wrong, y0, torch.tensor([2]))  # example 2: never learned
    assert rec.counts().tolist() == [2.0, 0.0, 3.0]
    assert rec.counts("zero").tolist() == [2.0, 0.0, 0.0]
    imp = curate.score(rec, method="forgetting")
    assert imp.top(1) == [(2, 3.0)]


def test_models_are_left_as_they_were(noisy):
    x, y, *_ = noisy
    model = mlp().train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("loss", "grand", "tracin", "trak"):
        curate.score(model, data=x, y=y, method=method, dim=8) if method == "trak" else curate.score(
            model, data=x, y=y, method=method
        )
    assert model.training and not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_train_models_leaves_a_template_model_untouched_and_is_reproducible():
    x, y, _, _ = noisy_mixture(n=64)
    template = mlp()
    before = [p.clone() for p in template.parameters()]
    a = train_models(template, x, y, epochs=2, seeds=[3], batch_size=16)
    b = train_models(template, x, y, epochs=2, seeds=[3], batch_size=16)
    assert all(torch.equal(p, q) for p, q in zip(before, template.parameters()))
    assert len(a.checkpoints) == 2 and a.epochs == 2 and a.seeds == [3]
    assert all(torch.equal(p, q) for p, q in zip(a.models()[0].parameters(), b.models()[0].parameters()))
    assert not any(torch.equal(p, q) for p, q in zip(before, a.models()[0].parameters()))


class NotLogits(nn.Module):
    def forward(self, x):
        return x.sum(1)


def test_clear_errors(noisy):
    x, y, *_ = noisy
    with pytest.raises(wm.ModelError, match="class logits"):
        curate.score(NotLogits(), data=x, y=y, method="el2n")
    with pytest.raises(wm.InputError, match="labels are missing"):
        curate.score(mlp(), data=x, method="loss")
    with pytest.raises(wm.InputError, match="out of range"):
        curate.score(mlp(), data=x, y=y + CLASSES, method="loss")
    with pytest.raises(wm.ModelError, match="cannot score examples"):
        curate.score("a model", data=x, y=y, method="tracin")
    with pytest.raises(wm.ModelError, match="training record"):
        curate.score(mlp(), data=x, y=y, method="forgetting")
    with pytest.raises(wm.MethodError, match="not a curate method"):
        curate.score(mlp(), data=x, y=y, method="saliency")
    with pytest.raises(wm.MethodError, match="unknown parameter"):
        curate.score(mlp(), data=x, y=y, method="el2n", dim=3)
    with pytest.raises(wm.MethodError, match="Did you mean"):
        curate.score(mlp(), data=x, y=y, method="el2m")


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(0, 6),
    labels=st.integers(0, 8),
    nan=st.booleans(),
)
def test_bad_data_and_labels_raise_input_errors(rows, labels, nan):
    x = torch.randn(rows, DIMS)
    if nan and rows:
        x[0, 0] = float("nan")
    y = np.arange(labels) % CLASSES
    bad = rows == 0 or labels != rows or (nan and rows > 0)
    if bad:
        with pytest.raises(wm.InputError):
            curate.score(mlp(), data=x, y=y, method="el2n")
    else:
        assert curate.score(mlp(), data=x, y=y, method="el2n").values.shape == (rows,)
