"""Prefill token pruning for causal LMs (FastV, cascade, random): exact at keep=1, positions kept, fewer tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from whatmatters.compress import pruning_tokens, score
from whatmatters.compress.tokens_prefill import select
from whatmatters.core import hf
from whatmatters.core.errors import InputError, MethodError, ModelError

torch.set_num_threads(1)
ARCHS = ("llama", "qwen2", "qwen3")


def _lm(kind: str = "llama", layers: int = 4) -> torch.nn.Module:
    return tiny_model(kind, layers=layers, kv_heads=2, positions=64)  # 4 query heads, 2 KV heads (GQA)


def _padded(n: int = 3, length: int = 16, pads: tuple[int, ...] = (0, 4, 9)) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, 60, (n, length))
    mask = (torch.arange(length)[None] >= torch.tensor(pads)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("kind", ARCHS)
def test_keep_one_is_exact_with_and_without_padding_and_in_generate(kind):
    model = _lm(kind)
    ids, mask = _padded()
    with torch.no_grad():
        plain = model(ids[:1]).logits
        padded = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        with pruning_tokens(model, keep=1.0, at_layers=2) as report:
            assert torch.equal(model(ids[:1]).logits, plain)
            assert torch.equal(model(ids, attention_mask=mask).logits, padded)
            assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), gen)
    assert report.prefills == 3 and report.last_forward == [(i, 16) for i in range(4)]


def test_pruned_layers_really_get_fewer_tokens_and_cache_fewer_keys():
    model = _lm()
    seen: list[int] = []
    handle = model.model.layers[3].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    ids = torch.randint(0, 60, (2, 20))
    with torch.no_grad(), pruning_tokens(model, keep=0.5, at_layers=2) as report:
        out = model(ids, use_cache=True)
    handle.remove()
    assert seen == [10] and out.logits.shape == (2, 10, 60)
    assert [out.past_key_values.layers[i].keys.shape[2] for i in range(4)] == [20, 20, 10, 10]
    assert report.last_forward == [(0, 20), (1, 20), (2, 10), (3, 10)] and report.kept_share == 0.5
    assert report.layer_tokens == 0.75
    assert (report.kept_positions[:, [0, -1]] == torch.tensor([0, 19])).all()  # sink and last token kept
    assert not model.model.layers[2]._forward_pre_hooks  # hooks gone after the block


def _reference(model, ids: torch.Tensor, k: int, kept: torch.Tensor, renumber: bool = False) -> torch.Tensor:
    """The model's layers run by hand: all tokens up to layer k, then only ``kept`` at their original positions
    (or, with ``renumber``, at positions 0, 1, ...)."""
    base = model.model
    h = base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None].expand(len(ids), -1)
    emb = base.rotary_emb(h, position_ids=pos)
    for i, layer in enumerate(base.layers):
        if i == k:
            h = torch.stack([h[r, kept[r]] for r in range(len(ids))])
            emb = tuple(torch.stack([t[r, kept[r]] for r in range(len(ids))]) for t in emb)
            pos = torch.stack([pos[r, kept[r]] for r in range(len(ids))])
            if renumber:
                pos = torch.arange(kept.shape[1])[None].expand(len(ids), -1)
                emb = base.rotary_emb(h, position_ids=pos)
        h = layer(h, attention_mask=None, position_embeddings=emb, position_ids=pos)
    return model.lm_head(base.norm(h))


@pytest.mark.parametrize("kind", ARCHS)
def test_pruned_forward_equals_the_layers_run_on_the_kept_tokens_at_their_positions(kind):
    """RoPE positions are kept, not renumbered: renumbering the kept tokens gives different logits."""
    model = _lm(kind)
    ids = torch.randint(0, 60, (2, 18))
    with torch.no_grad():
        with pruning_tokens(model, keep=0.4, at_layers=2) as report:
            out = model(ids).logits
        kept = report.kept_positions
        ref = _reference(model, ids, 2, kept)
        renumbered = _reference(model, ids, 2, kept, renumber=True)
    assert kept.shape[1] == 7
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, renumbered, atol=1e-3)


def test_fastv_keeps_the_tokens_with_most_attention_in_eager_attention_weights():
    """Ground truth from transformers' own attention weights (eager, output_attentions) of layer K - 1."""
    model = tiny_model("llama", layers=4, kv_heads=2, positions=64, attn="eager")
    ids = torch.randint(0, 60, (3, 24))
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions[2]  # layer K - 1 = 2, (b, heads, q, k)
        with pruning_tokens(model, keep=0.25, at_layers=3) as report:
            model(ids)
    seen_by = torch.arange(24, 0, -1)
    mean = att.mean(1).sum(1) / seen_by  # mean over heads and over the queries that see each token
    expected = select(mean, torch.ones_like(mean, dtype=torch.bool), torch.full((3,), 6))
    assert torch.equal(report.kept_positions, expected)


