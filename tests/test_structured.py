"""Structured scores (heads, neurons, layers) and structured removal on tiny BERT, GPT-2, Llama, Qwen2 (GQA), ViT."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_batch, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from whatmatters.compress import score
from whatmatters.compress.remove import load_pruned, n_parameters, plan_removal, prune_structured, structure
from whatmatters.compress.structured import blocks, skipped
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.importance import Importance

transformers = pytest.importorskip("transformers")
KINDS = ["bert", "gpt2", "llama", "qwen2", "vit"]


def tiny(kind: str, layers: int = 2):
    """A tiny ``kind`` model (Qwen2: 4 query heads sharing 1 KV head; Llama: 2 KV groups) and its inputs."""
    model = tiny_model(kind, layers=layers, kv_heads=1 if kind == "qwen2" else 2)
    return model, tiny_batch(kind)


def logits(model, data):
    with torch.no_grad():
        return model(data).logits


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def zero_channels(layer: nn.Module, channels: list[int], value: torch.Tensor | None = None):
    """Forward pre-hook replacing the given input channels by 0 (or by ``value``)."""

    def hook(_m, args):
        x = args[0].clone()
        x[..., channels] = 0 if value is None else value[channels].to(x.dtype)
        return (x, *args[1:])

    return layer.register_forward_pre_hook(hook)


def head_importance(model, zero: dict[int, list[int]]) -> Importance:
    blks = blocks(model)[1]
    values = torch.ones(len(blks), blks[0].n_heads)
    for layer, heads in zero.items():
        values[layer, heads] = 0.0
    return Importance(values=values, unit="head", per_sample=False, method="test")


# ------------------------------------------------------------------ scores
@pytest.mark.parametrize("kind", KINDS)
def test_every_scorer_runs_on_every_architecture_and_leaves_the_model_alone(kind):
    model, data = tiny(kind)
    before, reference = state(model), logits(model, data)
    expected = {"head": (2, 4), "neuron": (2, 128 if kind == "gpt2" else 64), "layer": (2,)}
    for method in ("head_mask_gradient", "flap_head", "neuron_activation", "neuron_taylor", "flap_neuron",
                   "block_influence", "layer_skip_loss"):  # fmt: skip
        imp = score(model, method, data=data, batch_size=3)
        assert tuple(imp.values.shape) == expected[imp.unit], method
        assert bool(torch.isfinite(imp.values).all()), method
        assert imp.extra["layers"] == [b.name for b in blocks(model)[1]]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    assert torch.equal(logits(model, data), reference)


def _lm_loss(model, ids):
    out = model(ids, use_cache=False).logits[:, :-1]
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))


def test_head_mask_gradient_equals_per_sequence_gradients_of_a_head_scale():
    model, data = tiny("llama")
    ids = data[:2]
    imp = score(model, "head_mask_gradient", data=ids, batch_size=2)  # one batch: per-sequence mask gradients
    o = model.model.layers[1].self_attn.o_proj
    ref = torch.zeros(4)
    for i in range(2):  # reference: autograd through a per-channel scale, summed per head, one sequence at a time
        scale = torch.ones(32, requires_grad=True)
        handle = o.register_forward_pre_hook(lambda _m, a, sc=scale: (a[0] * sc,))
        (g,) = torch.autograd.grad(_lm_loss(model, ids[i : i + 1]), scale)
        handle.remove()
        ref += g.reshape(4, 8).sum(1).abs() / 2
    torch.testing.assert_close(imp.values[1], ref, rtol=1e-4, atol=1e-7)
    eps, fd = 0.05, []  # and a coarse central finite difference on the first sequence
    single = score(model, "head_mask_gradient", data=ids[:1], batch_size=1)
    for h in range(4):
        losses = []
        for s in (1 + eps, 1 - eps):
            scale = torch.ones(32)
            scale[h * 8 : (h + 1) * 8] = s
            handle = o.register_forward_pre_hook(lambda _m, a, sc=scale: (a[0] * sc,))
            with torch.no_grad():
                losses.append(float(_lm_loss(model, ids[:1])))
            handle.remove()
        fd.append(abs(losses[0] - losses[1]) / (2 * eps))
    torch.testing.assert_close(single.values[1], torch.tensor(fd), rtol=0.05, atol=2e-5)
    groups = imp.extra["groups"]  # 2 KV groups of 2 query heads
    torch.testing.assert_close(torch.as_tensor(groups), imp.values.reshape(2, 2, 2).sum(-1))


def test_neuron_scores_match_direct_computation():
    model, data = tiny("gpt2")
    ids = data[:2]
    down = model.transformer.h[0].mlp.c_proj
    seen = {}
    handle = down.register_forward_pre_hook(lambda _m, a: seen.__setitem__("a", a[0]))
    acts = []
    for i in range(2):  # per-sequence Taylor: |sum_t a * dL/da|
        out = model(ids[i : i + 1], labels=ids[i : i + 1])
        (g,) = torch.autograd.grad(out.loss, seen["a"])
        acts.append(seen["a"].detach())
        seen["taylor_" + str(i)] = (seen["a"] * g).sum((0, 1)).abs().detach()
    handle.remove()
    taylor = score(model, "neuron_taylor", data=ids, batch_size=2)
    torch.testing.assert_close(taylor.values[0], (seen["taylor_0"] + seen["taylor_1"]) / 2, rtol=1e-4, atol=1e-7)
    a = torch.cat(acts).reshape(-1, 128).double()
    col = down.weight.detach().double().norm(dim=1)  # Conv1D stores (in, out): row j = neuron j's column
    act = score(model, "neuron_activation", data=ids, batch_size=2)
    torch.testing.assert_close(act.values[0].double(), a.abs().mean(0) * col, rtol=1e-5, atol=1e-8)
    flap = score(model, "flap_neuron", data=ids, batch_size=1)
    torch.testing.assert_close(flap.values[0].double(), a.var(0) * col.square(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(
        torch.as_tensor(flap.extra["channel_means"][0]).double(), a.mean(0), rtol=1e-5, atol=1e-7
    )


def test_block_influence_is_one_measurement_for_compress_score_and_allocate_bits_layer_scores():
    from whatmatters.compress.layer_scoring import layer_scores

    model, data = tiny("llama", layers=3)
    per_block = score(model, "block_influence", data=data, batch_size=6)
    per_layer = layer_scores(model, "block_influence", data, layers=r"layers\.\d+\.mlp\.down_proj")
    assert list(per_layer.names) == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    torch.testing.assert_close(per_layer.values, per_block.values)


def test_block_influence_refuses_blocks_that_change_shape():
    from whatmatters.compress.layer_scoring import layer_scores

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 8)), nn.Sequential(nn.Linear(8, 2))])

        def forward(self, x):
            return self.layers[1](self.layers[0](x))

    net = Net()
    with pytest.raises(ModelError, match="residual blocks"):
        layer_scores(net, "block_influence", torch.randn(6, 4), blocks=r"^layers\.\d+$")


def test_layer_scores_match_hidden_states_and_manual_skipping():
    model, data = tiny("llama", layers=3)
    imp = score(model, "block_influence", data=data, batch_size=6)
    with torch.no_grad():
        hs = model(data, output_hidden_states=True).hidden_states
    for i in range(2):  # the last entry is after the final norm
        cos = nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)
        assert float(imp.values[i]) == pytest.approx(float((1 - cos).mean()), rel=1e-4)
    skip = score(model, "layer_skip_loss", data=data, batch_size=6)
    with torch.no_grad():
        dense = float(_lm_loss(model, data))
        for i in range(3):
            cut = copy.deepcopy(model)
            del cut.model.layers[i]
            cut.config.num_hidden_layers = 2
            assert float(skip.values[i]) == pytest.approx(float(_lm_loss(cut, data)) - dense, abs=1e-5)


# ----------------------------------------------------------------- removal
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gqa", ["groups", "heads"])
def test_removing_heads_equals_masking_them(kind, gqa):
    model, data = tiny(kind)
    blks = blocks(model)[1]
    g = blks[0].n_heads // blks[0].n_kv
    zero = {1: [2]} if g == 1 or gqa == "heads" else {1: list(range(g))}  # one head / one KV group
    if kind == "qwen2" and gqa == "groups":
        with pytest.raises(InputError, match="all key/value groups"):
            prune_structured(model, head_importance(model, zero), 0.9)
        return
    amount = len(zero[1]) / (2 * 4) if gqa == "groups" or g == 1 else 1 / 8
    imp = head_importance(model, zero)
    before, reference = state(model), logits(model, data)
    if g > 1 and gqa == "heads":  # the lowest query head of every group, in every block
        pruned, report = prune_structured(model, imp, 1 / g, gqa="heads")
    else:  # only the zero-scored head / group
        pruned, report = prune_structured(model, imp, amount, allocation="global", gqa=gqa)
    removed = report.removed
    hd = blks[0].head_dim
    handles = [
        zero_channels(blocks(model)[1][int(name.rsplit(".", 1)[1])].o, [h * hd + c for h in heads for c in range(hd)])
        for name, heads in removed.items()
    ]
    masked = logits(model, data)
    for h in handles:
        h.remove()
    torch.testing.assert_close(logits(pruned, data), masked, rtol=1e-5, atol=1e-5)
    assert set(zero[1]) <= set(removed[blks[1].name])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, data), reference)
    n_q = report.n_removed
    n_kv = (blks[0].n_kv - blocks(pruned)[1][1].n_kv) + (blks[0].n_kv - blocks(pruned)[1][0].n_kv)
    q_bias = blks[0].qkv[0].bias is not None
    per_q = 2 * hd * 32 + (hd if q_bias else 0)  # q rows (+ bias) and o columns
    per_kv = 2 * hd * 32 + (2 * hd if q_bias else 0)
    if blks[0].kind != "llama":
        per_q, per_kv, n_kv = per_q + per_kv, 0, 0
    assert report.n_parameters_before - report.n_parameters_after == n_q * per_q + n_kv * per_kv
    assert report.n_parameters_after == n_parameters(pruned)


@pytest.mark.parametrize("kind", KINDS)
def test_removing_neurons_equals_masking_them_and_flap_compensation_equals_mean_filling(kind):
    model, data = tiny(kind)
    blks = blocks(model)[1]
    imp = score(model, "flap_neuron", data=data, batch_size=6)
    plain, rep = prune_structured(model, imp, 0.25, compensate=False)
    comp, rep_c = prune_structured(model, imp, 0.25)
    assert rep_c.compensated and not rep.compensated and rep.removed == rep_c.removed
    means = torch.as_tensor(imp.extra["channel_means"])
    for out, fill in ((plain, False), (comp, True)):
        handles = [zero_channels(b.down, rep.removed[b.name], means[i] if fill else None) for i, b in enumerate(blks)]
        masked = logits(model, data)
        for h in handles:
            h.remove()
        torch.testing.assert_close(logits(out, data), masked, rtol=1e-4, atol=1e-5)
    n = blks[0].n_neurons
    assert all(len(v) == n // 4 for v in rep.removed.values())
    hidden = 32
    ups = len(blks[0].ups)
    up_bias = blks[0].ups[0].bias is not None
    per = ups * (hidden + (1 if up_bias else 0)) + hidden
    assert rep.n_parameters_before - rep.n_parameters_after == 2 * (n // 4) * per


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_layer_removal_equals_skipping_and_generate_uses_the_cache(kind):
    model, data = tiny(kind, layers=4)
    imp = Importance(values=torch.tensor([1.0, 0.0, 2.0, 0.5]), unit="layer", per_sample=False, method="test")
    pruned, report = prune_structured(model, imp, 0.5)
    blks = blocks(model)[1]
    assert sorted(report.removed) == [blks[1].name, blks[3].name]
    with skipped(blks[1].module), skipped(blks[3].module):
        masked = logits(model, data)
    torch.testing.assert_close(logits(pruned, data), masked, rtol=1e-5, atol=1e-5)
    assert pruned.config.num_hidden_layers == 2 and model.config.num_hidden_layers == 4
    prompt = data[:2, :4]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = pruned.generate(prompt, use_cache=True, **kw)
    plain = pruned.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, plain) and cached.shape == (2, 10)


def test_uniform_removal_saves_and_loads_with_from_pretrained(tmp_path):
    model, data = tiny("llama", layers=3)
    heads, _ = prune_structured(model, head_importance(model, {}), 0.5, gqa="groups")
    imp = score(heads, "neuron_activation", data=data)
    pruned, report = prune_structured(heads, imp, 0.5)
    layers = Importance(values=torch.tensor([1.0, 0.0, 2.0]), unit="layer", per_sample=False, method="t")
    pruned, report = prune_structured(pruned, layers, 0.34)
    assert report.from_pretrained and pruned.config.num_key_value_heads == 1 and pruned.config.intermediate_size == 32
    pruned.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert n_parameters(reloaded) == n_parameters(pruned)
    torch.testing.assert_close(logits(reloaded, data), logits(pruned, data), rtol=0, atol=0)
    assert structure(tmp_path) == structure(pruned)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "qwen2"])
def test_global_and_compensated_removal_round_trips_with_load_pruned(tmp_path, kind):
    model, data = tiny(kind)
    imp = score(model, "flap_head", data=data)
    gqa = "heads" if kind == "qwen2" else "groups"
    if kind == "qwen2":  # one query head of the single KV group, in every block
        pruned, report = prune_structured(model, imp, 0.3, gqa=gqa)
    else:  # different head counts per block
        zero = head_importance(model, {0: [1, 2, 3], 1: [0]})
        pruned, report = prune_structured(model, zero, 0.5, allocation="global", gqa=gqa)
    neurons = score(pruned, "flap_neuron", data=data)
    pruned, report = prune_structured(pruned, neurons, 0.3, allocation="global")
    assert report.compensated and not report.from_pretrained
    pruned.save_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path)
    assert structure(reloaded) == structure(pruned)
    torch.testing.assert_close(logits(reloaded, data), logits(pruned, data), rtol=0, atol=0)


# ------------------------------------------------------- global allocation
def test_global_allocation_keeps_a_layers_best_group_and_takes_the_next_lowest_elsewhere():
    model, data = tiny("llama")  # 2 blocks x 2 KV groups of 2 query heads
    values = torch.tensor([[0.0, 0.0, 0.0, 0.1], [1.0, 1.0, 2.0, 2.0]])  # block 0's groups are the 2 lowest
    imp = Importance(values=values, unit="head", per_sample=False, method="test")
    pruned, report = prune_structured(model, imp, 0.5, allocation="global")
    names = [b.name for b in blocks(model)[1]]
    assert report.removed == {names[0]: [0, 1], names[1]: [0, 1]} and not report.standardized
    assert [b.n_kv for b in blocks(pruned)[1]] == [1, 1]
    assert logits(pruned, data).isfinite().all()
    neurons = Importance(values=torch.cat([torch.zeros(1, 64), torch.ones(1, 64)]), unit="neuron", per_sample=False)
    pruned, report = prune_structured(model, neurons, 0.75, allocation="global")  # 96 of 128: 63 + 33
    assert report.n_removed == 96 and [b.n_neurons for b in blocks(pruned)[1]] == [1, 31]


def test_flap_scores_are_standardized_per_layer_in_global_allocation():
    model, data = tiny("llama")
    pattern = torch.linspace(0.1, 1.0, 64)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    values = torch.stack([1000 * pattern + 50, pattern])  # same pattern within blocks, very different scales
    flap = Importance(values=values, unit="neuron", per_sample=False, method="flap_neuron")
    _, report = prune_structured(model, flap, 0.25, allocation="global")
    assert report.standardized and [len(v) for v in report.removed.values()] == [16, 16]
    raw = Importance(values=values, unit="neuron", per_sample=False, method="other")
    _, report = prune_structured(model, raw, 0.25, allocation="global")  # raw ranking takes block 1 only
    assert not report.standardized and list(report.removed) == [blocks(model)[1][1].name]
    _, report = prune_structured(model, raw, 0.25, allocation="global", standardize=True)
    assert report.standardized and [len(v) for v in report.removed.values()] == [16, 16]
    _, report = prune_structured(model, flap, 0.25, allocation="global", standardize=False)
    assert not report.standardized and list(report.removed) == [blocks(model)[1][1].name]
    _, report = prune_structured(model, flap, 0.25)  # uniform: no standardization (within-block ranks)
    _, asked = prune_structured(model, flap, 0.25, standardize=True)
    assert not report.standardized and not asked.standardized and asked.removed == report.removed
    heads = score(model, "flap_head", data=data)
    pruned, report = prune_structured(model, heads, 0.5, allocation="global")
    assert report.standardized and report.n_removed == 4 and all(b.n_kv == 1 for b in blocks(pruned)[1])


def test_standardize_rows_matches_the_formula_and_handles_constant_rows():
    from whatmatters.compress.remove import standardize_rows

    x = torch.tensor([[1.0, 2.0, 4.0, 9.0], [3.0, 3.0, 3.0, 3.0]])
    z = standardize_rows(x)
    torch.testing.assert_close(z[0], ((x[0] - x[0].mean()) / x[0].std()).double())
    assert torch.equal(z[1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(standardize_rows(torch.ones(3, 1)), torch.zeros(3, 1, dtype=torch.float64))


@settings(max_examples=150, deadline=None)
@given(
    n_layers=st.integers(1, 5),
    n_kv=st.integers(1, 4),
    g=st.integers(1, 4),
    unit=st.sampled_from(["groups", "heads", "neuron", "layer"]),
    amount=st.floats(0, 0.999),
    standardize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_global_allocation_never_empties_a_block_and_removes_exactly_the_requested_count(
    n_layers, n_kv, g, unit, amount, standardize, seed
):
    gen = torch.Generator().manual_seed(seed)
    width = n_kv * g
    values = torch.randint(0, 4, (n_layers, width), generator=gen).float()  # small integers: many ties
    values = values * torch.rand(n_layers, 1, generator=gen) * 100  # different scales per block
    kw = {"allocation": "global", "standardize": standardize and unit != "layer"}
    if unit == "layer":
        values = values[:, 0]
        units, per_row = values.reshape(1, -1), values.numel()
    elif unit == "neuron":
        units, per_row = values, width
    elif unit == "groups" or g == 1:
        units, per_row = values.reshape(n_layers, n_kv, g).sum(-1), n_kv
    else:  # gqa="heads": the unit is a rank j of every group of a block (n_kv query heads)
        units, per_row = None, g
    k = round(amount * (units.numel() if units is not None else n_layers * g))
    rows = 1 if unit == "layer" else n_layers
    if k > rows * (per_row - 1):
        with pytest.raises(InputError, match="blocks; lower amount" if unit == "layer" else "every block keeps one"):
            plan_removal(values, "layer" if unit == "layer" else "head" if unit != "neuron" else "neuron", amount,
                         n_kv=n_kv, gqa="heads" if unit == "heads" else "groups", **kw)  # fmt: skip
        return
    if unit in ("layer", "neuron"):
        gone = plan_removal(values, unit, amount, **kw).reshape(units.shape)
    else:
        gone = plan_removal(values, "head", amount, n_kv=n_kv, gqa="heads" if unit == "heads" else "groups", **kw)
        gone = gone.reshape(n_layers, n_kv, g)
        if unit == "groups" or g == 1:
            assert bool((gone.all(-1) | ~gone.any(-1)).all())  # whole groups
            gone = gone.all(-1)
        else:
            per_group = gone.sum(-1)
            assert bool((per_group == per_group[:, :1]).all())  # the same count in every group of a block
            order = values.reshape(n_layers, n_kv, g).sort(dim=-1, stable=True).indices
            assert bool(gone.gather(-1, order).int().diff(dim=-1).le(0).all())  # the lowest heads of each group
            gone = torch.arange(g) < per_group[:, :1]  # ranks removed per block
    assert int(gone.sum()) == k
    assert not bool(gone.all(-1).any())
    if units is not None:  # the removed units are the lowest apart from every block's kept best unit
        ranked = units.double() if not kw["standardize"] else standardize_rows_for_test(units)
        best = ranked.masked_fill(gone, float("-inf")).argmax(-1, keepdim=True)  # the best kept unit of a block
        assert torch.equal(ranked.gather(-1, best)[:, 0], ranked.amax(-1))  # is one of its best units
        candidates = torch.ones_like(gone).scatter_(-1, best, False)
        if bool(gone.any()) and bool((candidates & ~gone).any()):
            assert float(ranked[gone].max()) <= float(ranked[candidates & ~gone].min()) + 1e-9


def standardize_rows_for_test(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    std = x.std(-1, keepdim=True) if x.shape[-1] > 1 else torch.zeros(x.shape[0], 1, dtype=torch.float64)
    z = (x - x.mean(-1, keepdim=True)) / std
    return torch.where(std > 1e-9 * x.abs().amax(-1, keepdim=True), z, torch.zeros_like(z))


# --------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors():
    model, _ = tiny("llama")
    imp = head_importance(model, {})
    for bad in (-0.1, 1.0, 1.5, float("nan"), True, "half"):
        with pytest.raises(InputError, match=r"\[0, 1\)"):
            prune_structured(model, imp, bad)
    with pytest.raises(InputError, match="removes all key/value groups"):  # uniform: round(0.8 * 2) = 2 of 2
        prune_structured(model, imp, 0.8)
    with pytest.raises(InputError, match="every block keeps one"):  # global: 3 of 4 groups, at most 2 can go
        prune_structured(model, imp, 0.75, allocation="global")
    with pytest.raises(InputError, match="removes all 2 blocks"):
        prune_structured(model, Importance(values=torch.ones(2), unit="layer", per_sample=False), 0.9)
    with pytest.raises(InputError, match="standardize"):
        prune_structured(model, Importance(values=torch.ones(2), unit="layer", per_sample=False), 0.5, standardize=True)
    with pytest.raises(ModelError, match="another model"):
        prune_structured(model, Importance(values=torch.ones(3, 4), unit="head", per_sample=False), 0.25)
    with pytest.raises(InputError, match="unit 'weight'"):
        prune_structured(model, Importance(values=torch.ones(2, 4), unit="weight", per_sample=False), 0.25)
    with pytest.raises(InputError, match="Importance"):
        prune_structured(model, torch.ones(2, 4), 0.25)
    with pytest.raises(InputError, match="compensate"):
        prune_structured(model, imp, 0.5, compensate=True)
    with pytest.raises(InputError, match="allocation"):
        prune_structured(model, imp, 0.5, allocation="per-layer")
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ModelError, match="not a supported transformer"):
        prune_structured(mlp, imp, 0.5)
    with pytest.raises(ModelError, match="not a supported transformer"):
        score(mlp, "head_mask_gradient", data=torch.randn(4, 4))
    with pytest.raises(InputError, match="calibration data"):
        score(model, "neuron_taylor")
