"""ReAGent: finds the one token that moves the target, batched, leaves the models alone, refuses bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from text_toys import TARGET, VOCAB, KeyLM, key_rows

from whatmatters.core.errors import InputError, ModelError
from whatmatters.explain.reagent import reagent


@pytest.fixture(scope="module")
def toy():
    return KeyLM().eval()


def test_reagent_ranks_the_key_token_first(toy):
    ids, where = key_rows(n=8, length=10)
    replacer = tiny_model("llama", vocab=VOCAB)
    imp = reagent(toy, ids, TARGET, replacer=replacer, max_steps=40, seed=1)
    assert imp.unit == "token" and imp.values.shape == ids.shape
    assert (imp.values.argmax(1) == where).float().mean() >= 0.9
    torch.testing.assert_close(imp.values.sum(1), torch.ones(len(ids)))


def test_reagent_padding_scores_zero_and_rows_sum_to_one(toy):
    ids, _ = key_rows(n=4, length=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    imp = reagent(toy, ids, TARGET, attention_mask=mask, max_steps=20)
    assert (imp.values[mask == 0] == 0).all()
    torch.testing.assert_close(imp.values.sum(1), torch.ones(4))
    assert set(imp.extra) >= {"stopped", "steps"} and len(imp.extra["stopped"]) == 4


def test_reagent_is_seeded_and_leaves_the_model_as_it_was():
    model = tiny_model("llama", vocab=40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 40, (3, 8))
    a = reagent(model, ids, [1, 2, 3], max_steps=6, probes=4, seed=3)
    b = reagent(model, ids, [1, 2, 3], max_steps=6, probes=4, seed=3)
    assert torch.equal(a.values, b.values)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_reagent_refuses_a_replacer_with_another_vocabulary(toy):
    ids, _ = key_rows(n=2)
    with pytest.raises(ModelError, match="vocabulary"):
        reagent(toy, ids, TARGET, replacer=tiny_model("llama", vocab=VOCAB + 5))


def test_reagent_refuses_empty_rows_and_unknown_targets(toy):
    ids, _ = key_rows(n=2)
    mask = torch.ones_like(ids)
    mask[0] = 0
    with pytest.raises(InputError, match="empty text or all padding"):
        reagent(toy, ids, TARGET, attention_mask=mask)
    with pytest.raises(InputError, match="target ids must lie in"):
        reagent(toy, ids, VOCAB)
    with pytest.raises(InputError, match="input_ids"):
        reagent(toy, ids[:, :0], TARGET)


@settings(max_examples=25, deadline=None)
@given(ratio=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(float("nan")), st.booleans()))
def test_reagent_ratio_outside_zero_one_is_refused(ratio):
    ids, _ = key_rows(n=1)
    with pytest.raises(InputError, match=r"ratio must be a number in \(0, 1\)"):
        reagent(KeyLM().eval(), ids, TARGET, ratio=ratio)


@settings(max_examples=20, deadline=None)
@given(target=st.one_of(st.integers(min_value=-(2**70), max_value=-1), st.integers(min_value=VOCAB, max_value=2**70)))
def test_reagent_target_outside_the_vocabulary_is_refused(target):
    ids, _ = key_rows(n=1)
    with pytest.raises(InputError, match="target"):
        reagent(KeyLM().eval(), ids, target)


def test_explain_reagent_attributes_each_generated_token_to_its_context():
    """``wm.explain(..., method="reagent", generate=2)``: slot t is the direct reagent run on the context before it."""
    import whatmatters as wm

    lm = tiny_model("llama", vocab=40)
    ids = torch.tensor([[5, 9, 12, 3], [0, 0, 11, 4]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    opts = {"max_steps": 4, "probes": 3}
    imp = wm.explain(lm, ids, method="reagent", attention_mask=mask, generate=2, **opts)
    assert imp.method == "reagent" and imp.values.shape == (2, 2, 6)
    targets = torch.tensor(imp.extra["target_ids"])
    first = reagent(lm, ids, targets[:, 0], attention_mask=mask, seed=0, **opts)
    torch.testing.assert_close(imp.values[:, 0, :4], first.values.float())
    assert (imp.values[:, 0, 4:] == 0).all() and (imp.values[:, 1, 5:] == 0).all()
    torch.testing.assert_close(imp.values[:, 1].sum(-1), torch.ones(2))  # each slot's context sums to 1
    assert (imp.values[1, :, :2] == 0).all()  # left padding scores 0


def test_explain_reagent_refuses_a_classifier():
    import whatmatters as wm
    from whatmatters.core.errors import MethodError

    with pytest.raises(MethodError, match="causal"):
        wm.explain(tiny_model("bert"), torch.randint(5, 60, (2, 6)), method="reagent")
