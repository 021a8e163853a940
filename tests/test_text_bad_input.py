"""Bad input to token attribution: clear errors (or a warning when a text is truncated), never a crash."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import whatmatters as wm
from tests.helpers import tiny_model
from whatmatters.core.errors import InputError, MethodError, ModelError, TargetError


class WordTokenizer:
    """A minimal tokenizer: one id per whitespace-separated word (ids 2..), 0 = padding, 1 = [CLS]."""

    pad_token_id, eos_token_id, all_special_ids = 0, None, [0, 1]

    def __call__(self, texts, add_special_tokens=True, **_):
        one = isinstance(texts, str)
        head = [1] if add_special_tokens else []
        rows = [head + [2 + sum(map(ord, w)) % 50 for w in t.split()] for t in ([texts] if one else texts)]
        return {"input_ids": rows[0] if one else rows}

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


_LLAMA = tiny_model("llama", positions=16)
_BERT = tiny_model("bert", positions=16)


@pytest.fixture
def bert():
    return _BERT


@pytest.fixture
def llama():
    return _LLAMA


@pytest.mark.parametrize("texts", [[], [""], ["ok", "   "]])
def test_empty_text_is_refused(bert, texts):
    with pytest.raises(InputError, match=r"empty|no text"):
        wm.explain(bert, texts, method="saliency", tokenizer=WordTokenizer())


def test_text_without_a_tokenizer_is_refused(bert):
    with pytest.raises(InputError, match="tokenizer="):
        wm.explain(bert, ["a text"], method="saliency")


def test_a_text_longer_than_the_context_is_truncated_with_a_warning(bert, llama):
    long = " ".join(["word"] * 40)
    with pytest.warns(UserWarning, match="longer than the model's context of 16 tokens"):
        imp = wm.explain(bert, [long, "short one"], method="gradient_x_input", tokenizer=WordTokenizer())
    assert imp.values.shape == (2, 16)
    with pytest.warns(UserWarning, match="truncated to their last"):
        imp = wm.explain(llama, torch.randint(2, 60, (1, 30)), method="saliency", generate=2)
    assert imp.values.shape == (1, 2, 16)  # 14 prompt tokens kept + 2 generated


def test_targets_outside_the_vocabulary_or_the_classes_are_refused(bert, llama):
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        wm.explain(llama, torch.tensor([[3, 4]]), method="saliency", target=[[5, 1000]])
    with pytest.raises(TargetError, match="out of range"):
        wm.explain(bert, torch.tensor([[3, 4]]), method="saliency", target=7)
    with pytest.raises(InputError, match="vocabulary"):
        wm.explain(bert, torch.tensor([[3, 400]]), method="saliency")


def test_lm_and_classifier_options_that_do_not_fit_are_refused(bert, llama):
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(InputError, match="causal language model"):
        wm.explain(bert, ids, method="saliency", generate=2)
    with pytest.raises(TargetError, match="continuation"):
        wm.explain(llama, ids, method="saliency")
    with pytest.raises(TargetError, match="not both"):
        wm.explain(llama, ids, method="saliency", generate=2, target=[[4]])
    with pytest.raises(InputError, match="positive number"):
        wm.explain(llama, ids, method="saliency", generate=0)
    with pytest.raises(MethodError, match="does not score text"):
        wm.explain(bert, ["a b"], method="lime", tokenizer=WordTokenizer())
    with pytest.raises(MethodError, match="unknown baseline"):
        wm.explain(bert, ids, method="integrated_gradients", baseline="blur")
    with pytest.raises(InputError, match="attention_mask"):
        wm.explain(bert, ids, method="saliency", attention_mask=torch.tensor([[0, 0, 0]]))


def test_a_model_without_an_embedding_layer_is_refused():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 2)

        def forward(self, input_ids, attention_mask=None):
            return self.lin(input_ids.float().mean(1, keepdim=True))

    with pytest.raises(ModelError, match="get_input_embeddings"):
        wm.explain(Plain().eval(), ["a b c"], method="saliency", tokenizer=WordTokenizer())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(-5, 80), min_size=1, max_size=4))
def test_any_target_ids_work_or_raise_a_clear_error(target):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = wm.explain(_LLAMA, torch.tensor([[3, 4]]), method="saliency", target=[target])
    except (InputError, TargetError) as err:
        assert "vocabulary" in str(err) or "indices" in str(err) or "target" in str(err)
        assert any(t < 0 or t >= 60 for t in target)
    else:
        assert imp.values.shape == (1, len(target), 2 + len(target))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(alphabet=" ab\t\n", max_size=6), min_size=0, max_size=3))
def test_any_texts_work_or_raise_a_clear_error(texts):
    try:
        imp = wm.explain(_BERT, texts, method="gradient_x_input", tokenizer=WordTokenizer())
    except InputError as err:
        assert "empty" in str(err) or "no text" in str(err)
        assert not texts or any(not t.strip() for t in texts)
    else:
        assert imp.values.shape[0] == len(texts)
