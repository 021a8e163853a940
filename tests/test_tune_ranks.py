"""LoRA rank budget from a layer Importance: proportional, bounded, summing to the budget, a working LoraConfig."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from whatmatters import Importance
from whatmatters.core.errors import InputError
from whatmatters.tune import allocate_ranks, lora_config


def layer_imp(values, prefix="bert.encoder.layer"):
    values = torch.as_tensor(values, dtype=torch.float32)
    names = [f"{prefix}.{i}" for i in range(len(values))]
    return Importance(values, unit="layer", names=names, per_sample=False)


def test_ranks_follow_the_scores_within_the_budget():
    ranks = allocate_ranks(layer_imp([0.0, 1.0, 3.0, 0.0]), 20, min_rank=2)
    assert sum(ranks) == 20 and ranks[0] == ranks[3] == 2
    assert ranks == [2, 5, 11, 2]  # 12 free units shared 1:3 over the lowest score
    capped = allocate_ranks(layer_imp([0.0, 1.0, 30.0, 0.0]), 20, min_rank=2, max_rank=8)
    assert sum(capped) == 20 and max(capped) == 8 and capped[1] == 8
    assert allocate_ranks(layer_imp([5.0, 5.0, 5.0]), 9) == [3, 3, 3]


def test_lora_config_gives_the_model_those_ranks():
    peft = pytest.importorskip("peft")
    config = lora_config(layer_imp([0.0, 2.0]), 8, min_rank=2, target_modules=["query", "value"])
    model = peft.get_peft_model(tiny_model("bert"), config)
    ranks = {n: m.r["default"] for n, m in model.named_modules() if hasattr(m, "r") and isinstance(m.r, dict)}
    assert {r for n, r in ranks.items() if ".layer.0." in n} == {2}
    assert {r for n, r in ranks.items() if ".layer.1." in n} == {6}


def test_bad_scores_and_budgets_are_refused():
    with pytest.raises(InputError, match="NaN"):
        allocate_ranks(layer_imp([0.0, float("nan")]), 4)
    with pytest.raises(InputError, match="budget"):
        allocate_ranks(layer_imp([0.0, 1.0]), 40, max_rank=8)
    with pytest.raises(InputError, match="unit 'layer'"):
        allocate_ranks(Importance(torch.ones(3), unit="head", per_sample=False), 4)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=12),
    st.integers(0, 3),
    st.integers(1, 16),
    st.integers(0, 200),
)
def test_ranks_always_sum_to_the_budget_and_stay_in_bounds(scores, low, high, budget):
    high = max(high, low, 1)
    n = len(scores)
    if not n * low <= budget <= n * high:
        with pytest.raises(InputError, match="budget"):
            allocate_ranks(layer_imp(scores), budget, min_rank=low, max_rank=high)
        return
    ranks = allocate_ranks(layer_imp(scores), budget, min_rank=low, max_rank=high)
    assert sum(ranks) == budget and all(low <= r <= high for r in ranks)
