"""Expert importance of MoE models (routing frequency, router mass, output norm) and expert removal."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import whatmatters
from whatmatters.compress import score
from whatmatters.compress.experts import moe_blocks, prune_experts
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.importance import Importance
from whatmatters.core.registry import get_method

transformers = pytest.importorskip("transformers")
KINDS = ["mixtral", "qwen2_moe"]
METHODS = ["expert_frequency", "expert_router_mass", "expert_output_norm"]


def tiny(kind: str, n_experts: int = 4):
    t = transformers
    torch.manual_seed(0)
    common = dict(
        vocab_size=60, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, num_experts_per_tok=2,
    )  # fmt: skip
    if kind == "mixtral":
        model = t.MixtralForCausalLM(t.MixtralConfig(num_local_experts=n_experts, **common))
    else:  # shared expert, top-k weights not renormalized
        config = t.Qwen2MoeConfig(
            num_experts=n_experts, moe_intermediate_size=16, shared_expert_intermediate_size=16, **common
        )
        model = t.Qwen2MoeForCausalLM(config)
    with torch.no_grad():  # decisive routing: random init gives near-uniform routers and near-ties
        for b in moe_blocks(model):
            b.router.weight.mul_(40)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return {k: tiny(k) for k in KINDS}


def padded():
    torch.manual_seed(1)
    ids = torch.randint(0, 60, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def hand_routing(model, data):
    """Per MoE layer: valid-token inputs x, router probabilities, top-k indices and weights, by hand."""
    blks = moe_blocks(model)
    inputs = {}
    handles = [
        b.module.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
        for i, b in enumerate(blks)
    ]
    try:
        with torch.no_grad():
            model(**data)
    finally:
        for h in handles:
            h.remove()
    valid = data["attention_mask"].bool().reshape(-1)
    out = []
    for i, b in enumerate(blks):
        x = inputs[i].reshape(-1, inputs[i].shape[-1])[valid]
        probs = (x @ b.router.weight.detach().T).float().softmax(-1)
        w, idx = probs.topk(b.router.top_k, dim=-1)
        if getattr(b.router, "norm_topk_prob", True):  # Mixtral always renormalizes
            w = w / w.sum(-1, keepdim=True)
        out.append((x, probs, idx, w))
    return out


# ------------------------------------------------------------- scoring
@pytest.mark.parametrize("kind", KINDS)
def test_frequency_matches_router_logits(models, kind):
    model, data = models[kind], padded()
    imp = score(model, "expert_frequency", data=data)
    assert isinstance(imp, Importance) and imp.unit == "expert" and not imp.per_sample
    assert imp.values.shape == (2, 4)
    assert imp.extra["layers"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with torch.no_grad():
        logits = model(**data, output_router_logits=True).router_logits
    valid = data["attention_mask"].bool().reshape(-1)
    assert imp.extra["tokens"] == [int(valid.sum())] * 2 == [15, 15]
    for layer, lg in enumerate(logits):
        chosen = lg[valid].topk(2, dim=-1).indices.reshape(-1)
        expected = torch.bincount(chosen, minlength=4).float() / valid.sum()
        torch.testing.assert_close(imp.values[layer], expected)
        assert imp.extra["counts"][layer].tolist() == torch.bincount(chosen, minlength=4).tolist()
    torch.testing.assert_close(imp.values.sum(1), torch.full((2,), 2.0))


@pytest.mark.parametrize("kind", KINDS)
def test_router_mass_is_mean_softmax(models, kind):
    model, data = models[kind], padded()
    imp = score(model, "expert_router_mass", data=data)
    with torch.no_grad():
        logits = model(**data, output_router_logits=True).router_logits
    valid = data["attention_mask"].bool().reshape(-1)
    expected = torch.stack([lg[valid].float().softmax(-1).mean(0) for lg in logits])
    torch.testing.assert_close(imp.values, expected)
    torch.testing.assert_close(imp.values.sum(1), torch.ones(2))


@pytest.mark.parametrize("kind", KINDS)
def test_output_norm_matches_hand_computation(models, kind):
    model, data = models[kind], padded()
    imp = score(model, "expert_output_norm", data=data)
    expected = torch.zeros(2, 4)
    for layer, (b, (x, _, idx, w)) in enumerate(zip(moe_blocks(model), hand_routing(model, data))):
        ex = b.experts
        for e in range(4):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            gate, up = (x[tok] @ ex.gate_up_proj[e].detach().T).chunk(2, dim=-1)
            y = (ex.act_fn(gate) * up) @ ex.down_proj[e].detach().T * w[tok, slot, None]
            expected[layer, e] = y.norm(dim=-1).mean() if len(tok) else 0.0
    torch.testing.assert_close(imp.values, expected, rtol=1e-4, atol=1e-7)
    freq = score(model, "expert_frequency", data=data).values
    weighted = score(model, "expert_output_norm", data=data, weighted_by_frequency=True)
    torch.testing.assert_close(weighted.values, expected * freq, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_is_left_out(models, kind):
    """A right-padded batch scores like its unpadded sequences, and unlike the batch read without its mask."""
    model, data = models[kind], padded()
    lengths = data["attention_mask"].sum(1).tolist()
    pieces = [data["input_ids"][i, :n] for i, n in enumerate(lengths)]
    for method in ("expert_frequency", "expert_router_mass"):
        batched = score(model, method, data=data).values
        separate = score(model, method, data=pieces).values
        unmasked = score(model, method, data=data["input_ids"]).values
        torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(batched, unmasked, atol=1e-3)


def test_model_unchanged_and_hooks_removed(models):
    model = models["mixtral"]
    before, hooks_before = snapshot(model), n_hooks(model)
    model.train()
    try:
        for method in METHODS:
            score(model, method, data=padded())
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert n_hooks(model) == hooks_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hooks_removed_on_error(models):
    """An error in the middle of the forward pass leaves only the user's own hooks."""
    model = models["mixtral"]

    def boom(*_):
        raise RuntimeError("user hook failed")

    user = model.model.layers[1].register_forward_hook(boom)
    try:
        hooks_before, layer_hooks = n_hooks(model), list(model.model.layers[1]._forward_hooks.values())
        with pytest.raises(RuntimeError, match="user hook failed"):
            score(model, "expert_output_norm", data=padded())
        assert n_hooks(model) == hooks_before
        assert list(model.model.layers[1]._forward_hooks.values()) == layer_hooks and boom in layer_hooks
    finally:
        user.remove()


