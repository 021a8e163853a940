"""Model merging: task arithmetic / TIES / PCB on hand-checked task vectors, PCB beats random drop of the same
share on real fine-tunes (an MLP on scikit-learn's digits), the inputs are never changed, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import benchmark_script
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from whatmatters.compress.merge import merge, pcb_weights, ties_merge
from whatmatters.core.errors import InputError, ModelError


def mlp(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))


def test_task_arithmetic_at_one_over_n_is_weight_averaging_and_inputs_stay():
    base, a, b = mlp(0), mlp(1), mlp(2)
    before = [m.state_dict()["0.weight"].clone() for m in (base, a, b)]
    merged, report = merge(base, [a, b], "task_arithmetic")
    assert report.scaling == 0.5 and report.n_merged == sum(p.numel() for p in base.parameters())
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, (a.state_dict()[k] + b.state_dict()[k]) / 2, atol=1e-6)
    assert all(torch.equal(m.state_dict()["0.weight"], w) for m, w in zip((base, a, b), before))


def test_ties_trims_elects_signs_and_averages_the_agreeing_values():
    tvs = torch.tensor([[3.0, -2.0, 0.1, 1.0, 0.2], [1.0, 4.0, -0.1, -3.0, 0.3]])
    # keep 60 %: three largest magnitudes per task; signs by the sum of the kept values
    merged = ties_merge(tvs, 0.6)
    assert torch.allclose(merged, torch.tensor([2.0, 4.0, 0.0, -3.0, 0.0]))


def test_pcb_keeps_the_share_and_favours_large_agreeing_entries():
    g = torch.Generator().manual_seed(0)
    tvs = torch.randn(3, 1000, generator=g) * 0.01
    tvs[:, :10] = 0.5  # large and agreeing in every task
    tvs[0, 10:20], tvs[1, 10:20] = 0.5, -0.5  # large but in conflict
    _, weights = pcb_weights(tvs, 0.1)
    kept = (weights > 0).float().mean(1)
    assert torch.allclose(kept, torch.full((3,), 0.1), atol=0.002)
    assert bool((weights[:, :10] > 0.9).all())
    assert float(weights[:2, 10:20].mean()) < float(weights[:, :10].mean())


def test_exclude_keeps_the_base_values():
    base, a, b = mlp(0), mlp(1), mlp(2)
    merged, report = merge(base, [a, b], "pcb", exclude=r"^2\.")
    assert torch.equal(merged[2].weight, base[2].weight) and report.excluded == ["2.weight", "2.bias"]
    assert not torch.equal(merged[0].weight, base[0].weight)


def test_excluded_heads_may_differ_in_shape():
    base, a, b = mlp(0), mlp(1), mlp(2)
    b[2] = nn.Linear(8, 3)
    merged, report = merge(base, [a, b], "ties", exclude=r"^2\.")
    assert report.excluded == ["2.weight", "2.bias"] and torch.equal(merged[2].weight, base[2].weight)


def test_pcb_beats_random_drop_of_the_same_share_on_real_fine_tunes():
    # four fine-tunes of one pre-trained digits MLP (benchmarks/bench_merge.py's digits suite); both at keep=0.3,
    # each with its λ picked on validation digits from the same grid (wide enough for the unrescaled random
    # masks, whose best λ is 2-5), scored on held-out test digits. Over 5 seeds PCB led by 0.024-0.074.
    bench = benchmark_script("bench_merge")
    base, tuned, data = bench.digits_suite(seed=0)
    test_accuracy = {}
    for method in ("pcb", "random"):
        points = [
            {"keep": 0.3, "scaling": s, **bench.merged_accuracies(base, tuned, data, method, 0.3, s)}
            for s in (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
        ]
        test_accuracy[method] = bench._mean(bench.best(points)["test"])
    alone = bench._mean([bench.accuracy(t, d) for t, d in zip(tuned, data)])
    assert test_accuracy["pcb"] > test_accuracy["random"] + 0.02 and alone > test_accuracy["pcb"]


def test_models_of_different_shapes_are_refused():
    with pytest.raises(ModelError, match="same shapes"):
        merge(mlp(0), [mlp(1), mlp(2, width=9)], "ties")
    with pytest.raises(ModelError, match="different parameters"):
        merge(mlp(0), [nn.Sequential(nn.Linear(4, 8))], "ties")
    with pytest.raises(InputError, match="list of one or more"):
        merge(mlp(0), mlp(1))
    with pytest.raises(InputError, match="method"):
        merge(mlp(0), [mlp(1)], "dare")


@given(keep=st.one_of(st.floats(-1, 0), st.floats(1.0001, 5), st.just(float("nan")), st.just("half")))
@settings(max_examples=25, deadline=None)
def test_keep_outside_zero_one_is_refused(keep):
    with pytest.raises(InputError, match="keep"):
        merge(mlp(0), [mlp(1), mlp(2)], "pcb", keep=keep)
