"""D-Pruner: the dual score is the domain plus weighted general Fisher removal cost, bad corpora are refused, the
model is untouched, and on SmolLM2 it beats a random mask on the domain and keeps general text better than the
domain importance alone."""

from __future__ import annotations

import pytest
import torch
from helpers import benchmark_script, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from whatmatters import compress
from whatmatters.compress.calibrate import calibrate
from whatmatters.compress.domain import removal_loss
from whatmatters.core.errors import InputError, MethodError

GEN = torch.Generator().manual_seed(0)
DOMAIN, GENERAL = torch.randint(0, 60, (3, 10), generator=GEN), torch.randint(0, 60, (3, 10), generator=GEN)
LAYERS = r"mlp"


def test_the_dual_score_adds_the_weighted_general_removal_cost():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dom = calibrate(model, DOMAIN, layers=LAYERS, activations=False, gradients=True)
    gen = calibrate(model, GENERAL, layers=LAYERS, activations=False, gradients=True)
    imp = compress.score(model, "d_pruner", dom, general=gen, layers=LAYERS, general_weight=0.5)
    for name, layer in imp.items():
        w = model.get_submodule(name).weight
        expected = removal_loss(w, dom.gradients[name]) + 0.5 * removal_loss(w, gen.gradients[name])
        assert torch.allclose(layer.values, expected)
        g, f = dom.gradients[name].sum / 3, dom.gradients[name].sumsq / 3
        assert torch.allclose(removal_loss(w, dom.gradients[name]), (0.5 * f * w**2 - g * w).abs())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pruned = compress.prune(model, "d_pruner", sparsity=0.5, data=DOMAIN, general=GENERAL, layers=LAYERS)
    assert pruned.report.achieved == pytest.approx(0.5, abs=0.02)


def test_missing_empty_and_foreign_corpora_are_refused():
    model = tiny_model("llama")
    with pytest.raises(InputError, match="general="):
        compress.score(model, "d_pruner", DOMAIN, layers=LAYERS)
    with pytest.raises(InputError, match="data="):
        compress.score(model, "d_pruner", general=GENERAL, layers=LAYERS)
    with pytest.raises(InputError, match="does not use general="):
        compress.score(model, "wanda", DOMAIN, general=GENERAL, layers=LAYERS)
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(InputError, match="vocabulary"):
        compress.score(model, "d_pruner", DOMAIN, general=GENERAL + vocab, layers=LAYERS)
    with pytest.raises(InputError, match="another model"):
        compress.score(model, "d_pruner", DOMAIN, general=calibrate(tiny_model("llama"), GENERAL), layers=LAYERS)


@settings(max_examples=20, deadline=None)
@given(
    empty=st.sampled_from([[], "", "  ", torch.zeros((0, 8), dtype=torch.long)]),
    which=st.sampled_from(["data", "general"]),
)
def test_an_empty_corpus_is_refused(empty, which):
    model = tiny_model("llama")
    kwargs = {"data": DOMAIN, "general": GENERAL, which: empty}
    with pytest.raises(InputError, match=f"{which}= is empty"):
        compress.score(model, "d_pruner", layers=LAYERS, **kwargs)


@settings(max_examples=20, deadline=None)
@given(weight=st.sampled_from([-1.0, -1e-9, float("nan"), float("inf"), "1"]))
def test_bad_general_weights_are_refused(weight):
    with pytest.raises(MethodError):
        compress.score(tiny_model("llama"), "d_pruner", DOMAIN, general=GENERAL, layers=LAYERS, general_weight=weight)


def test_d_pruner_on_smollm2_beats_random_and_keeps_general_text():
    from whatmatters.text import pretrained

    if not (pretrained.cache_root() / "smollm2-135m" / "config.json").exists():
        pytest.skip("SmolLM2 cache missing (whatmatters.text.pretrained.load_smollm2 converts it once)")
    bench = benchmark_script("bench_dpruner")
    model, tok = pretrained.load_smollm2()
    data = bench.corpora(tok, n_cal=4, n_eval=4, seq_len=32, n_docs=12)
    imps = bench.importances(model, data, r"model\.layers\.(28|29)\.")
    rows = {r["method"]: r for r in bench.evaluate(model, data, imps, 0.5)}
    assert rows["d_pruner"]["domain_ppl"] < 0.5 * rows["random"]["domain_ppl"]
    assert rows["d_pruner"]["general_ppl"] < rows["domain only"]["general_ppl"]
