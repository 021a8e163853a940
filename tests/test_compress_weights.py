"""Weight scores: ground truth on small models, calibration statistics, ModelImportance, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from torch import nn

import whatmatters as wm
from whatmatters.compress import Calibration, ModelImportance, calibrate, lm_windows, score
from whatmatters.compress.batches import Batch, default_loss
from whatmatters.compress.linear import select_layers


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def tiny_llama(seed: int = 0):
    return tiny_model("llama", vocab=40, positions=64, seed=seed)


def word_tokenizer():
    """A word-level tokenizer built in memory (no download): whitespace split, [PAD] = 0."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in TEXTS for w in text.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


TEXTS = [
    "the cat sat on the mat",
    "a big red dog ran fast",
    "the small blue cat ran",
    "a dog sat",
    "the mat and the cat and the dog then ran slow",
]


def test_methods_are_registered():
    names = wm.methods(verb="compress", unit="weight")
    assert {"magnitude", "wanda", "taylor", "fisher", "gradient_wanda"} <= set(names)
    assert "alpha=100.0" in wm.describe("gblm")


def test_magnitude_is_absolute_weight_in_out_in_layout():
    model = mlp()
    imp = score(model, "magnitude")
    assert isinstance(imp, ModelImportance) and list(imp) == ["0", "2"]
    torch.testing.assert_close(imp["0"].values, model[0].weight.abs(), rtol=0, atol=0)
    assert imp["2"].unit == "weight" and imp["2"].unit_shape == (4, 8) and not imp["2"].per_sample


def test_gpt2_conv1d_scores_are_transposed_to_out_in():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2)).eval()
    imp = score(model, "magnitude")
    conv = model.transformer.h[0].attn.c_attn  # weight stored (in=16, out=48)
    assert imp["transformer.h.0.attn.c_attn"].unit_shape == (48, 16)
    torch.testing.assert_close(imp["transformer.h.0.attn.c_attn"].values, conv.weight.abs().t(), rtol=0, atol=0)
    assert imp["transformer.h.0.attn.c_attn"].extra["transposed"] is True