def test_fastv_ranks_by_the_registered_accumulated_attention_score_of_layer_k_minus_1():
    model = _lm()
    ids = torch.randint(0, 60, (2, 20))
    imp = score(model, "accumulated_attention", data=ids, attn_layers=[1], normalize=True)
    with torch.no_grad(), pruning_tokens(model, keep=0.3, at_layers=2) as report:
        model(ids)
    expected = select(imp.values, torch.ones(2, 20, dtype=torch.bool), torch.full((2,), 6))
    assert torch.equal(report.kept_positions, expected)


def test_left_padded_rows_prune_like_the_same_prompt_alone():
    model = _lm()
    ids, mask = _padded()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate passes
    with torch.no_grad(), pruning_tokens(model, keep=0.5, at_layers=2) as report:
        batch = model(ids, attention_mask=mask, position_ids=pos).logits
        kept = report.kept_positions
        for row, pad in enumerate((0, 4, 9)):
            alone = model(ids[row : row + 1, pad:]).logits[0]
            real = kept[row] >= pad
            assert torch.equal(kept[row][real] - pad, report.kept_positions[0])
            torch.testing.assert_close(batch[row][real], alone, atol=1e-5, rtol=1e-5)
    assert kept.shape[1] == 8 and (mask.gather(1, kept).sum(1) == torch.tensor([8, 6, 4])).all()


def test_generate_after_pruned_prefill_matches_feeding_the_cache_by_hand():
    """Decoding on a pruned cache: masks of the pruned layers line up with their shorter caches (padding too)."""
    model = _lm()
    ids, mask = _padded()
    with torch.no_grad(), pruning_tokens(model, keep=0.5, at_layers=2):
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
        m2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        cache = hf.cache_kwargs(model, out.past_key_values)
        step = model(nxt[:, None], attention_mask=m2, position_ids=pos[:, -1:] + 1, **cache)
    assert torch.equal(gen[:, 16], nxt) and torch.equal(gen[:, 17], step.logits[:, -1].argmax(-1))


def test_continuation_on_the_pruned_cache_equals_the_layers_run_on_kept_prompt_plus_new_tokens():
    model = _lm()
    ids = torch.randint(0, 60, (2, 24))
    with torch.no_grad():
        with pruning_tokens(model, keep=0.5, at_layers=2) as report:
            cache = hf.cache_kwargs(model, hf.new_cache(model))
            model(ids[:, :16], use_cache=True, **cache)
            cont = model(ids[:, 16:], use_cache=True, **cache).logits  # 8 new tokens in one call
        kept = torch.cat([report.kept_positions, torch.arange(16, 24).expand(2, -1)], 1)
        ref = _reference(model, ids, 2, kept)[:, -8:]
    torch.testing.assert_close(cont, ref, atol=1e-5, rtol=1e-5)


def test_cascade_prunes_progressively_and_random_is_seeded():
    model = _lm(layers=6)
    ids = torch.randint(0, 60, (2, 27))
    with torch.no_grad():
        with pruning_tokens(model, keep=1 / 3, method="cascade", at_layers=[1, 3, 5]) as cascade:
            model(ids)
        runs = []
        for seed in (0, 0, 1):
            with pruning_tokens(model, keep=1 / 3, method="random", at_layers=[1, 3, 5], seed=seed) as rnd:
                model(ids)
            runs.append(rnd.kept_positions)
    counts = [t for _, t in cascade.last_forward]
    assert counts == [27, 19, 19, 13, 13, 9] and [t for _, t in rnd.last_forward] == counts
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_cascade_scores_accumulate_over_the_steps():
    """keep=0.951 of 20 tokens at layers [1, 2]: step 1 drops nothing, step 2 drops one token -- cascade the one
    with the least layer-0 + layer-1 attention, fastv the one with the least layer-1 attention (eager weights)."""
    model = tiny_model("llama", layers=3, kv_heads=2, positions=64, attn="eager")
    ids = torch.randint(0, 60, (8, 20))
    with torch.no_grad():
        for layer in model.model.layers:  # sharper, content-dependent attention than the random init's
            layer.self_attn.q_proj.weight.mul_(8)
        att = model(ids, output_attentions=True).attentions
        dropped = {}
        for method in ("cascade", "fastv"):
            with pruning_tokens(model, keep=0.951, method=method, at_layers=[1, 2]) as report:
                model(ids)
            assert [t for _, t in report.last_forward] == [20, 20, 19]
            gone = torch.ones(8, 20, dtype=torch.bool).scatter(1, report.kept_positions, False)
            dropped[method] = gone.float().argmax(1)
    mean = [a.mean(1).sum(1) / torch.arange(20, 0, -1) for a in att[:2]]  # per layer, (b, 20)
    inner = slice(1, 19)  # the first and last tokens are always kept
    assert torch.equal(dropped["cascade"], (mean[0] + mean[1])[:, inner].argmin(1) + 1)
    assert torch.equal(dropped["fastv"], mean[1][:, inner].argmin(1) + 1)
    assert not torch.equal(dropped["cascade"], dropped["fastv"])


