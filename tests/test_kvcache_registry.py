"""KV policies in the scorer registry, and Scissorhands (tiny random Llama / Qwen2 with grouped-query attention)."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")
from helpers import tiny_model

import whatmatters
from whatmatters.compress import score
from whatmatters.compress.kvcache import POLICIES, POLICY_PARAMS, evict_scores, evicting_kv
from whatmatters.core import hf
from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.registry import get_method

torch.set_num_threads(1)
VOCAB, PROMPT = 97, 40


def _llama(attn: str = "sdpa") -> torch.nn.Module:
    return tiny_model("llama", vocab=VOCAB, positions=None, attn=attn, seed=0)


def _qwen2(attn: str = "sdpa") -> torch.nn.Module:
    return tiny_model("qwen2", vocab=VOCAB, positions=None, attn=attn, seed=1)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------------------- registry
def test_every_policy_is_a_registered_kv_method_with_its_parameters():
    assert set(whatmatters.methods(unit="kv")) == set(POLICIES)
    assert "scissorhands" in POLICIES
    for name in POLICIES:
        m = get_method(name)
        assert m.verb == "compress" and m.units == ("kv",) and m.per_sample
        # one source of truth: the policy table is the registered signature less compression_ratio
        assert POLICY_PARAMS[name] == {k: v for k, v in m.defaults.items() if k != "compression_ratio"}
        assert list(inspect.signature(m.fn).parameters)[-1] == "compression_ratio"
    text = whatmatters.describe("snapkv")
    assert "window_size=32, kernel_size=5, pooling='avg'" in text
    assert "history_window=32, recent_window=16" in whatmatters.describe("scissorhands")


@pytest.mark.parametrize("policy", POLICIES)
def test_score_returns_the_prefill_scores(ids, policy):
    model = _llama()
    params = {"window_size": 8} if policy in ("snapkv", "ems") else {}
    imp = score(model, policy, data=ids, compression_ratio=0.25, **params)
    ref = evict_scores(model, ids, policy, compression_ratio=0.25, **params)
    assert imp.unit == "kv" and imp.method == policy and imp.values.shape == (2, 2, 2, PROMPT)
    assert torch.equal(imp.values, ref.values)
    assert imp.extra["budget"] == ref.extra["budget"] == 30
    assert imp.params["compression_ratio"] == 0.25


def test_aliases_and_unknown_names(ids):
    model = _llama()
    with evicting_kv(model, "h2o", 0.5) as h:
        model(ids, **hf.cache_kwargs(model, hf.new_cache(model)), use_cache=True)
    assert h.policy == "heavy_hitter" and set(h.budgets.values()) == {PROMPT // 2}
    assert torch.equal(evict_scores(model, ids, "streaming_llm").values, evict_scores(model, ids, "sink_recent").values)
    with pytest.raises(MethodError, match=r"unknown KV eviction policy 'scisorhands'.*'scissorhands'.*unit='kv'"):
        evict_scores(model, ids, "scisorhands")
    with pytest.raises(MethodError, match=r"unknown KV eviction policy 'wanda'.*snapkv"):
        evicting_kv(model, "wanda").__enter__()
    with pytest.raises(MethodError, match=r"unknown parameter.*history_window"):
        score(model, "scissorhands", data=ids, window_size=3)
    with pytest.raises(MethodError, match="has no parameter"):
        evict_scores(model, ids, "scissorhands", window_size=3)


def test_score_bad_data(ids):
    model = _llama()
    with pytest.raises(InputError, match="pass token ids"):
        score(model, "snapkv")
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with pytest.raises(InputError, match="padded"):
        score(model, "knorm", data={"input_ids": ids, "attention_mask": mask})
    with pytest.raises(InputError, match="history_window"):
        score(model, "scissorhands", data=ids, history_window=0)
    with pytest.raises(InputError, match="chunk_ratio"):
        score(model, "scissorhands", data=ids, chunk_ratio=1.5)


# ------------------------------------------------------------------------------------- scissorhands
@pytest.mark.parametrize("make", [_llama, _qwen2])
def test_scissorhands_counts_equal_explicit_eager_computation(ids, make):
    """Ground truth: per KV head, the number of (query head, query) pairs of the last w queries whose attention
    to the position exceeds 1 / (positions the query sees), from transformers' eager attention weights."""
    w = 8
    imp = evict_scores(make("sdpa"), ids, "scissorhands", history_window=w, recent_window=0)
    with torch.no_grad():
        att = make("eager")(ids, output_attentions=True).attentions
    seen = torch.arange(PROMPT - w + 1, PROMPT + 1).float()
    for i, a in enumerate(att):  # (b, heads, q, k)
        important = a[:, :, -w:] > (1 / seen)[:, None]
        want = important.sum(dim=2).reshape(2, 2, 2, PROMPT).sum(2)  # queries, then query heads per KV group
        assert torch.equal(imp.values[:, i].floor(), want.float())
    # ties are broken towards later positions, by less than one count
    assert bool((imp.values.frac() < 0.5).all())


def test_scissorhands_keeps_recent_window_and_evicts_in_chunks(ids):
    model = _qwen2()
    budget = PROMPT // 2
    with evicting_kv(model, "scissorhands", 0.5, recent_window=4, chunk_ratio=0.25, history_window=6) as h:
        cache = hf.new_cache(model)
        model(ids, **hf.cache_kwargs(model, cache), use_cache=True)
        lengths = [cache.layers[0].keys.shape[2]]
        for t in range(8):
            model(ids[:, t : t + 1], **hf.cache_kwargs(model, cache), use_cache=True)
            lengths.append(cache.layers[0].keys.shape[2])
            state = h._layers[0]
            assert state.hist.shape[2] <= 6 and state.hist.shape[-1] == lengths[-1]
    # prefill cut to the budget; the first step exceeds it and 25 % of the budget is dropped at once
    assert lengths == [budget, 15, 16, 17, 18, 19, 20, 15, 16]
    kept = h.kept_positions()[1]
    assert bool((kept[..., -4:] == torch.arange(PROMPT + 8 - 4, PROMPT + 8)).all()), "recent window kept"
    assert bool((kept.diff(dim=-1) > 0).all())


def test_scissorhands_evicted_logits_equal_manual_cache(ids):
    """Ground truth: the hooked forward equals a forward on a cache gathered by hand at the kept positions."""
    model = _llama()
    with evicting_kv(model, "scissorhands", 0.5, decoding=False, history_window=8) as h:
        cache = hf.new_cache(model)
        model(ids, **hf.cache_kwargs(model, cache), use_cache=True)
        nxt = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(4))
        got = model(nxt, **hf.cache_kwargs(model, cache), use_cache=True).logits
    full = hf.new_cache(model)
    model(ids, **hf.cache_kwargs(model, full), use_cache=True)
    for i, layer in enumerate(full.layers):
        idx = h.kept_positions()[i][..., : PROMPT // 2, None].expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
    pos = torch.arange(PROMPT, PROMPT + 3)[None].expand(2, -1)
    want = model(nxt, **hf.cache_kwargs(model, full), position_ids=pos, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the kept positions are the top-scored ones of evict_scores
    scores = evict_scores(model, ids, "scissorhands", history_window=8).values
    top = scores[:, 0].topk(PROMPT // 2, dim=-1).indices.sort(-1).values
    assert torch.equal(top, h.kept_positions()[0][..., : PROMPT // 2])