def test_wanda_is_weight_times_input_channel_norm():
    model = mlp()
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    imp = score(model, "wanda", data=x, batch_size=3)  # four batches, reduced on the fly
    hidden = torch.relu(model[0](x)).detach()
    torch.testing.assert_close(imp["0"].values, model[0].weight.abs().detach() * x.norm(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        imp["2"].values, model[2].weight.abs().detach() * hidden.norm(dim=0), rtol=1e-5, atol=1e-6
    )


def test_running_mean_and_variance_match_all_tokens():
    model = mlp()
    x = torch.randn(37, 6, generator=torch.Generator().manual_seed(2)) * 3 + 5
    cal = calibrate(model, x, batch_size=4)
    stats = cal.activations["0"]
    assert stats.count == 37 and cal.n_sequences == 37
    torch.testing.assert_close(stats.mean, x.double().mean(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats.var, x.double().var(0, unbiased=False), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(stats.norm, x.double().norm(dim=0), rtol=1e-6, atol=1e-9)


def test_padding_tokens_are_left_out_of_activation_statistics():
    model, tok = tiny_llama(), word_tokenizer()
    padded = calibrate(model, TEXTS, tok, batch_size=5)  # one right-padded batch
    single = calibrate(model, TEXTS, tok, batch_size=1)  # no padding at all
    n_tokens = sum(len(t.split()) for t in TEXTS)
    for name in padded.layers:
        assert padded.activations[name].count == n_tokens
        torch.testing.assert_close(padded.activations[name].sumsq, single.activations[name].sumsq, rtol=1e-4, atol=1e-6)


def test_causal_lm_default_loss_is_the_models_next_token_loss():
    model, tok = tiny_llama(), word_tokenizer()
    (batch,) = calibrate(model, TEXTS, tok, batch_size=5, activations=False).batches
    out = model(**batch.kwargs)
    labels = batch.kwargs["input_ids"].masked_fill(batch.kwargs["attention_mask"] == 0, -100)
    expected = model(**batch.kwargs, labels=labels).loss
    torch.testing.assert_close(default_loss(model, out, batch), expected, rtol=1e-5, atol=1e-6)


def _classification_batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 6, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(3)]


def test_taylor_is_weight_times_mean_batch_gradient():
    model = mlp()
    batches = _classification_batches()
    imp = score(model, "taylor", data=batches)
    grads = [torch.zeros_like(model[0].weight), torch.zeros_like(model[2].weight)]
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        for acc, g in zip(grads, torch.autograd.grad(loss, [model[0].weight, model[2].weight])):
            acc += g / len(batches)
    torch.testing.assert_close(imp["0"].values, (model[0].weight * grads[0]).abs().detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(imp["2"].values, (model[2].weight * grads[1]).abs().detach(), rtol=1e-5, atol=1e-7)


def test_fisher_matches_per_sample_gradients_from_torch_func():
    from torch.func import functional_call, grad, vmap

    model = mlp()
    batches = _classification_batches()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    fisher_diag = {name: per_sample[f"{name}.weight"].square().sum(0) for name in ("0", "2")}
    raw = score(model, "fisher", data=batches, saliency=False)
    sal = score(model, "fisher", data=batches)
    for name in ("0", "2"):
        torch.testing.assert_close(raw[name].values, fisher_diag[name], rtol=1e-4, atol=1e-8)
        w = dict(model.named_parameters())[f"{name}.weight"].detach()
        torch.testing.assert_close(sal[name].values, 0.5 * w.square() * fisher_diag[name], rtol=1e-4, atol=1e-9)


def test_gradient_wanda_combines_activation_and_gradient_norms():
    model = mlp()
    batches = _classification_batches()
    cal = calibrate(model, batches, gradients=True)
    g = score(model, "gradient_wanda", data=cal, alpha=7.0)
    plain = score(model, "wanda", data=cal)
    for name, layer in (("0", model[0]), ("2", model[2])):
        w = layer.weight.detach().abs()
        x_norm = (cal.activations[name].sumsq / cal.n_sequences).sqrt().float()
        expected = w * (x_norm + 7.0 * cal.gradients[name].sumsq.sqrt())
        torch.testing.assert_close(g[name].values, expected, rtol=1e-5, atol=1e-8)
    no_grad = score(model, "gradient_wanda", data=cal, alpha=0.0)
    scale = cal.n_sequences**0.5  # alpha = 0 is Wanda up to a constant factor per model
    torch.testing.assert_close(no_grad["0"].values * scale, plain["0"].values, rtol=1e-5, atol=1e-7)


def test_one_calibration_serves_several_scores():
    model = mlp()
    batches = _classification_batches()
    cal = calibrate(model, batches, gradients=True)
    for method in ("wanda", "taylor", "fisher", "gradient_wanda"):
        reused, fresh = score(model, method, data=cal), score(model, method, data=batches)
        for name in reused:
            torch.testing.assert_close(reused[name].values, fresh[name].values, rtol=1e-5, atol=1e-7)
    with pytest.raises(wm.InputError, match="another model"):
        score(mlp(1), "wanda", data=cal)


def test_scores_leave_the_model_as_it_was():
    model = mlp()
    model.train()
    model[0].bias.requires_grad_(False)
    handle = model[2].register_forward_hook(lambda *a: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("magnitude", "wanda", "taylor", "fisher", "gradient_wanda"):
        score(model, method, data=_classification_batches())
    assert model.training and all(m.training for m in model.modules())
    assert model[0].bias.requires_grad is False and model[0].weight.requires_grad is True
    assert all(p.grad is None for p in model.parameters())
    assert len(model[2]._forward_hooks) == 1 and all(len(m._forward_hooks) == 0 for m in (model[0], model[1]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    handle.remove()


def test_text_calibration_on_a_causal_lm():
    model, tok = tiny_llama(), word_tokenizer()
    for method in ("wanda", "taylor", "gradient_wanda"):
        imp = score(model, method, data=TEXTS, tokenizer=tok, batch_size=2)
        assert len(imp) == 14 and all(bool(torch.isfinite(v.values).all()) for v in imp.values())
        assert all(float(v.values.sum()) > 0 for v in imp.values())


def test_lm_windows_are_contiguous_seeded_token_windows():
    tok = word_tokenizer()
    ids = torch.as_tensor(tok("\n\n".join(TEXTS))["input_ids"])
    windows = lm_windows(TEXTS, tok, n_sequences=6, seq_len=5, seed=1)
    assert windows.shape == (6, 5)
    assert torch.equal(windows, lm_windows(TEXTS, tok, n_sequences=6, seq_len=5, seed=1))
    for row in windows:
        starts = [i for i in range(len(ids) - 4) if torch.equal(ids[i : i + 5], row)]
        assert starts, "every window is a slice of the token stream"
    with pytest.raises(wm.InputError, match="fewer than one window"):
        lm_windows(["the cat"], tok, seq_len=50)


def test_model_importance_operations_and_exact_round_trip(tmp_path):
    model = mlp()
    imp = score(model, "wanda", data=torch.randn(12, 6))
    path = imp.save(tmp_path / "wanda.parquet")
    back = ModelImportance.load(path)
    assert back == imp and list(back) == ["0", "2"] and back["2"].extra["layer"] == "2"
    top = imp.global_top(5)
    flat = sorted(((n, i // v.unit_shape[1], i % v.unit_shape[1], float(s)) for n, v in imp.items()
                   for i, s in enumerate(v.values.reshape(-1).tolist())), key=lambda r: -r[3])[:5]  # fmt: skip
    assert [(t[0], t[1]) for t in top] == [(f[0], (f[1], f[2])) for f in flat]
    lowest = imp.global_top(3, largest=False)
    assert lowest[0][2] == min(float(v.values.min()) for v in imp.values())
    frame = imp.to_frame()
    assert list(frame.index) == ["0", "2"] and frame.loc["0", "n_weights"] == 48
    assert frame["share"].sum() == pytest.approx(1.0)
    layer = imp.layer_importance("mean")
    assert layer.unit == "layer" and layer.names == ("0", "2")
    assert float(layer.values[1]) == pytest.approx(float(imp["2"].values.mean()))
    with pytest.raises(KeyError, match="no layer 'x'"):
        imp["x"]
    assert "x" not in imp and imp.get("x") is None


def test_layer_selection_by_regex():
    model = tiny_llama()
    imp = score(model, "magnitude", layers=r"mlp\.(up|down)_proj")
    assert len(imp) == 4 and all("mlp" in n for n in imp)
    assert "lm_head" not in score(model, "magnitude")
    assert list(score(model, "magnitude", layers="lm_head")) == ["lm_head"]
    with pytest.raises(wm.InputError, match="unknown layer pattern 'attention'"):
        score(model, "magnitude", layers="attention")
    with pytest.raises(wm.InputError, match="not a valid regular expression"):
        score(model, "magnitude", layers="mlp(")


def test_clear_errors_for_bad_input():
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(wm.ModelError, match=r"nn\.Module"):
        score(LogisticRegression(), "magnitude")
    with pytest.raises(wm.ModelError, match=r"no nn\.Linear"):
        score(nn.Sequential(nn.Conv2d(3, 4, 3)), "magnitude")
    with pytest.raises(wm.MethodError, match="unknown method"):
        score(mlp(), "wandaa")
    with pytest.raises(wm.MethodError, match="explain method"):
        score(mlp(), "ablation")
    with pytest.raises(wm.MethodError, match="unknown parameter"):
        score(mlp(), "magnitude", alpha=3)
    with pytest.raises(wm.InputError, match="needs calibration data"):
        score(mlp(), "wanda")
    with pytest.raises(wm.InputError, match="needs a tokenizer"):
        score(mlp(), "wanda", data=["some text"])
    with pytest.raises(wm.InputError, match="NaN"):
        score(mlp(), "wanda", data=torch.full((2, 6), float("nan")))
    with pytest.raises(wm.MethodError, match="alpha"):
        score(mlp(), "gradient_wanda", data=_classification_batches(), alpha=-1.0)


def test_batches_split_every_input_of_the_batch():
    batch = Batch(kwargs={"input_ids": torch.arange(12).reshape(4, 3), "attention_mask": torch.ones(4, 3)})
    parts = batch.split(3)
    assert [p.size for p in parts] == [3, 1] and torch.equal(parts[1].kwargs["input_ids"], torch.tensor([[9, 10, 11]]))
    assert isinstance(calibrate(mlp(), torch.randn(5, 6), activations=False), Calibration)
    assert list(select_layers(mlp(), ["^0$", "^2$"])) == ["0", "2"]