def test_registered_and_saved(models, tmp_path):
    assert {*METHODS} <= set(whatmatters.methods(unit="expert"))
    assert get_method("expert_load").name == "expert_frequency"
    imp = score(models["qwen2_moe"], "expert_output_norm", data=padded())
    assert Importance.load(imp.save(tmp_path / "e.parquet")).equals(imp)


def other_moe(kind: str):
    t = transformers
    torch.manual_seed(0)
    common = dict(
        vocab_size=60, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, num_experts_per_tok=2,
    )  # fmt: skip
    if kind == "qwen3_moe":
        return t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=16, **common)).eval()
    if kind == "olmoe":
        return t.OlmoeForCausalLM(t.OlmoeConfig(num_experts=4, **common)).eval()
    if kind == "gpt_oss":  # router with bias, experts called with (router_indices, routing_weights)
        return t.GptOssForCausalLM(t.GptOssConfig(num_local_experts=4, head_dim=8, **common)).eval()
    return t.MixtralForCausalLM(t.MixtralConfig(num_local_experts=4, experts_implementation="eager", **common)).eval()


@pytest.mark.parametrize("kind", ["qwen3_moe", "olmoe", "gpt_oss", "mixtral_eager"])
def test_other_architectures(kind):
    """Frequencies match the router logits; per-(token, expert) calls add up to the experts' output; removal runs."""
    model, data = other_moe(kind), padded()
    freq = score(model, "expert_frequency", data=data)
    with torch.no_grad():
        logits = model(**data, output_router_logits=True).router_logits
    valid = data["attention_mask"].bool().reshape(-1)
    chosen = torch.stack([torch.bincount(lg[valid].topk(2).indices.reshape(-1), minlength=4) for lg in logits])
    torch.testing.assert_close(freq.values, chosen.float() / valid.sum())
    blk = moe_blocks(model)[0]
    seen = {}
    handle = blk.experts.register_forward_hook(lambda m, a, o: seen.update(args=a, out=o.detach()))
    try:
        with torch.no_grad():
            model(**data)
    finally:
        handle.remove()
    hidden, index, weights = seen["args"]
    rows = torch.arange(len(hidden)).repeat_interleave(index.shape[1])
    with torch.no_grad():
        pairs = blk.experts.forward(hidden[rows], index.reshape(-1, 1), weights.reshape(-1, 1))
    total = torch.zeros_like(seen["out"]).index_add_(0, rows, pairs.reshape(len(rows), -1))
    torch.testing.assert_close(total, seen["out"], rtol=1e-4, atol=1e-6)
    norms = score(model, "expert_output_norm", data=data).values
    assert norms.shape == (2, 4) and bool(((norms > 0) == (freq.values > 0)).all())
    pruned, _ = prune_experts(model, freq, keep=3)
    assert [b.n_experts for b in moe_blocks(pruned)] == [3, 3] and torch.isfinite(logits_of(pruned, data)).all()


def logits_of(model, data):
    with torch.no_grad():
        return model(**data).logits


