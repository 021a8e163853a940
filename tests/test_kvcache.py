"""KV-cache eviction: tiny random Llama (GQA), Qwen2 (GQA) and GPT-2 (MHA) configs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from helpers import tiny_model

from whatmatters.compress.kvcache import POLICIES, evict_scores, evicting_kv
from whatmatters.core import hf
from whatmatters.core.errors import InputError, MethodError, ModelError

VOCAB, PROMPT = 97, 40
SMALL = {"snapkv": {"window_size": 8}, "ems": {"window_size": 8}}


def _llama(attn: str = "sdpa") -> torch.nn.Module:
    return tiny_model("llama", vocab=VOCAB, positions=None, attn=attn, seed=0)


def _qwen2() -> torch.nn.Module:
    return tiny_model("qwen2", vocab=VOCAB, positions=None, seed=1)


def _qwen3(attn: str = "sdpa") -> torch.nn.Module:
    return tiny_model("qwen3", vocab=VOCAB, positions=None, attn=attn, seed=4)


def _gpt2(attn: str = "sdpa") -> torch.nn.Module:
    return tiny_model("gpt2", vocab=VOCAB, positions=128, attn=attn, seed=2)


MODELS = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {name: make() for name, make in MODELS.items()}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(3))


def _generate(model, ids, n=4):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("policy", POLICIES)
def test_generate_runs_and_prefill_cache_equals_budget(models, ids, name, policy):
    model = models[name]
    before, hooks_before = _state(model), _n_hooks(model)
    with evicting_kv(model, policy, 0.5, **SMALL.get(policy, {})) as h:
        out = _generate(model, ids)
        cache = hf.new_cache(model)
        model(ids, **hf.cache_kwargs(model, cache), use_cache=True)
        lengths = {layer.keys.shape[2] for layer in cache.layers}
    assert out.shape == (2, PROMPT + 4)
    assert lengths == {PROMPT // 2}
    assert set(h.budgets.values()) == {PROMPT // 2}
    kept = h.kept_positions()[0]
    assert kept.shape[-1] == PROMPT // 2
    assert bool((kept.diff(dim=-1) > 0).all()), "kept positions stay in order and distinct"
    assert _n_hooks(model) == hooks_before
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", list(MODELS))
def test_ratio_zero_reproduces_generate_exactly(models, ids, name):
    model = models[name]
    ref = _generate(model, ids, n=6)
    for policy in POLICIES:
        with evicting_kv(model, policy, 0.0):
            assert torch.equal(_generate(model, ids, n=6), ref)


def test_old_name_kv_eviction_warns_and_evicts_the_same(models, ids):
    from whatmatters.compress import kv_eviction

    model = models["llama"]
    with evicting_kv(model, "knorm", 0.5):
        new = _generate(model, ids, n=4)
    with pytest.warns(DeprecationWarning, match="renamed evicting_kv"), kv_eviction(model, "knorm", 0.5):
        old = _generate(model, ids, n=4)
    assert torch.equal(old, new)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("policy", ["snapkv", "knorm", "heavy_hitter", "scissorhands"])
def test_evicted_next_token_logits_match_manual_cache(models, ids, name, policy):
    """Ground truth: the hooked forward equals a forward on a cache gathered by hand at the kept positions."""
    model = models[name]
    params = {"decoding": False} if policy in ("heavy_hitter", "scissorhands") else SMALL.get(policy, {})
    with evicting_kv(model, policy, 0.5, **params) as h:
        cache = hf.new_cache(model)
        model(ids, **hf.cache_kwargs(model, cache), use_cache=True)
        nxt = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(4))
        got = model(nxt, **hf.cache_kwargs(model, cache), use_cache=True).logits  # positions filled in by the hook
    kept = {i: p[..., : PROMPT // 2] for i, p in h.kept_positions().items()}
    full = hf.new_cache(model)
    model(ids, **hf.cache_kwargs(model, full), use_cache=True)
    for i, layer in enumerate(full.layers):
        idx = kept[i][..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
    pos = torch.arange(PROMPT, PROMPT + 3)[None].expand(2, -1)
    want = model(nxt, **hf.cache_kwargs(model, full), position_ids=pos, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the eviction really changed the result
    assert not torch.allclose(want, model(torch.cat([ids, nxt], 1)).logits[:, -3:], atol=1e-4)


@pytest.mark.parametrize("make", [_llama, _qwen3, _gpt2])
def test_recomputed_attention_equals_eager_attentions(ids, make):
    """heavy_hitter's scores (recent_ratio=0) are the attention each position receives, summed over queries and
    the query heads of its KV group: compare with the eager attention weights transformers returns."""
    model = make("eager")
    imp = evict_scores(model, ids, "heavy_hitter", recent_ratio=0.0)
    att = model(ids, output_attentions=True).attentions
    n_kv = imp.values.shape[2]
    for i, a in enumerate(att):
        want = a.sum(dim=2).reshape(2, n_kv, -1, PROMPT).sum(2)
        torch.testing.assert_close(imp.values[:, i], want, rtol=1e-4, atol=1e-5)


def test_gqa_scores_aggregate_query_heads_per_kv_group(models, ids):
    imp = evict_scores(models["llama"], ids, "snapkv", window_size=8)
    assert imp.unit == "kv" and imp.values.shape == (2, 2, 2, PROMPT)  # KV heads, not query heads
    # the observation window ranks above everything else of its head
    w = imp.values[..., -8:].amin(-1)
    rest = imp.values[..., :-8].amax(-1)
    assert bool((w > rest).all())
    assert imp.top(3)[0][0][1] > 0


def test_sink_recent_keeps_sinks_and_recent_window(models, ids):
    with evicting_kv(models["llama"], "sink_recent", 0.75, n_sink=3) as h:
        _generate(models["llama"], ids, n=5)
    budget = PROMPT // 4
    kept = h.kept_positions()[1][0, 0]
    # rolling window: sinks + the most recent (budget - 3) of the 44 positions the cache has seen
    want = torch.cat([torch.arange(3), torch.arange(PROMPT + 4 - (budget - 3), PROMPT + 4)])
    assert torch.equal(kept, want)


def test_heavy_hitter_keeps_budget_while_decoding(models, ids):
    with evicting_kv(models["qwen2"], "heavy_hitter", 0.5, recent_ratio=0.25) as h:
        cache = hf.new_cache(models["qwen2"])
        models["qwen2"](ids, **hf.cache_kwargs(models["qwen2"], cache), use_cache=True)
        for t in range(3):
            models["qwen2"](ids[:, t : t + 1], **hf.cache_kwargs(models["qwen2"], cache), use_cache=True)
            assert cache.layers[0].keys.shape[2] == PROMPT // 2
    kept = h.kept_positions()[0]
    recent = int(PROMPT // 2 * 0.25)
    assert bool((kept[..., -recent:] == torch.arange(PROMPT + 3 - recent, PROMPT + 3)).all())


@pytest.mark.parametrize("policy", ["knorm", "snapkv"])
def test_tokens_after_a_prefill_eviction_follow_the_kept_positions_in_order(models, ids, policy):
    """Prefill-only policies keep per-token bookkeeping as a count; the positions they report are still exact."""
    model = models["llama"]
    with evicting_kv(model, policy, 0.5, **SMALL.get(policy, {})) as h:
        cache = hf.new_cache(model)
        model(ids, **hf.cache_kwargs(model, cache), use_cache=True)
        prefill = {i: p.clone() for i, p in h.kept_positions().items()}
        for t in range(3):
            model(ids[:, t : t + 1], **hf.cache_kwargs(model, cache), use_cache=True)
        model(ids[:, :2], **hf.cache_kwargs(model, cache), use_cache=True)  # a chunk of two
    for i, kept in h.kept_positions().items():
        new = torch.arange(PROMPT, PROMPT + 5).expand(*kept.shape[:2], -1)
        assert torch.equal(kept, torch.cat([prefill[i], new], -1))
        assert cache.layers[i].keys.shape[2] == kept.shape[-1] == PROMPT // 2 + 5


def test_ems_merges_values_into_kept_entries(models, ids):
    model = models["llama"]
    caches = {}
    for merge in (True, False):
        with evicting_kv(model, "ems", 0.5, window_size=8, merge=merge) as h:
            caches[merge] = hf.new_cache(model)
            model(ids, **hf.cache_kwargs(model, caches[merge]), use_cache=True)
    assert torch.equal(caches[True].layers[0].keys, caches[False].layers[0].keys)
    assert not torch.equal(caches[True].layers[0].values, caches[False].layers[0].values)
    assert h.kept_positions()[0].shape[-1] == PROMPT // 2


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_ratio(models, ratio):
    with pytest.raises(InputError, match="compression_ratio"), evicting_kv(models["llama"], "snapkv", ratio):
        pass


def test_bad_policy_and_params(models):
    bad = [
        (MethodError, r"unknown KV eviction policy 'snapk'.*snapkv", "snapk", {}),
        (MethodError, "has no parameter", "knorm", {"window_size": 3}),
        (InputError, "kernel_size must be odd", "snapkv", {"kernel_size": 4}),
        (InputError, "recent_ratio must be", "heavy_hitter", {"recent_ratio": 2}),
    ]
    for error, match, policy, params in bad:
        with pytest.raises(error, match=match), evicting_kv(models["llama"], policy, 0.5, **params):
            pass


def test_unsupported_model():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ModelError, match="does not support BertForMaskedLM"), evicting_kv(bert, "snapkv", 0.5):
        pass
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ModelError, match="transformers model"), evicting_kv(model, "snapkv", 0.5):
        pass


def test_padded_batch_refused_and_hooks_removed_on_error(models, ids):
    model = models["llama"]
    hooks = _n_hooks(model)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(InputError, match="padded"), evicting_kv(model, "snapkv", 0.5, window_size=8):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert _n_hooks(model) == hooks


def test_padded_mask_refused_on_a_cache_filled_before_the_block(models, ids):
    """One new token on a cache the hooks have not seen is that cache's first call: its mask is checked too
    (only later decoding steps on an evicted cache skip the check, their earlier columns were checked)."""
    from whatmatters.core import hf

    model = models["llama"]
    with torch.no_grad():
        cache = model(ids[:1], use_cache=True).past_key_values
        mask = torch.ones(1, PROMPT + 1, dtype=torch.long)
        mask[0, :2] = 0
        with pytest.raises(InputError, match="padded"), evicting_kv(model, "knorm", 0.5):
            model(ids[:1, :1], attention_mask=mask, use_cache=True, **hf.cache_kwargs(model, cache))


def test_evict_scores_bad_input(models):
    with pytest.raises(InputError, match="2-D integer"):
        evict_scores(models["llama"], torch.zeros(5), "knorm")


def test_ratio_outside_unit_interval_property(models):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=10, deadline=None, database=None)
    @hypothesis.given(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), st.just(float("nan"))))
    def check(ratio):
        with pytest.raises(InputError, match="compression_ratio"), evicting_kv(models["llama"], "knorm", ratio):
            pass

    check()
