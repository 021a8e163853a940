"""Prompt compression by surprisal: the scores are the LM's own -log p, the budget and the suffix are kept."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from whatmatters.compress import compress_prompt
from whatmatters.compress.tokens_prompt import surprisal
from whatmatters.core.errors import InputError, MethodError

torch.set_num_threads(1)
LM = tiny_model("llama", layers=2, positions=64)


def test_surprisal_is_the_models_negative_log_probability_per_token_padded_or_not():
    ids = torch.randint(0, 60, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    s = surprisal(LM, ids, mask)
    with torch.no_grad():
        logp = LM(ids[1:, :8]).logits.log_softmax(-1)
    expected = -logp[0, torch.arange(7), ids[1, 1:8]]
    torch.testing.assert_close(s[1, 1:8], expected, atol=1e-5, rtol=1e-5)
    assert s[1, 0] == 0 and (s[1, 8:] == 0).all() and (s[0, 1:] > 0).all()


def test_keeps_the_most_surprising_context_tokens_in_order_and_the_question_whole():
    rows = [torch.randint(0, 60, (n,)) for n in (21, 13)]
    out = compress_prompt(LM, rows, keep=0.5, keep_last=4, batch_size=1)
    for row, ids, pos, s in zip(rows, out.input_ids, out.kept_positions, out.scores.values):
        n = len(row)
        context = torch.arange(1, n - 4)
        kept_ctx = pos[(pos >= 1) & (pos < n - 4)]
        assert len(kept_ctx) == round(0.5 * len(context)) and torch.equal(ids, row[pos])
        assert pos[0] == 0 and torch.equal(pos[-4:], torch.arange(n - 4, n)) and (pos.diff() > 0).all()
        dropped = context[~torch.isin(context, kept_ctx)]
        assert s[kept_ctx].min() >= s[dropped].max()
    assert out.ratio == (21 + 13) / sum(len(i) for i in out.input_ids)


def test_random_keeps_the_same_budget_and_keep_one_changes_nothing():
    ids = torch.randint(0, 60, (3, 30))
    rnd = compress_prompt(LM, ids, keep=0.25, method="random", seed=3)
    top = compress_prompt(LM, ids, keep=0.25)
    assert [len(i) for i in rnd.input_ids] == [len(i) for i in top.input_ids] == [8, 8, 8]  # 1 + round(29 / 4)
    assert not all(torch.equal(a, b) for a, b in zip(rnd.kept_positions, top.kept_positions))
    same = compress_prompt(LM, ids, keep=1.0)
    assert all(torch.equal(a, b) for a, b in zip(same.input_ids, ids))


@settings(max_examples=20, deadline=None)
@given(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001), st.just(float("nan")), st.text(max_size=3)))
def test_keep_outside_the_unit_interval_is_refused(keep):
    with pytest.raises(InputError, match="keep"):
        compress_prompt(LM, torch.randint(0, 60, (1, 8)), keep=keep)


def test_bad_prompts_get_clear_errors():
    with pytest.raises(InputError, match="tokenizer="):
        compress_prompt(LM, ["some text"])
    with pytest.raises(InputError, match="keep_last"):
        compress_prompt(LM, torch.randint(0, 60, (1, 8)), question="why?")
    with pytest.raises(InputError, match="not a mix"):
        compress_prompt(LM, [torch.randint(0, 60, (8,)), "text"])
    with pytest.raises(InputError, match="vocabulary"):
        compress_prompt(LM, torch.full((1, 8), 99))
    with pytest.raises(MethodError, match="surprisal"):
        compress_prompt(LM, torch.randint(0, 60, (1, 8)), method="perplexity")


def test_smollm2_drops_the_repeated_copy_of_a_sentence_first():
    """Ground truth: the second copy of a sentence is predictable (induction), so 2x compression drops it."""
    from whatmatters.text import pretrained

    if not (pretrained.cache_root() / "smollm2-135m" / "config.json").exists():
        pytest.skip("SmolLM2 cache missing (whatmatters.text.pretrained.load_smollm2 converts it once)")
    model, tok = pretrained.load_smollm2()
    sentence = "Purple otters negotiate quietly with seven stubborn lighthouse keepers every winter."
    out = compress_prompt(model, f"{sentence} {sentence}", tokenizer=tok, keep=0.5, question=" Who negotiates?")
    n, n_ctx = len(tok(sentence)["input_ids"]), len(tok(f"{sentence} {sentence}")["input_ids"])
    pos = out.kept_positions[0]
    first_copy = ((pos >= 1) & (pos < n)).sum()
    late_second_copy = ((pos >= n_ctx - 9) & (pos < n_ctx)).sum()  # once the copy is recognised
    assert first_copy >= 0.75 * (n - 1) and late_second_copy == 0 and out.text[0].endswith(" Who negotiates?")


def test_iterative_at_keep_one_is_the_one_pass_surprisal():
    ids = torch.randint(0, 60, (2, 23))
    one = compress_prompt(LM, ids, keep=1.0)
    seg = compress_prompt(LM, ids, keep=1.0, segment=5)
    torch.testing.assert_close(seg.scores.values, one.scores.values, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(seg.input_ids, ids))


def test_iterative_scores_each_segment_given_the_compressed_prefix():
    # ground truth without a cache: the LM on (kept tokens of the earlier segments + this segment)
    row = torch.randint(0, 60, (17,))
    out = compress_prompt(LM, [row], keep=0.5, segment=6, keep_last=2)
    pos, scores = out.kept_positions[0], out.scores.values[0]
    for s0 in (6, 12):
        prefix = row[pos[pos < s0]]
        seq = torch.cat([prefix, row[s0 : s0 + 6]])
        with torch.no_grad():
            logp = LM(seq[None]).logits[0, :-1].log_softmax(-1)
        expected = -logp[torch.arange(len(prefix) - 1, len(seq) - 1), seq[len(prefix) :]]
        torch.testing.assert_close(scores[s0 : s0 + len(expected)], expected, atol=1e-4, rtol=1e-4)
    for s0, size in ((0, 6), (6, 6), (12, 5)):  # each segment keeps its own share of its compressible tokens
        inside = pos[(pos >= s0) & (pos < s0 + size)]
        protected = int(s0 == 0) + (2 if s0 == 12 else 0)
        assert len(inside) == protected + round(0.5 * (size - protected))
    assert torch.equal(out.input_ids[0], row[pos]) and torch.equal(pos[-2:], torch.tensor([15, 16]))


def test_iterative_options_are_checked():
    ids = torch.randint(0, 60, (1, 10))
    with pytest.raises(MethodError, match="segment"):
        compress_prompt(LM, ids, segment=4, method="random")
    with pytest.raises(InputError, match="segment"):
        compress_prompt(LM, ids, segment=1)