# -------------------------------------------------------------- errors
def test_dense_model_is_rejected():
    t = transformers
    dense = t.LlamaForCausalLM(
        t.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4)
    )
    with pytest.raises(ModelError, match="no mixture-of-experts layer"):
        score(dense, "expert_frequency", data=torch.randint(0, 60, (2, 5)))


def test_data_errors(models):
    model = models["mixtral"]
    with pytest.raises(InputError, match="pass token ids"):
        score(model, "expert_router_mass")
    all_pad = {"input_ids": torch.randint(0, 60, (2, 4)), "attention_mask": torch.zeros(2, 4, dtype=torch.long)}
    with pytest.raises(InputError, match="saw no tokens"):
        score(model, "expert_frequency", data=all_pad)


# ------------------------------------------------------------- removal
def test_prune_unrouted_experts_keeps_outputs():
    model = tiny("mixtral", n_experts=8)
    data = {"input_ids": torch.tensor([[3, 17]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    freq = score(model, "expert_frequency", data=data)
    assert ((freq.values > 0).sum(1) <= 4).all()  # 2 tokens x top-2: at most 4 experts used per layer
    before = snapshot(model)
    pruned, report = prune_experts(model, freq, keep=4)
    assert report.n_removed == 4 * len(moe_blocks(pruned)) and report.parameter_ratio < 1
    assert pruned is not model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.num_local_experts == 8 and pruned.config.num_local_experts == 4
    for b in moe_blocks(pruned):
        assert b.router.weight.shape == (4, 32) and b.experts.gate_up_proj.shape[0] == 4 and b.experts.num_experts == 4
    torch.testing.assert_close(logits_of(pruned, data), logits_of(model, data), rtol=1e-5, atol=1e-6)
    # removing routed experts changes the outputs, and the pruned model still runs on other data
    worst, _ = prune_experts(model, Importance(-freq.values, unit="expert", per_sample=False), keep=4)
    assert not torch.allclose(logits_of(worst, data), logits_of(model, data), atol=1e-4)
    other = {"input_ids": torch.randint(0, 60, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    assert torch.isfinite(logits_of(pruned, other)).all()
    assert score(pruned, "expert_frequency", data=other).values.shape == (2, 4)


def test_prune_fraction_and_qwen(models):
    model = models["qwen2_moe"]
    imp = score(model, "expert_router_mass", data=padded())
    pruned, _ = prune_experts(model, imp, keep=0.5)
    assert pruned.config.num_experts == 2 and moe_blocks(model)[0].n_experts == 4
    kept = imp.values.argsort(dim=1, descending=True)[:, :2].sort(dim=1).values
    for b_old, b_new, rows in zip(moe_blocks(model), moe_blocks(pruned), kept):
        torch.testing.assert_close(b_new.router.weight, b_old.router.weight[rows])
        torch.testing.assert_close(b_new.experts.down_proj, b_old.experts.down_proj[rows])
    assert torch.isfinite(logits_of(pruned, padded())).all()


@settings(max_examples=15, deadline=None)
@given(keep=st.one_of(st.integers(-3, 1), st.integers(5, 50), st.floats(-2, 0.25), st.floats(1.01, 5)))
def test_prune_rejects_bad_keep(models, keep):
    model = models["mixtral"]
    imp = Importance(torch.rand(2, 4), unit="expert", per_sample=False)
    with pytest.raises(InputError, match="keep"):
        prune_experts(model, imp, keep=keep)


def test_prune_rejects_mismatched_importance(models):
    model = models["mixtral"]
    with pytest.raises(InputError, match="shape"):
        prune_experts(model, Importance(torch.rand(3, 4), unit="expert", per_sample=False), keep=2)
    with pytest.raises(InputError, match="expert score"):
        prune_experts(model, Importance(torch.rand(2, 4), unit="head", per_sample=False), keep=2)
    other = Importance(torch.rand(2, 4), unit="expert", per_sample=False, extra={"layers": ["a", "b"]})
    with pytest.raises(InputError, match="not this model"):
        prune_experts(copy.deepcopy(model), other, keep=2)


def test_prune_rejects_nan_and_grouped_routing(models):
    values = torch.rand(2, 4)
    values[0, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        prune_experts(models["mixtral"], Importance(values, unit="expert", per_sample=False), keep=2)
    t = transformers
    config = t.DeepseekV3Config(
        vocab_size=60, hidden_size=32, intermediate_size=16, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = t.DeepseekV3ForCausalLM(config).eval()
    freq = score(model, "expert_frequency", data=padded())  # first block dense: one MoE layer
    assert freq.extra["layers"] == ["model.layers.1.mlp"] and freq.values.shape == (1, 4)
    torch.testing.assert_close(freq.values.sum(1), torch.full((1,), 2.0))
    with pytest.raises(ModelError, match="groups of experts"):
        prune_experts(model, freq, keep=2)