# ------------------------------------------------------------------------------------------- bad input
@settings(max_examples=30, deadline=None)
@given(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001), st.just(float("nan")), st.booleans()))
def test_keep_outside_the_unit_interval_is_refused(keep):
    with pytest.raises(InputError, match="keep"), pruning_tokens(_LM, keep=keep):
        pass


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.integers(max_value=0), st.integers(min_value=4), st.lists(st.integers(1, 3), min_size=2)))
def test_layers_outside_the_model_or_unordered_are_refused(layers):
    if isinstance(layers, list) and layers == sorted(set(layers)):
        layers = [*layers[::-1], layers[0]]
    with pytest.raises(InputError, match="at_layers"), pruning_tokens(_LM, keep=0.5, at_layers=layers):
        pass


_LM = _lm()


def test_bad_models_methods_and_masks_get_clear_errors():
    with pytest.raises(ModelError, match="pruning_tokens"), pruning_tokens(torch.nn.Linear(2, 2)):
        pass
    with pytest.raises(ModelError, match="rotary"), pruning_tokens(tiny_model("gpt2")):
        pass
    with pytest.raises(MethodError, match="fastv"), pruning_tokens(_LM, method="h2o"):
        pass
    with pytest.raises(InputError, match="several layers"), pruning_tokens(_LM, method="cascade", at_layers=2):
        pass
    ids, mask = _padded()
    mask[1] = 0
    with pytest.raises(InputError, match="no real token"), pruning_tokens(_LM, keep=0.5):
        _LM(ids, attention_mask=mask)
    with pytest.raises(InputError, match="2-D attention_mask"), pruning_tokens(_LM, keep=0.5):
        _LM(ids, attention_mask=mask[:, None, None].bool())
    with torch.no_grad():
        cache = _LM(ids[:, :5], use_cache=True).past_key_values
        with pytest.raises(InputError, match="not filled inside the block"), pruning_tokens(_LM, keep=0.5):
            _LM(ids[:, 5:], **hf.cache_kwargs(_LM, cache))


def test_hooks_that_do_not_run_raise_instead_of_a_silent_no_op():
    model = copy.deepcopy(_LM)
    model.config.num_hidden_layers = 3  # the model's loop now skips the last layer and its hook
    with pytest.raises(ModelError, match="hooks saw 3 of 4"), pruning_tokens(model, keep=0.5, at_layers=2):
        model(torch.randint(0, 60, (1, 12)))
    model = copy.deepcopy(_LM)
    model.model.layers[1].forward = lambda hidden, *a, **k: hidden  # layer 1 no longer calls its attention
    with pytest.raises(ModelError, match="attention hooks of layers \\[1\\]"), pruning_tokens(model, at_layers=2):
        model(torch.randint(0, 60, (1, 12)))


def test_smollm2_fastv_keeps_the_answer():
    """SmolLM2-135M (GQA: 9 query, 3 KV heads): exact at keep=1; 75 % of a 20-token prompt still says ' Paris'."""
    from whatmatters.text import pretrained

    if not (pretrained.cache_root() / "smollm2-135m" / "config.json").exists():
        pytest.skip("SmolLM2 cache missing (whatmatters.text.pretrained.load_smollm2 converts it once)")
    model, tok = pretrained.load_smollm2()
    ids = tok(
        "The Eiffel Tower is a famous landmark. It stands in the capital of France, the city of", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        full = model(ids).logits[0, -1]
        with pruning_tokens(model, keep=1.0) as same:
            assert torch.equal(model(ids).logits[0, -1], full)
        with pruning_tokens(model, keep=0.75, at_layers=2) as report:  # at 0.5 it answers ',' (README)
            half = model(ids).logits[0, -1]
    assert same.prefills == 1 and report.kept_positions.shape[1] == 15
    assert tok.decode(half.argmax()) == tok.decode(full.argmax()) == " Paris"
