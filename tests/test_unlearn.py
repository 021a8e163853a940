"""WAGLE unlearning: the attribution is the first-order forget gain minus retain damage, an empty forget set
is refused, the model is never changed, and WAGLE forgets more than a random mask of equal size (tiny Llama
and SmolLM2)."""

from __future__ import annotations

import pytest
import torch
from helpers import benchmark_script, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from whatmatters.compress.batches import as_batches
from whatmatters.compress.unlearn import _mean_nll, unlearn, wagle_scores
from whatmatters.core.errors import InputError

IDS = torch.randint(0, 60, (4, 12), generator=torch.Generator().manual_seed(0))


def test_wagle_scores_are_forget_gain_minus_retain_damage():
    model = tiny_model("llama").double()
    w = [model.model.layers[0].mlp.up_proj.weight]
    w[0].requires_grad_(True)
    forget, retain = as_batches(IDS[:2]), as_batches(IDS[2:])
    (score,) = wagle_scores(model, forget, retain, w, 0.5)
    (gf,) = torch.autograd.grad(_mean_nll(model, forget[0]), w)
    (gr,) = torch.autograd.grad(_mean_nll(model, retain[0]), w)
    assert torch.allclose(score, gf * (gf + 0.5 * gr), atol=1e-9)
    # one small ascent step on the top-scored weights raises the forget loss by about lr * sum(a^2)
    top = score >= score.flatten().topk(20).values[-1]
    with torch.no_grad():
        before = float(_mean_nll(model, forget[0]))
        w[0] += 0.1 * gf * top
        assert float(_mean_nll(model, forget[0])) - before == pytest.approx(0.1 * float((gf**2 * top).sum()), rel=0.05)


def test_unlearn_leaves_the_model_and_updates_only_the_mask():
    model = tiny_model("llama").train()
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, report = unlearn(model, forget=IDS[:2], retain=IDS[2:], share=0.05, steps=3, layers=r"mlp")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and new.training and not model.model.layers[1].mlp.down_proj.weight.requires_grad
    changed = sum(int((new.state_dict()[k] != v).sum()) for k, v in before.items())
    assert 0 < changed <= report.n_updated == round(0.05 * report.n_weights)
    assert all(torch.equal(new.state_dict()[k], v) for k, v in before.items() if "mlp" not in k)


@pytest.mark.parametrize("empty", [[], "", "   ", torch.zeros(0, 8, dtype=torch.long), None])
def test_an_empty_forget_set_is_refused(empty):
    with pytest.raises(InputError, match="forget set is empty"):
        unlearn(tiny_model("llama"), forget=empty, retain=IDS)


@given(
    share=st.one_of(st.floats(-1, 0), st.floats(1.001, 3), st.just(float("nan"))),
    method=st.sampled_from(["wagle", "random"]),
)
@settings(max_examples=20, deadline=None)
def test_bad_shares_methods_and_losses_are_refused(share, method):
    model = tiny_model("llama")
    with pytest.raises(InputError, match="share"):
        unlearn(model, forget=IDS, retain=IDS, method=method, share=share)
    with pytest.raises(InputError, match="method"):
        unlearn(model, forget=IDS, retain=IDS, method="ga")
    with pytest.raises(InputError, match="loss"):
        unlearn(model, forget=IDS, retain=IDS, loss="kl")


def test_npo_runs_and_raises_the_forget_loss():
    model = tiny_model("llama")
    new, report = unlearn(model, forget=IDS[:2], retain=IDS[2:], loss="npo", method="full", steps=4, lr=1e-2)
    (f,) = as_batches(IDS[:2])
    with torch.no_grad():
        assert float(_mean_nll(new, f)) > float(_mean_nll(model, f)) and len(report.losses) == 4


def test_wagle_forgets_more_than_a_random_mask_of_equal_size():
    g = torch.Generator().manual_seed(0)
    forget, retain = torch.randint(0, 60, (4, 12), generator=g), torch.randint(0, 60, (4, 12), generator=g)
    model = tiny_model("llama")
    ((f,), (r,)) = as_batches(forget), as_batches(retain)
    kwargs = {"forget": forget, "retain": retain, "share": 0.02, "steps": 5, "lr": 1e-2}
    gains = {}
    for method in ("wagle", "random"):
        new, _ = unlearn(model, method=method, **kwargs)
        with torch.no_grad():
            gains[method] = float(_mean_nll(new, f) - _mean_nll(model, f))
            assert float(_mean_nll(new, r)) < float(_mean_nll(model, r)) + 0.02  # retain kept
    assert gains["wagle"] > 3 * gains["random"] > 0


def test_wagle_forgets_smollm2_text_a_random_mask_does_not():
    from whatmatters.text import pretrained

    if not (pretrained.cache_root() / "smollm2-135m" / "config.json").exists():
        pytest.skip("SmolLM2 cache missing (whatmatters.text.pretrained.load_smollm2 converts it once)")
    bench = benchmark_script("bench_unlearn")
    model, data = bench.unlearning_data(n=2, seq_len=48)
    kwargs = {"forget": data["forget"], "retain": data["retain"], "share": 0.01, "steps": 4, "layers": r"layers\.29\."}
    wagle, report = unlearn(model, method="wagle", **kwargs)
    random, _ = unlearn(model, method="random", **kwargs)
    before = bench.perplexity(model, data["forget"])
    gain = {
        name: bench.perplexity(m, data["forget"]) / before - 1 for name, m in (("wagle", wagle), ("random", random))
    }
    assert gain["wagle"] > 0.05 and gain["wagle"] > 3 * max(gain["random"], 0.0)  # the mask matters, not its size
    assert report.n_updated == round(0.01 * report.n_weights)
