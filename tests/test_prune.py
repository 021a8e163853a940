"""Pruning: masks against reference loops, allocation, architectures (BERT, GPT-2, Llama, Qwen2 GQA, ViT), reload."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_batch, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import whatmatters as wm
from whatmatters.compress import ModelImportance, measure, prune, score
from whatmatters.compress.sparsity import layer_sparsities, masks, nm_mask, unstructured_mask


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


def reference_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's unstructured rule written as a plain loop: prune int(in x s) lowest per row (stable sort)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = int(scores.shape[1] * sparsity)
    for i in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: (float(scores[i, j]), j))
        for j in order[:k]:
            keep[i, j] = False
    return keep


def test_row_mask_matches_reference_loop_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (6, 10), generator=g).float()  # many ties, as in quantized weights
    for s in (0.0, 0.1, 0.3, 0.5, 0.7, 0.95):
        assert torch.equal(unstructured_mask(scores, s, "row"), reference_row_mask(scores, s)), s


def test_layer_group_prunes_the_lowest_of_the_whole_layer():
    scores = torch.randn(7, 9, generator=torch.Generator().manual_seed(1))
    keep = unstructured_mask(scores, 0.4, "layer")
    assert int((~keep).sum()) == int(63 * 0.4)
    assert float(scores[~keep].max()) <= float(scores[keep].min())


def test_nm_keeps_the_top_n_of_every_m_inputs():
    scores = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    for n, m in ((2, 4), (1, 4), (4, 8), (3, 4)):
        keep = nm_mask(scores, n, m)
        groups, kept = scores.reshape(5, -1, m), keep.reshape(5, -1, m)
        assert bool((kept.sum(-1) == n).all())
        lowest_kept = torch.where(kept, groups, torch.inf).amin(-1)
        highest_pruned = torch.where(kept, -torch.inf, groups).amax(-1)
        assert bool((lowest_kept >= highest_pruned).all())


def test_nm_needs_m_to_divide_the_inputs():
    model = nn.Sequential(nn.Linear(10, 4)).eval()
    with pytest.raises(wm.InputError, match="10 inputs, not divisible by M=4"):
        prune(model, score(model, "magnitude"), pattern="2:4")
    with pytest.raises(wm.InputError, match=r"fixes the sparsity at 0\.5"):
        prune(mlp(), score(mlp(), "magnitude"), sparsity=0.3, pattern="2:4")
    with pytest.raises(wm.InputError, match="allocation='uniform'"):
        prune(mlp(), score(mlp(), "magnitude"), pattern="2:4", allocation="global")
    with pytest.raises(wm.InputError, match="1 <= N <= M"):
        prune(mlp(), score(mlp(), "magnitude"), pattern="5:4")
    with pytest.raises(wm.InputError, match="unknown sparsity pattern"):
        prune(mlp(), score(mlp(), "magnitude"), pattern="structured")


def test_global_allocation_uses_one_threshold_and_exact_count_with_ties():
    g = torch.Generator().manual_seed(3)
    scores = {
        "a": torch.randint(0, 5, (4, 8), generator=g).float(),
        "b": torch.randint(2, 9, (6, 8), generator=g).float(),
    }
    keep, _ = masks(scores, 0.45, allocation="global")
    pruned = torch.cat([scores[n][~keep[n]] for n in scores])
    kept = torch.cat([scores[n][keep[n]] for n in scores])
    assert pruned.numel() == int(80 * 0.45)
    assert float(pruned.max()) <= float(kept.min())
    fractions = [float((~keep[n]).double().mean()) for n in scores]
    assert fractions[0] > fractions[1], "the low-scored layer loses more"


def test_proportional_allocation_hits_the_target_and_favours_important_layers():
    g = torch.Generator().manual_seed(4)
    scores = {
        "low": torch.rand(8, 16, generator=g),
        "mid": torch.rand(4, 16, generator=g) * 2,
        "high": torch.rand(8, 8, generator=g) * 4,
    }
    per_layer = layer_sparsities(scores, 0.5, "proportional", spread=0.2)
    sizes = {n: s.numel() for n, s in scores.items()}
    weighted = sum(per_layer[n] * sizes[n] for n in scores) / sum(sizes.values())
    assert weighted == pytest.approx(0.5, abs=1e-6)
    assert per_layer["low"] > per_layer["mid"] > per_layer["high"]
    assert all(0.3 - 1e-9 <= v <= 0.7 + 1e-9 for v in per_layer.values())
    assert layer_sparsities(scores, 0.5, "proportional", spread=0.0) == pytest.approx(dict.fromkeys(scores, 0.5))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64)).eval()
    with torch.no_grad():
        model[2].weight.mul_(3)  # the second layer matters more: it is pruned less
    _, report = prune(model, score(model, "magnitude"), 0.5, allocation="proportional", spread=0.2)
    frame = report.to_frame()
    assert report.achieved == pytest.approx(0.5, abs=0.02)
    assert frame.loc["0", "achieved"] > 0.6 and frame.loc["2", "achieved"] < 0.4


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), st.just(float("nan")), st.just(True)))
def test_sparsity_outside_zero_one_is_refused(bad):
    model = mlp()
    with pytest.raises(wm.InputError, match=r"sparsity must be a number in \[0, 1\)"):
        prune(model, score(model, "magnitude"), sparsity=bad)


@settings(max_examples=25, deadline=None)
@given(st.floats(min_value=0.0, max_value=0.99))
def test_every_row_loses_floor_of_its_share(sparsity):
    model = mlp()
    pruned, report = prune(model, score(model, "magnitude"), sparsity=sparsity)
    for layer in (pruned[0], pruned[2]):
        zeros = (layer.weight == 0).sum(1)
        assert bool((zeros == int(layer.in_features * sparsity + 1e-9)).all())
    assert report.target == sparsity


def test_prune_returns_a_copy_unless_inplace():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, report = prune(model, score(model, "magnitude"), sparsity=0.5)
    assert pruned is not model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.achieved == pytest.approx(0.5) and set(report.to_frame().index) == {"0", "2"}
    assert report.model_sparsity == pytest.approx(0.5 * (96 + 48) / sum(p.numel() for p in model.parameters()))
    same, _ = prune(model, score(model, "magnitude"), sparsity=0.5, inplace=True)
    assert same is model and float((model[0].weight == 0).double().mean()) == 0.5


def test_wanda_keeps_weights_on_loud_inputs_that_magnitude_drops():
    """Input 0 carries 100x larger activations through small weights: Wanda keeps them, magnitude prunes them."""
    torch.manual_seed(5)
    layer = nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.1, 1.0, -1.0, 0.8]).repeat(6, 1) * (1 + 0.1 * torch.rand(6, 4)))
    model = nn.Sequential(layer).eval()
    x = torch.randn(64, 4) * torch.tensor([100.0, 1.0, 1.0, 1.0])
    by_wanda, _ = prune(model, score(model, "wanda", data=x), sparsity=0.25)
    by_magnitude, _ = prune(model, score(model, "magnitude"), sparsity=0.25)
    assert bool((by_wanda[0].weight[:, 0] != 0).all()) and bool((by_magnitude[0].weight[:, 0] == 0).all())
    with torch.no_grad():
        err_wanda = (by_wanda(x) - model(x)).square().mean()
        err_magnitude = (by_magnitude(x) - model(x)).square().mean()
    assert err_wanda < err_magnitude / 10


def test_prune_scores_by_method_name_and_restricts_layers():
    model = mlp()
    x = torch.randn(16, 8)
    pruned, report = prune(model, "wanda", 0.5, data=x, layers="^2$")
    assert report.method == "wanda" and [r["layer"] for r in report.layers] == ["2"]
    assert float((pruned[0].weight == 0).double().mean()) == 0.0
    with pytest.raises(wm.InputError, match="only used when importance is a method name"):
        prune(model, score(model, "magnitude"), data=x)
    with pytest.raises(wm.ModelError, match="computed for another model"):
        prune(nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 4)), score(model, "magnitude"))
    with pytest.raises(wm.ModelError, match=r"nn\.Module"):
        prune("not a model", score(model, "magnitude"))
    with pytest.raises(wm.InputError, match="ModelImportance"):
        prune(model, torch.rand(12, 8))


# --------------------------------------------------------------- architectures
def tiny(kind: str, layers: int = 2):
    """A tiny ``kind`` model (Qwen2: 4 query heads sharing 1 KV head; Llama: 2 KV groups) and its inputs."""
    model = tiny_model(kind, layers=layers, kv_heads=1 if kind == "qwen2" else 2)
    return model, tiny_batch(kind)


def _logits(model, data):
    with torch.no_grad():
        return model(data).logits


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "qwen2", "vit"])
def test_every_architecture_scores_prunes_and_runs(kind):
    model, data = tiny(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = _logits(model, data)
    cal = wm.compress.calibrate(model, data, batch_size=3, gradients=True)
    for method in ("magnitude", "wanda", "taylor", "fisher", "gradient_wanda"):
        imp = score(model, method, data=cal)
        assert all(bool(torch.isfinite(v.values).all()) and float(v.values.sum()) > 0 for v in imp.values()), method
        for pattern in ("unstructured", "2:4"):
            pruned, report = prune(model, imp, pattern=pattern)
            assert report.achieved == pytest.approx(0.5, abs=1e-9)
            assert all(v == pytest.approx(0.5) for v in measure(pruned).values())
            out = _logits(pruned, data)
            assert out.shape == reference.shape and bool(torch.isfinite(out).all())
            assert not torch.allclose(out, reference)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, data), reference)


def test_qwen2_gqa_projections_keep_their_shapes():
    model, data = tiny("qwen2")
    imp = score(model, "wanda", data=data)
    assert imp["model.layers.0.self_attn.k_proj"].unit_shape == (8, 32)  # 1 KV head x head_dim 8
    assert imp["model.layers.0.self_attn.q_proj"].unit_shape == (32, 32)


def test_pruned_model_saves_and_loads_with_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, data = tiny("llama")
    pruned, _ = prune(model, score(model, "wanda", data=data), pattern="2:4")
    pruned.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert measure(reloaded) == measure(pruned)
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), reloaded.state_dict().values()))
    torch.testing.assert_close(_logits(reloaded, data), _logits(pruned, data))


def test_gpt2_conv1d_masks_follow_the_stored_layout(tmp_path):
    model, _ = tiny("gpt2")
    pruned, _ = prune(model, score(model, "magnitude"), pattern="2:4")
    w = pruned.transformer.h[0].mlp.c_proj.weight  # stored (in=128, out=32): groups of 4 run down the inputs
    assert bool(((w.t().reshape(32, 32, 4) != 0).sum(-1) == 2).all())
    imp = ModelImportance.load(score(model, "magnitude").save(tmp_path / "m.parquet"))
    assert math.isclose(prune(model, imp, 0.3).report.achieved, 0.3, abs_tol=0.02)
