"""LRP: parity with zennit, conservation, transformers, layer relevance, model state and errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import benchmark_script
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import whatmatters as wm
from whatmatters.core.errors import MethodError
from whatmatters.explain._lrp import RULES, Rule, get_composite, layer_relevance, lrp, merge_batchnorm
from whatmatters.explain._lrp.rules import ZBox

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "lrp"


@pytest.fixture(scope="module")
def golden():
    maker = benchmark_script("make_lrp_goldens")
    model = maker.fixture_cnn()
    model.load_state_dict(torch.load(FIXTURES / "cnn.pt"))
    model.eval()
    return maker, model, dict(np.load(FIXTURES / "goldens.npz"))


@pytest.mark.parametrize(
    "composite", ["epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1", "epsilon_plus_flat"]
)
def test_parity_with_zennit(golden, composite):
    """Input relevance equals zennit 0.5.1's (SequentialMergeBatchNorm canonizer; goldens from
    benchmarks/make_lrp_goldens.py). Tolerance: correlation >= 0.999 over all values and max abs
    difference <= 1e-4 x the largest |relevance| (measured: about 2e-5 relative, float32)."""
    maker, model, data = golden
    x, t = torch.tensor(data["inputs"]), torch.tensor(data["targets"])
    ours, _ = lrp(model, x, t, composite, low=maker.LOW, high=maker.HIGH)
    ref = torch.tensor(data[composite])
    assert ours.shape == ref.shape
    corr = np.corrcoef(ours.flatten().numpy(), ref.flatten().numpy())[0, 1]
    assert corr >= 0.999
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_scorer_gives_pixel_maps_summing_to_relevance(golden):
    _, model, data = golden
    x, t = torch.tensor(data["inputs"]), torch.tensor(data["targets"])
    imp = wm.explain(model, x, "lrp", target=t.tolist(), composite="epsilon_plus")
    assert imp.unit == "pixel" and imp.values.shape == (len(x), 16, 16)
    ref = torch.tensor(data["epsilon_plus"]).sum(1)
    assert torch.allclose(imp.values, ref, atol=1e-4 * ref.abs().max().item())
    assert np.allclose(imp.extra["relevance_sum"], ref.flatten(1).sum(1).numpy(), rtol=1e-3, atol=1e-7)


def test_epsilon_conserves_on_bias_free_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.Tanh(), nn.Linear(16, 3, bias=False)
    ).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    rel, _ = lrp(model, x, 2, "epsilon", epsilon=0.0)
    assert torch.allclose(rel.sum(1), model(x)[:, 2].detach(), atol=1e-5)
    # LRP-0 on a ReLU net is gradient x input; the Tanh pass rule makes this one differ from it
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg)[:, 2].sum(), xg)
    assert not torch.allclose(rel, x * g, atol=1e-6)


def test_merge_batchnorm_is_equivalent_and_leaves_model_alone(golden):
    _, model, data = golden
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged, names = merge_batchnorm(model)
    assert names == ["1", "5", "13"]
    x = torch.tensor(data["inputs"])
    assert torch.allclose(merged(x), model(x), atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model[1], nn.BatchNorm2d)


def _tiny_vit(zero_biases: bool) -> nn.Module:
    from whatmatters.vision.nets import ShapesViT

    torch.manual_seed(1)
    vit = ShapesViT(n_classes=4, image_size=8, patch=4, dim=16, depth=2, heads=2).double().eval()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("bias") and zero_biases:
                p.zero_()
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5)
        if zero_biases:
            vit.pos_embed.zero_()
            vit.cls_token.zero_()
    return vit


def test_vit_relevance_is_conserved():
    """Conservative LRP (LayerNorm std and attention softmax constant): without biases the input
    relevance sums to the logit; with plain gradient x input it does not."""
    vit = _tiny_vit(zero_biases=True)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    rel, _ = lrp(vit, x, 1, "epsilon", epsilon=0.0)
    logit = vit(x)[:, 1].detach()
    err = (rel.flatten(1).sum(1) - logit).abs().max()
    assert err <= 1e-8 * logit.abs().max()
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(vit(xg)[:, 1].sum(), xg)
    assert (((x * g).flatten(1).sum(1) - logit).abs().max()) > 1e-3 * logit.abs().max()


def test_vit_scorer_runs_with_biases():
    vit = _tiny_vit(zero_biases=False)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    imp = wm.explain(vit, x, "lrp", target=0)
    assert imp.values.shape == (3, 8, 8) and torch.isfinite(imp.values).all()


def test_hf_vit_with_functional_softmax_is_conserved():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, attn_implementation="eager", hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "position_embeddings" in name or "cls_token" in name:
                p.zero_()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    rel, _ = lrp(model, x, 2, "epsilon", epsilon=0.0, softmax_functions=True)
    logit = model(x).logits[:, 2].detach()
    assert torch.allclose(rel.flatten(1).sum(1), logit, atol=1e-8, rtol=1e-6)


def test_layer_relevance_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(),
                          nn.Linear(8, 2, bias=False)).double()  # fmt: skip
    x = torch.randn(6, 4, dtype=torch.float64)
    imp = layer_relevance(model, x, 0, reduce="sum", epsilon=0.0)
    assert imp.unit == "layer" and imp.names == ("0", "2", "4") and imp.values.shape == (6, 3)
    logit = model(x)[:, 0].detach()
    # bias-free and epsilon=0: every layer passes the full logit on (the last layer's output is the logit)
    assert torch.allclose(imp.values.double(), logit[:, None].expand(6, 3), atol=1e-5)
    absolute = layer_relevance(model, x, 0)
    assert (absolute.values >= imp.values.abs() - 1e-6).all()


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale


def test_unsupported_layer_names_it_and_the_fix():
    model = nn.Sequential(nn.Linear(4, 4), _Custom(), nn.Linear(4, 2)).eval()
    with pytest.raises(MethodError, match=r"'1' \(_Custom\).*rules=\{'1'"):
        lrp(model, torch.randn(2, 4), 0)
    rel, _ = lrp(model, torch.randn(2, 4), 0, rules={"1": "pass"})
    assert rel.shape == (2, 4)


class _Broken(Rule):
    def backward(self, module, x, z, g):
        raise RuntimeError("boom")


def test_model_unchanged_even_on_error(golden):
    _, model, data = golden
    x = torch.tensor(data["inputs"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    for canonize in (False, True):
        with pytest.raises(RuntimeError, match="boom"):
            lrp(model, x, 0, canonize=canonize, rules={"4": _Broken()})
        lrp(model, x, 0, canonize=canonize)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert all(p.grad is None for p in model.parameters())
    model.train()
    try:
        lrp(model, x, 0, canonize=False)
        assert model.training and all(m.training for m in model.modules())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN stats untouched
    finally:
        model.eval()


def test_bad_composite_and_target(golden):
    _, model, data = golden
    x = torch.tensor(data["inputs"])
    with pytest.raises(MethodError, match="unknown LRP composite"):
        lrp(model, x, 0, "epsilon_pluss")
    with pytest.raises(ValueError, match="target"):
        lrp(model, x, 7)


@pytest.mark.parametrize("rule", ["wsquare", "flat", "zbox", "gamma", "alpha2_beta1", "zplus"])
def test_first_layer_and_conv_rules_conserve(rule):
    """Every rule conserves relevance through a bias-free layer (sums match the logit; epsilon=0 above)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3, bias=False)
    ).double()  # fmt: skip
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    comp = get_composite("epsilon", epsilon=0.0, stabilizer=0.0)
    first = ZBox(0.0, 1.0, 0.0) if rule == "zbox" else RULES[rule](stabilizer=0.0)
    rules = {"0": first}
    rel, _ = lrp(model, x, 0, comp, rules=rules)
    out = model(x)[:, 0].detach()
    assert torch.allclose(rel.flatten(1).sum(1), out, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_unsigned_input_shortcut_changes_no_relevance(golden, composite, monkeypatch):
    """A layer input without negative entries (after a ReLU) skips the x- terms of z+, alpha-beta and gamma;
    forcing the signed computation everywhere gives the same input relevance (float64)."""
    from whatmatters.explain._lrp import rules

    maker, model, data = golden
    model = copy.deepcopy(model).double()  # the fixture's model is shared
    x, t = torch.tensor(data["inputs"]).double(), torch.tensor(data["targets"])
    fast, _ = lrp(model, x, t, composite, low=maker.LOW, high=maker.HIGH)
    calls = []
    monkeypatch.setattr(rules, "_signed", lambda inp: calls.append(1) or True)
    slow, _ = lrp(model, x, t, composite, low=maker.LOW, high=maker.HIGH)
    assert calls, "the rules did not ask whether their input is signed"
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", ["zplus", "alpha2_beta1", "gamma", "zbox"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_stacked_weights_pass_equals_one_pass_per_weight(rule, signed, layer, monkeypatch):
    """z+, alpha-beta, gamma and z-beta run their weights (x+ / x- terms, up / down parts, the bounds' terms) as
    one stacked layer pass (on unsigned inputs alpha-beta and gamma read ``W x`` off the layer's output and pass
    ``W+ x`` only); forcing one pass per weight (as for grouped convolutions) gives the same relevance (float64)."""
    from whatmatters.explain._lrp import rules as rules_module

    torch.manual_seed(3)
    first = nn.Conv2d(3, 5, 3, padding=1) if layer == "conv" else nn.Linear(12, 5)
    model = nn.Sequential(first, nn.Tanh(), nn.Flatten(), nn.LazyLinear(4)).double()  # no ReLU: z < 0 gets gradient
    x = torch.randn(4, 3, 6, 6) if layer == "conv" else torch.randn(4, 12)
    x = (x if signed else x.abs()).double()
    model(x)  # materialise the lazy layer
    comp = get_composite("epsilon")
    first_rule = ZBox(-3.0, 3.0) if rule == "zbox" else rule
    stacked, _ = lrp(model, x, 1, comp, rules={"0": first_rule})
    calls = []
    monkeypatch.setattr(rules_module, "_stackable", lambda m: calls.append(1) and False)
    per_weight, _ = lrp(model, x, 1, comp, rules={"0": first_rule})
    assert calls or (not signed and rule in ("zplus", "alpha2_beta1")), "the rule did not ask whether its weights stack"
    torch.testing.assert_close(stacked, per_weight, rtol=1e-10, atol=1e-12)
    assert float(stacked.abs().sum()) > 0


@pytest.mark.parametrize("rule", ["zplus", "alpha2_beta1", "gamma", "zbox"])
@pytest.mark.parametrize("signed", [True, False])
def test_rules_on_token_sequences_are_the_rules_on_their_rows(rule, signed):
    """A Linear layer on (n, tokens, features) is the same layer on each token's row: its channels are the last
    dimension, not dimension 1 (a rule that stacked along dimension 1 failed with a shape error there)."""
    torch.manual_seed(4)
    layer = nn.Linear(6, 5).double()
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    x = x if signed else x.abs()
    z, g = layer(x).detach(), torch.randn(3, 7, 5, dtype=torch.float64)
    r = ZBox(-3.0, 3.0) if rule == "zbox" else RULES[rule]()
    rows = r.backward(layer, x.reshape(-1, 6), z.reshape(-1, 5), g.reshape(-1, 5))
    torch.testing.assert_close(r.backward(layer, x, z, g), rows.reshape(3, 7, 6), rtol=1e-10, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=20),
    eps=st.sampled_from([1e-9, 1e-6, 0.25]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_the_damped_factor_is_the_same_floats_as_dividing_by_the_stabilised_output(values, eps, dtype):
    from whatmatters.explain._lrp.rules import damped, stabilize

    z = torch.tensor([*values, 0.0, -0.0], dtype=dtype)
    assert torch.equal(damped(z, eps), z / stabilize(z, eps))


def _inplace_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus"])
def test_rules_applied_as_a_scaled_output_gradient_equal_their_own_backward(monkeypatch, composite):
    # epsilon and the average-pool rule scale the gradient at the layer's output and let the layer's own backward
    # run; the rules' explicit backward passes are the reference (in-place ReLUs after the layers, reflect padding)
    model, x = _inplace_net(), torch.rand(3, 3, 8, 8)
    layers = ["0", "4", "6"]
    fast, fast_layers = lrp(model, x, torch.tensor([0, 1, 3]), composite, layers=layers)
    monkeypatch.setattr(Rule, "output_factor", lambda self, module, z: None)
    for cls in (RULES["epsilon"], RULES["norm"]):
        monkeypatch.setattr(cls, "output_factor", lambda self, module, z: None)
    slow, slow_layers = lrp(model, x, torch.tensor([0, 1, 3]), composite, layers=layers)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)
    for name in layers:  # the relevance arriving at a layer's output is read before the rule scales it
        torch.testing.assert_close(fast_layers[name], slow_layers[name], rtol=1e-5, atol=1e-7)
