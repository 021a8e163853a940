"""Token importance from accumulated attention: exact against eager attention weights on tiny configs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from helpers import tiny_model

import whatmatters
from whatmatters.compress import score
from whatmatters.compress.tokens import received_attention
from whatmatters.core.errors import InputError, ModelError

torch.set_num_threads(1)
VOCAB, L = 97, 24
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _llama(attn: str) -> torch.nn.Module:
    return tiny_model("llama", layers=3, vocab=VOCAB, positions=None, attn=attn, seed=0)


def _qwen2(attn: str) -> torch.nn.Module:
    return tiny_model("qwen2", vocab=VOCAB, kv_heads=1, positions=None, attn=attn, seed=1)


def _qwen3(attn: str) -> torch.nn.Module:
    return tiny_model("qwen3", vocab=VOCAB, positions=None, attn=attn, seed=4)


def _gpt2(attn: str) -> torch.nn.Module:
    return tiny_model("gpt2", vocab=VOCAB, positions=64, attn=attn, seed=2)


MAKERS = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gpt2": _gpt2}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, L), generator=torch.Generator().manual_seed(3))


def _eager_received(model, ids, mask=None) -> torch.Tensor:
    """Explicit computation: eager attention weights, padding queries dropped, summed over heads and queries."""
    with torch.no_grad():
        att = model(ids, attention_mask=mask, output_attentions=True).attentions  # per layer (b, heads, q, k)
    q_ok = torch.ones(ids.shape) if mask is None else mask.float()
    return torch.stack([(a * q_ok[:, None, :, None]).sum(dim=(1, 2)) for a in att])  # (layers, b, k)


@pytest.mark.parametrize("name", list(MAKERS))
def test_sdpa_scores_equal_eager_output_attentions(ids, name):
    sdpa, eager = MAKERS[name]("sdpa"), MAKERS[name]("eager")
    imp = score(sdpa, "accumulated_attention", data=ids)
    assert imp.unit == "token" and imp.per_sample and imp.values.shape == (3, L)
    torch.testing.assert_close(imp.values, _eager_received(eager, ids).sum(0), **TOL)
    # the same through the alias, and with small query blocks (blocked computation = one block)
    small = score(sdpa, "attention_tokens", data=ids, query_block=5)
    torch.testing.assert_close(small.values, imp.values, **TOL)


def test_layer_subset_and_normalisation(ids):
    model, eager = _llama("sdpa"), _llama("eager")
    per_layer = _eager_received(eager, ids)
    imp = score(model, "accumulated_attention", data=ids, attn_layers=[0, -1])
    torch.testing.assert_close(imp.values, per_layer[0] + per_layer[2], **TOL)
    assert imp.extra["layers"] == [0, 2]
    norm = score(model, "accumulated_attention", data=ids, normalize=True, attn_layers=[1])
    seen_by = torch.arange(L, 0, -1).float()  # queries i >= j
    torch.testing.assert_close(norm.values, per_layer[1] / seen_by, **TOL)
    # every query gives one unit of attention per head and layer: the total is layers x heads x queries
    torch.testing.assert_close(imp.values.sum(-1), torch.full((3,), 2 * 4 * L, dtype=torch.float32), **TOL)


def test_padded_batches(ids):
    model, eager = _llama("sdpa"), _llama("eager")
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0  # right padding: the real tokens score as the unpadded sequence
    mask[1, :3] = 0  # left padding
    imp = score(model, "accumulated_attention", data={"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(imp.values, _eager_received(eager, ids, mask).sum(0) * mask, **TOL)
    alone = score(model, "accumulated_attention", data=ids[:1, :-5])
    torch.testing.assert_close(imp.values[0, :-5], alone.values[0], **TOL)
    assert bool((imp.values[0, -5:] == 0).all()) and bool((imp.values[1, :3] == 0).all())
    assert imp.extra["lengths"] == [L - 5, L - 3, L]


def test_received_attention_gqa_matches_repeated_heads():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 7, 4, generator=g), torch.randn(2, 2, 7, 4, generator=g)
    got = received_attention(q, k, 0.5, query_block=3)
    full = torch.repeat_interleave(k, 3, dim=1)  # each KV head serves 3 query heads
    logits = (q @ full.transpose(-1, -2) * 0.5).masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(got, logits.softmax(-1).sum(dim=(1, 2)), **TOL)


def test_model_unchanged_and_registry(ids):
    model = _llama("sdpa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    score(model, "accumulated_attention", data=ids, attn_layers=[0])  # stops after layer 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    assert "accumulated_attention" in whatmatters.methods(unit="token", verb="compress")
    assert "normalize=False" in whatmatters.describe("attention_tokens")


def test_bad_input(ids):
    model = _llama("sdpa")
    with pytest.raises(InputError, match="pass token ids"):
        score(model, "accumulated_attention")
    with pytest.raises(InputError, match="out of range"):
        score(model, "accumulated_attention", data=ids, attn_layers=[3])
    with pytest.raises(InputError, match=r"attn_layers must be (a sequence of layer indices|a list or tuple)"):
        score(model, "accumulated_attention", data=ids, attn_layers=1)
    with pytest.raises(InputError, match="token ids"):
        score(model, "accumulated_attention", data=torch.randn(2, 5))
    with pytest.raises(InputError, match="query_block"):
        score(model, "accumulated_attention", data=ids, query_block=0)
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ModelError, match="does not support BertForMaskedLM"):
        score(bert, "accumulated_attention", data=ids)


def test_smollm2_first_token_is_an_attention_sink():
    """Known behaviour of pretrained LMs: the first token receives far more attention per query than any other."""
    from whatmatters.text.pretrained import cache_root, load_smollm2, load_texts

    if not (cache_root() / "smollm2-135m" / "config.json").exists():
        pytest.skip("SmolLM2 cache not built (whatmatters.text.pretrained.load_smollm2 converts it once, ~40 s)")
    model, tok = load_smollm2()
    texts = load_texts("python-docs")
    ids = torch.stack([tok(" ".join(texts[i : i + 10]), return_tensors="pt").input_ids[0, :48] for i in (0, 20)])
    imp = score(model, "accumulated_attention", data=ids, normalize=True)
    first, rest = imp.values[:, 0], imp.values[:, 1:].amax(-1)
    assert bool((first > 3 * rest).all()), (first, rest)
