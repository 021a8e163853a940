"""Features that hook into transformers check that their hooks ran: a model they cannot follow raises ModelError.

The "variant" used here is a real one: a config whose ``num_hidden_layers`` is lower than the number of
decoder layers built (transformers runs only the first ``num_hidden_layers``), so the hooks on the last
layers never run -- what a release that calls a module by another path would do. Another variant changes
the cache after the attention layer (as a release that updates the cache elsewhere would).
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")
from helpers import tiny_model

import whatmatters as wm
from whatmatters.compress.kvcache import evict_scores, evicting_kv
from whatmatters.compress.tokens import attention_received
from whatmatters.core import hf
from whatmatters.core.errors import ModelError
from whatmatters.explain._lrp.lm import token_relevance

VOCAB = 97


def _truncated(kind: str = "llama") -> torch.nn.Module:
    """Three decoder layers built, two run: hooks on the last layer never fire."""
    model = tiny_model(kind, layers=3, vocab=VOCAB, positions=None, seed=0)
    model.config.num_hidden_layers = 2
    return model


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))


def _says_version(err: pytest.ExceptionInfo) -> None:
    assert hf.version() in str(err.value) and hf.TESTED[0] in str(err.value)


def test_eviction_with_a_layer_it_cannot_hook_raises(ids):
    model = _truncated()
    with pytest.raises(ModelError, match="never saw the model's cache") as err, evicting_kv(model, "snapkv", 0.5):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
    _says_version(err)
    with pytest.raises(ModelError, match="never saw"):
        evict_scores(model, ids, "knorm")


def test_eviction_refuses_a_cache_changed_after_the_hook(ids):
    model = tiny_model("llama", vocab=VOCAB, positions=None, seed=0)

    def grow(_m, _args, kwargs, _out):  # a release that writes to the cache after the attention layer
        layer = hf.find_cache(kwargs).layers[0]
        layer.keys, layer.values = torch.cat([layer.keys] * 2, 2), torch.cat([layer.values] * 2, 2)

    handle = model.model.layers[0].register_forward_hook(grow, with_kwargs=True)
    try:
        with pytest.raises(ModelError, match="holds 24 cached positions"), evicting_kv(model, "knorm", 0.5):
            model(ids, **hf.cache_kwargs(model, hf.new_cache(model)), use_cache=True)
    finally:
        handle.remove()
    # the check itself leaves a normal model alone and the cache at the budget
    cache = hf.new_cache(model)
    with evicting_kv(model, "knorm", 0.5):
        model(ids, **hf.cache_kwargs(model, cache), use_cache=True)
    assert hf.cache_length(cache, 0) == 12


def test_eviction_with_an_unknown_cache_argument_raises(ids, monkeypatch):
    model = tiny_model("llama", vocab=VOCAB, positions=None, seed=0)
    real = hf.find_cache
    monkeypatch.setattr(hf, "find_cache", lambda values: real(values) if "logits" in values else None)
    with pytest.raises(ModelError, match="never saw"), evicting_kv(model, "snapkv", 0.5):
        model(ids, **hf.cache_kwargs(model, hf.new_cache(model)), use_cache=True)


def test_token_scores_with_a_layer_they_cannot_hook_raise(ids):
    model = _truncated("qwen2")
    with pytest.raises(ModelError, match=r"attention layers \[2\] did not run") as err:
        attention_received(model, ids)
    _says_version(err)
    with pytest.raises(ModelError):
        wm.compress.score(model, "accumulated_attention", data=ids)
    # a subset that the model does run still works
    total, _ = attention_received(model, ids, layers=[0, 1])
    assert total.shape == ids.shape


def test_token_scores_refuse_a_cache_they_do_not_receive(ids, monkeypatch):
    model = tiny_model("llama", vocab=VOCAB, positions=None, seed=0)
    monkeypatch.setattr(hf, "find_cache", lambda values: None)
    with pytest.raises(ModelError, match="was not given the cache"):
        attention_received(model, ids)


def test_lm_lrp_with_rules_that_do_not_run_raises(ids):
    model = _truncated("llama")
    with pytest.raises(ModelError, match="rule hooks did not run") as err:
        token_relevance(model, ids)
    _says_version(err)


def test_structured_removal_checks_the_pruned_forward(monkeypatch):
    model = tiny_model("llama", vocab=VOCAB, positions=None, seed=0)
    imp = wm.compress.score(model, "flap_head", data=torch.randint(0, VOCAB, (2, 12)))
    calls = {"n": 0}
    real = hf.output_shape

    def wrong_after_pruning(m, feature):  # a release whose attention reads a head count we do not update
        calls["n"] += 1
        shape = real(m, feature)
        return shape if calls["n"] == 1 else (*shape[:-1], shape[-1] + 1)

    monkeypatch.setattr(hf, "output_shape", wrong_after_pruning)
    with pytest.raises(ModelError, match="pruned model's output has shape"):
        wm.compress.prune_structured(model, imp, 0.25)


def test_cache_kwargs_follow_the_forward_signature():
    model = tiny_model("llama", vocab=VOCAB, positions=None, seed=0)
    (name,) = hf.cache_kwargs(model, None)
    assert name in inspect.signature(model.forward).parameters
    with pytest.raises(ModelError, match="neither cache= nor past_key_values="):
        hf.cache_kwargs(torch.nn.Linear(2, 2), None)


def test_torch_hook_handles_still_count_ids():
    """core.state finds the hooks added inside a preserved block by handle id (a fallback exists; keep it fast)."""
    from torch.utils.hooks import RemovableHandle

    start = RemovableHandle.next_id
    handle = torch.nn.Linear(2, 2).register_forward_hook(lambda *a: None)
    assert handle.id == start and RemovableHandle.next_id == start + 1
