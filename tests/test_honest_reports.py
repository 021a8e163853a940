"""Every action's report matches the model it returns, and an amount that rounds to zero units warns."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_model
from torch import nn

from whatmatters.compress import prune, prune_channels, prune_experts, prune_structured, quantize, score
from whatmatters.compress.experts import moe_blocks
from whatmatters.compress.structured import blocks
from whatmatters.core.actions import n_parameters

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 60, (4, 12), generator=torch.Generator().manual_seed(0))


def _units(model: nn.Module, unit: str) -> int:
    blks = blocks(model)[1]
    if unit == "layer":
        return len(blks)
    if unit == "head":
        return sum(b.n_heads for b in blks)
    return sum(int(b.down.weight.shape[1]) for b in blks)


@pytest.mark.parametrize(("method", "unit"), [("flap_head", "head"), ("neuron_activation", "neuron"),
                                               ("block_influence", "layer")])  # fmt: skip
def test_prune_structured_counts_what_it_removed(method, unit):
    model = tiny_model("llama", layers=4, kv_heads=4)
    out = prune_structured(model, score(model, method, data=IDS), amount=0.5)
    rep = out.report
    assert rep.n_parameters_before == n_parameters(model) and rep.n_parameters_after == n_parameters(out.model)
    assert rep.n_removed == _units(model, unit) - _units(out.model, unit) > 0


def test_prune_channels_counts_what_it_removed():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    out = prune_channels(net, score(net, "channel_l1"), amount=0.5, example_input=x)
    rep = out.report
    assert rep.n_parameters_before == n_parameters(net) and rep.n_parameters_after == n_parameters(out.model)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert rep.n_removed == sum(c.out_channels for c in convs) - sum(
        m.out_channels for m in out.model if isinstance(m, nn.Conv2d)
    )


def test_prune_experts_counts_what_it_removed():
    t = transformers
    torch.manual_seed(0)
    config = t.MixtralConfig(vocab_size=60, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                             num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    model = t.MixtralForCausalLM(config).eval()
    out = prune_experts(model, score(model, "expert_frequency", data=IDS), keep=0.5)
    rep = out.report

    def experts(m: nn.Module) -> int:
        return sum(b.n_experts for b in moe_blocks(m))

    assert rep.n_parameters_before == n_parameters(model) and rep.n_parameters_after == n_parameters(out.model)
    assert rep.n_removed == experts(model) - experts(out.model) == 4


def test_prune_and_quantize_report_the_weights_of_the_returned_model():
    model = tiny_model("llama", layers=2)
    out = prune(model, score(model, "magnitude"), sparsity=0.5)
    for row in out.report.layers:
        w = out.model.get_submodule(row["layer"]).weight
        assert row["zeros"] == int((w == 0).sum()) and row["n_weights"] == w.numel()
    assert out.report.n_parameters == n_parameters(out.model) == n_parameters(model)
    q = quantize(model, 4)
    assert q.report.n_parameters == n_parameters(q.model)
    assert q.report.n_weights == sum(q.model.get_submodule(r["layer"]).weight.numel() for r in q.report.layers)


def _warned(action) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in seen if issubclass(w.category, UserWarning)]


def test_an_amount_that_rounds_to_zero_units_warns():
    model = tiny_model("llama", layers=2)  # 2 key/value groups per block
    heads = score(model, "flap_head", data=IDS)
    assert any("rounds to 0" in m and "key/value groups" in m for m in _warned(
        lambda: prune_structured(model, heads, amount=0.2)))  # fmt: skip
    assert not _warned(lambda: prune_structured(model, heads, amount=0.5))
    assert any("rounds to 0" in m for m in _warned(lambda: prune(model, score(model, "magnitude"), sparsity=0.001)))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    assert any("rounds to 0" in m for m in _warned(
        lambda: prune_channels(net, score(net, "channel_l1"), amount=0.05, example_input=torch.randn(1, 3, 8, 8))
    ))  # fmt: skip
