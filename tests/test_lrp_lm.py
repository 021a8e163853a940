"""AttnLRP / CP-LRP for Llama-family language models (whatmatters.explain._lrp.lm) on tiny random models."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_batch, tiny_model
from hypothesis import example, given, settings
from hypothesis import strategies as st

import whatmatters as wm
from whatmatters.explain._lrp import lm
from whatmatters.explain._lrp.layers import layer_relevance
from whatmatters.explain._lrp.rules import stabilize

pytest.importorskip("transformers")
torch.set_num_threads(1)


def _mistral(layers: int = 2) -> torch.nn.Module:
    """A tiny Mistral with a sliding window shorter than the test sequences."""
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = t.MistralConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, sliding_window=4, max_position_embeddings=32,
    )  # fmt: skip
    return t.MistralForCausalLM(config).eval()


def _double(kind: str, zero_bias: bool = False, **kw) -> torch.nn.Module:
    model = (_mistral(**kw) if kind == "mistral" else tiny_model(kind, **kw)).double()
    if zero_bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
    return model


# ------------------------------------------------------------ reference
def _lin(x: torch.Tensor, w: torch.Tensor, r_out: torch.Tensor, eps: float) -> torch.Tensor:
    """Explicit LRP-epsilon for ``z = x @ w.T`` (no bias)."""
    return x * ((r_out / stabilize(x @ w.T, eps)) @ w)


def _reference(model: torch.nn.Module, ids: torch.Tensor, t: int, variant: str, eps: float) -> tuple:
    """AttnLRP / CP-LRP written out rule by rule (relevance form, no autograd) for a 1-layer Llama, one sequence."""
    cfg, layer = model.config, model.model.layers[0]
    at, mlp = layer.self_attn, layer.mlp
    n_h, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, at.head_dim
    rep, seq = n_h // n_kv, len(ids)
    w = {n: getattr(at, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    w |= {n: getattr(mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj")}

    def rms(x, mod):
        return mod.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)

    e = model.model.embed_tokens.weight[ids]
    h1 = rms(e, layer.input_layernorm)
    q = (h1 @ w["q_proj"].T).view(seq, n_h, hd).transpose(0, 1)
    k = (h1 @ w["k_proj"].T).view(seq, n_kv, hd).transpose(0, 1)
    v = (h1 @ w["v_proj"].T).view(seq, n_kv, hd).transpose(0, 1)
    cos, sin = model.model.rotary_emb(e[None], torch.arange(seq)[None])
    rot = torch.zeros(hd, hd, dtype=e.dtype)
    half = hd // 2
    rot[torch.arange(half), torch.arange(half) + half] = -1.0
    rot[torch.arange(half) + half, torch.arange(half)] = 1.0
    rope = torch.diag_embed(cos[0]) + torch.diag_embed(sin[0]) @ rot  # (seq, hd, hd): q_rot = rope @ q
    qr, kr = torch.einsum("tba,hta->htb", rope, q), torch.einsum("tba,hta->htb", rope, k)
    krep, vrep = kr.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    s = torch.einsum("hid,hjd->hij", qr, krep) * at.scaling
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
    a = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    o = torch.einsum("hij,hjd->hid", a, vrep)
    oflat = o.transpose(0, 1).reshape(seq, -1)
    att = oflat @ w["o_proj"].T
    r1 = e + att
    h2 = rms(r1, layer.post_attention_layernorm)
    gate, up = h2 @ w["gate_proj"].T, h2 @ w["up_proj"].T
    prod = torch.nn.functional.silu(gate) * up
    mout = prod @ w["down_proj"].T
    r2 = r1 + mout
    hf = rms(r2, model.model.norm)
    logits = hf @ model.lm_head.weight.T

    r_logits = torch.zeros_like(logits)
    r_logits[-1, t] = logits[-1, t]
    r_r2 = _lin(hf, model.lm_head.weight, r_logits, eps)  # final RMSNorm: identity
    r_r1, r_m = r1 / r2 * r_r2, mout / r2 * r_r2  # residual sum: LRP-0
    r_prod = _lin(prod, w["down_proj"], r_m, eps)
    r_up, r_gate = (r_prod / 2, r_prod / 2) if variant == "attnlrp" else (r_prod, torch.zeros_like(r_prod))
    r_r1 = r_r1 + _lin(h2, w["gate_proj"], r_gate, eps) + _lin(h2, w["up_proj"], r_up, eps)
    r_e, r_att = e / r1 * r_r1, att / r1 * r_r1
    r_o = _lin(oflat, w["o_proj"], r_att, eps).view(seq, n_h, hd).transpose(0, 1)
    share = a[..., None] * vrep[:, None] * (r_o / o)[:, :, None]  # (h, i, j, d): A_ij v_jd R_id / O_id
    if variant == "attnlrp":
        r_a, r_vrep = share.sum(-1) / 2, share.sum(1) / 2
        r_s = torch.where(allowed, s * (r_a - a * r_a.sum(-1, keepdim=True)), 0.0)  # AttnLRP softmax rule
        qk = at.scaling * qr[:, :, None] * krep[:, None] * (r_s / s)[..., None]
        r_qr, r_kr = qk.sum(2) / 2, qk.sum(1).view(n_kv, rep, seq, hd).sum(1) / 2
        r_q = q * torch.einsum("tba,htb->hta", rope, r_qr / qr)
        r_k = k * torch.einsum("tba,htb->hta", rope, r_kr / kr)
    else:
        r_vrep = share.sum(1)
        r_q, r_k = torch.zeros_like(q), torch.zeros_like(k)
    r_v = r_vrep.view(n_kv, rep, seq, hd).sum(1)
    flat = {"q_proj": r_q, "k_proj": r_k, "v_proj": r_v}
    flat = {n: r.transpose(0, 1).reshape(seq, -1) for n, r in flat.items()}
    r_e = r_e + sum(_lin(h1, w[n], flat[n], eps) for n in flat)
    sums = {n: r.sum() for n, r in flat.items()}
    sums |= {"o_proj": r_att.sum(), "gate_proj": r_gate.sum(), "up_proj": r_up.sum(), "down_proj": r_m.sum()}
    return r_e.sum(-1), sums, logits[-1, t]


@pytest.mark.parametrize(("variant", "eps"), [("attnlrp", 0.0), ("cp", 0.0), ("attnlrp", 0.05)])
def test_matches_the_rule_by_rule_reference_on_a_one_layer_gqa_llama(variant, eps):
    model = _double("llama", layers=1)
    ids = tiny_batch("llama", n=2, length=7)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    full = [f"model.layers.0.{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}" for n in names]
    res = lm.lm_lrp(model, ids, 5, layers=full, variant=variant, epsilon=eps, reduce="sum")
    for i in range(len(ids)):
        tokens, sums, logit = _reference(model, ids[i], 5, variant, eps)
        torch.testing.assert_close(res.logit[i], logit.float())
        torch.testing.assert_close(res.tokens[i], tokens.float(), rtol=1e-5, atol=1e-6)
        for n, f in zip(names, full):
            torch.testing.assert_close(res.layers[f][i], sums[n].float(), rtol=1e-5, atol=1e-6, msg=n)
    if variant == "cp":
        assert res.layers[full[0]].abs().max() == 0 and res.layers[full[4]].abs().max() == 0
    else:
        assert res.layers[full[0]].abs().min() > 0 and res.layers[full[4]].abs().min() > 0


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_cp_lrp_conserves_the_target_logit_at_the_tokens_and_after_every_layer(kind):
    model = _double(kind, zero_bias=True, layers=2)
    ids = tiny_batch("llama", n=3, length=9)
    blocks = ["model.layers.0", "model.layers.1"]
    for variant in ("cp", "attnlrp"):
        res = lm.lm_lrp(model, ids, layers=blocks, variant=variant, reduce="sum")
        assert torch.equal(res.target, model(ids).logits[:, -1].argmax(-1))
        torch.testing.assert_close(res.layers["model.layers.1"], res.logit, rtol=1e-6, atol=1e-7)
        if variant == "cp":
            torch.testing.assert_close(res.tokens.sum(1), res.logit, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(res.layers["model.layers.0"], res.logit, rtol=1e-6, atol=1e-7)
        else:  # the softmax rule absorbs relevance: not conservative
            assert (res.tokens.sum(1) - res.logit).abs().max() > 1e-4


def test_next_token_target_is_the_sum_of_per_position_explanations():
    model = _double("qwen3", layers=2)
    ids = tiny_batch("qwen3", n=2, length=6)
    res = lm.lm_lrp(model, ids, "next", layers=["model.layers.0"], variant="attnlrp", reduce="sum")
    logits = model(ids).logits
    torch.testing.assert_close(res.logit, logits[:, :-1].gather(2, ids[:, 1:, None]).sum((1, 2)).float())
    assert torch.equal(res.target, ids[:, 1:])
    expected = torch.zeros(ids.shape, dtype=torch.float32)
    for t in range(ids.shape[1] - 1):  # causal model: position t's logit only sees tokens up to t
        expected[:, : t + 1] += lm.lm_lrp(model, ids[:, : t + 1], ids[:, t + 1]).tokens
    torch.testing.assert_close(res.tokens, expected, rtol=1e-5, atol=1e-6)
    cp = lm.lm_lrp(model, ids, "next", variant="cp")
    torch.testing.assert_close(cp.tokens.sum(1), cp.logit, rtol=1e-6, atol=1e-6)
    mask = torch.ones_like(ids)
    mask[:, :2] = 0  # left padding: the first "next token" (position 1) is padding and not explained
    padded = lm.lm_lrp(model, ids, "next", attention_mask=mask)
    masked_logits = model(ids, attention_mask=mask).logits[:, 1:-1].gather(2, ids[:, 2:, None]).sum((1, 2))
    torch.testing.assert_close(padded.logit, masked_logits.float())
    imp = lm.layer_relevance(model, ids, "next", ["lm_head"])
    assert imp.target == "next" and imp.values.shape == (2, 1)


def test_qwen2_biases_absorb_relevance():
    model = _double("qwen2")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    res = lm.lm_lrp(model, tiny_batch("qwen2", n=2), variant="cp")
    assert (res.tokens.sum(1) - res.logit).abs().min() > 1e-4


def test_float32_sdpa_and_eager_agree_and_batches_are_independent():
    sdpa, eager = tiny_model("llama", attn="sdpa"), tiny_model("llama", attn="eager")
    ids = tiny_batch("llama", n=4)
    a = lm.lm_lrp(sdpa, ids, 3)
    b = lm.lm_lrp(eager, ids, 3)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-4, atol=1e-5)
    one = torch.cat([lm.lm_lrp(sdpa, ids[i : i + 1], 3).tokens for i in range(4)])
    torch.testing.assert_close(a.tokens, one, rtol=1e-4, atol=1e-5)
    assert a.tokens.dtype == torch.float32 and a.tokens.shape == ids.shape


def _state(model):
    hooks = sum(len(getattr(m, d)) for m in model.modules() for d in ("_forward_hooks", "_forward_pre_hooks"))
    return (
        model.config._attn_implementation,
        hooks,
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _same(a, b):
    assert a[:4] == b[:4]
    assert all(torch.equal(a[4][k], b[4][k]) for k in a[4])


def test_model_is_unchanged_after_success_and_after_errors():
    model = tiny_model("qwen2", attn="sdpa").train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    handle = model.model.norm.register_forward_hook(lambda *a: None)
    before = _state(model)
    ids = tiny_batch("qwen2", n=2)
    lm.layer_relevance(model, ids)
    _same(_state(model), before)
    with pytest.raises(wm.InputError, match="target"):
        lm.lm_lrp(model, ids, target=10_000, layers=["model.layers.0"])
    with pytest.raises(wm.ModelError, match="no layer named"):
        lm.lm_lrp(model, ids, layers=["model.layers.9"])
    _same(_state(model), before)
    assert model.model.layers[0].mlp.up_proj.weight.grad is None
    handle.remove()


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_unsupported_architectures_are_named(kind):
    model = tiny_model(kind)
    with pytest.raises(wm.ModelError, match=r"supports decoder-only llama, mistral, qwen2, qwen3.*gradient_activation"):
        lm.lm_lrp(model, tiny_batch(kind, n=1))
    with pytest.raises(wm.ModelError, match=r"model_type '(gpt2|bert)'"):
        layer_relevance(model, tiny_batch(kind, n=1))


def test_bad_arguments():
    model = tiny_model("llama")
    ids = tiny_batch("llama", n=2)
    with pytest.raises(wm.InputError, match="integer token ids"):
        lm.lm_lrp(model, ids.float())
    with pytest.raises(wm.InputError, match=r"shape \(n, seq_len\)"):
        lm.lm_lrp(model, ids[0])
    with pytest.raises(wm.MethodError, match="variant"):
        lm.lm_lrp(model, ids, variant="softmax")
    with pytest.raises(wm.MethodError, match="epsilon"):
        lm.lm_lrp(model, ids, epsilon=-1.0)
    with pytest.raises(wm.InputError, match="reduce"):
        lm.lm_lrp(model, ids, reduce="max")
    with pytest.raises(wm.InputError, match="one token id or one per sequence"):
        lm.token_relevance(model, ids, target=[1, 2, 3])
    with pytest.raises(wm.InputError, match="'next'"):
        lm.layer_relevance(model, ids, target="last")
    with pytest.raises(wm.InputError, match="at least 2 tokens"):
        lm.lm_lrp(model, ids[:, :1], "next")


def test_layer_relevance_dispatches_and_token_relevance_is_an_importance():
    model = tiny_model("qwen3")
    ids = tiny_batch("qwen3", n=3)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    imp = layer_relevance(model, ids, None, names, batch_size=2)
    direct = lm.layer_relevance(model, ids, None, names)
    assert imp.unit == "layer" and imp.names == tuple(names) and imp.values.shape == (3, 3)
    torch.testing.assert_close(imp.values, direct.values)
    logit = model(ids).logits[:, -1].max(-1).values
    torch.testing.assert_close(imp.values[:, 2], logit.abs(), rtol=1e-5, atol=1e-6)  # |R| at the head = |logit|
    tok = lm.token_relevance(model, ids, target=4)
    assert tok.unit == "token" and tok.values.shape == ids.shape and tok.target == [4, 4, 4]
    default = layer_relevance(model, ids[:1])
    assert set(default.names) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_quantize_layer_scores_lrp_on_a_language_model():
    from whatmatters.compress.quantize import allocate_bits, layer_scores

    model = tiny_model("llama")
    ids = tiny_batch("llama", n=4)
    attn = layer_scores(model, "lrp", ids, batch_size=2)
    const = layer_scores(model, "lrp", ids, attention="constant")
    names = list(attn.names)
    q = names.index("model.layers.0.self_attn.q_proj")
    gate = names.index("model.layers.0.mlp.gate_proj")
    assert attn.values[q] > 0 and attn.values[gate] > 0
    assert const.values[q] == 0 and const.values[gate] == 0
    assert "lm_head" not in names and attn.unit == "layer" and not attn.per_sample
    nxt = layer_scores(model, "lrp", ids, target="next")
    direct = lm.layer_relevance(model, ids, "next", names).aggregate("mean").values
    torch.testing.assert_close(nxt.values, direct)
    assert not torch.allclose(nxt.values, attn.values)
    with pytest.raises(wm.MethodError, match="epsilon= only"):
        layer_scores(model, "lrp", ids, composite="epsilon")
    bits = allocate_bits(attn, 4, sizes=model)
    assert set(bits) == set(names)


def _smollm2():
    from whatmatters.text import pretrained as models

    if not (models.cache_root() / "smollm2-135m" / "config.json").exists():
        pytest.skip("SmolLM2 cache missing (whatmatters.text.pretrained.load_smollm2 converts it once)")
    return models.load_smollm2()


def test_smollm2_attnlrp_points_at_the_subject_tokens():
    """AttnLRP on SmolLM2-135M: 'France' is the most relevant token after the query token 'is' (for ' Paris')."""
    model, tok = _smollm2()
    ranked = {}
    for prompt in ("The capital of France is", "The Eiffel Tower is located in the city of"):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        res = lm.lm_lrp(model, ids, tok(" Paris")["input_ids"][0])
        words = [tok.decode([i]).strip() for i in ids[0]]
        ranked[prompt] = [words[i] for i in res.tokens[0].argsort(descending=True)]
    assert ranked["The capital of France is"][:2] == ["is", "France"], ranked
    assert ranked["The Eiffel Tower is located in the city of"][0] == "iffel", ranked


_LLAMA = _double("llama", layers=1)


@settings(max_examples=15, deadline=None)
@given(
    ids=st.lists(st.integers(0, 59), min_size=1, max_size=8),
    target=st.one_of(st.none(), st.integers(0, 59)),
)
def test_cp_conservation_holds_for_any_sequence_and_target(ids, target):
    res = lm.lm_lrp(_LLAMA, torch.tensor([ids]), target, variant="cp")
    torch.testing.assert_close(res.tokens.sum(1), res.logit, rtol=1e-6, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(
    target=st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=60),
        st.lists(st.integers(0, 59), min_size=3),
        st.floats().filter(lambda f: f != int(f) if f == f and abs(f) != float("inf") else True),
        st.text(min_size=1).filter(lambda s: s != "next"),
    )
)
@example(target=7.6e-242)  # underflows to 0 in float32
def test_bad_targets_are_input_errors(target):
    with pytest.raises(wm.InputError, match="target"):
        lm.lm_lrp(_LLAMA, torch.zeros(2, 4, dtype=torch.long), target)
