"""Token pruning and merging in ViTs: exact at keep=1 / r=0, parity with eager attention, ToMe on duplicates."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import whatmatters
from whatmatters.compress import merge_tokens, prune_tokens, score
from whatmatters.compress.vit_tokens import TOKEN_RULES, LayerView, attend, vit_layout
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.vision.nets import VIT_SHAPES, FashionViT, ShapesViT

torch.set_num_threads(1)
METHODS = tuple(TOKEN_RULES)


def _fashion() -> torch.nn.Module:
    torch.manual_seed(0)
    return FashionViT().eval()


def _shapes() -> torch.nn.Module:
    torch.manual_seed(1)
    return ShapesViT(**VIT_SHAPES).eval()  # mean pooling, no CLS token


def _hf() -> torch.nn.Module:
    return tiny_model("vit", layers=3)


CASES = {
    "fashion": (_fashion, (1, 28, 28), lambda m, x: m(x)),
    "shapes": (_shapes, (3, 32, 32), lambda m, x: m(x)),
    "hf": (_hf, (3, 16, 16), lambda m, x: m(x).logits),
}


def _case(name: str, n: int = 5):
    make, shape, run = CASES[name]
    torch.manual_seed(2)
    return make(), torch.randn(n, *shape), run


def _tokens_at(module: torch.nn.Module, model: torch.nn.Module, run, x: torch.Tensor) -> int:
    """Tokens that reach ``module`` (a part of ``model``) in a forward pass, counted by a hook (not by the report)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        run(model, x)
    finally:
        handle.remove()
    return seen[0]


def _final_tokens(model: torch.nn.Module, run, x: torch.Tensor) -> int:
    """Tokens that reach the final LayerNorm."""
    return _tokens_at(model.vit.layernorm if hasattr(model, "vit") else model.norm, model, run, x)


@pytest.mark.parametrize("name", CASES)
def test_keep_one_and_r_zero_are_exact(name):
    model, x, run = _case(name)
    ref = run(model, x)
    methods = [m for m in METHODS if not (name == "shapes" and m == "cls_attention")]
    for method in methods:
        for schedule in ("once", "progressive"):
            pruned, report = prune_tokens(model, method, keep=1.0, schedule=schedule)
            assert torch.equal(run(pruned, x), ref), (method, schedule)
            assert report.kept_share == 1.0
    assert torch.equal(run(merge_tokens(model, r=0).model, x), ref)
    assert torch.equal(run(merge_tokens(model, r=None, keep=1.0).model, x), ref)


@pytest.mark.parametrize("name", CASES)
def test_pruned_forward_carries_fewer_tokens_and_model_untouched(name):
    model, x, run = _case(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    method = "accumulated_attention"
    pruned, report = prune_tokens(model, method, keep=0.25, schedule="progressive")
    special = 0 if name == "shapes" else 1
    patches = _final_tokens(model, run, x) - special
    assert _final_tokens(pruned, run, x) - special == round(patches * 0.25)
    assert report.kept_share == pytest.approx(round(patches * 0.25) / patches)
    assert [c[0] for c in report.last_forward] == list(range(report.layers[0], len(vit_layout(model).blocks)))
    merged = merge_tokens(model, r=3).model
    assert _final_tokens(merged, run, x) == patches + special - 3 * len(vit_layout(model).blocks)
    assert list(pruned.state_dict()) == list(before)  # parameter names kept
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [type(m) for m in model.modules()] == classes
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert run(pruned, x).shape == run(model, x).shape


@pytest.mark.parametrize("name", ["fashion", "hf"])
def test_manual_attention_equals_the_block(name):
    model = _case(name, 3)[0]
    layout = vit_layout(model)
    tokens = torch.randn(3, 17, layout.blocks[0].q.in_features)
    for parts in layout.blocks:
        after, attn, _ = attend(parts, tokens)
        mine = after + parts.mlp(parts.norm2(after))
        torch.testing.assert_close(mine, parts.block(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))


def _hf_reference(model, x, layer: int, keep: int, score_of) -> torch.Tensor:
    """Prune by eager ``output_attentions`` of block ``layer`` and run the remaining HF layers by hand."""
    out = model(x, output_attentions=True, output_hidden_states=True)
    hidden = out.hidden_states[layer + 1]  # after block `layer`, all tokens (the MLP is per token)
    scores = score_of(out.attentions[layer])
    idx = scores.topk(keep, dim=1).indices.sort(dim=1).values + 1
    h = torch.cat([hidden[:, :1], hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))], 1)
    for blk in model.vit.layers[layer + 1 :]:
        h = blk(h)
    return model.classifier(model.vit.layernorm(h)[:, 0])


@pytest.mark.parametrize(
    "method, score_of",
    [
        ("cls_attention", lambda a: a[:, :, 0, 1:].mean(1)),
        ("accumulated_attention", lambda a: a[..., 1:].sum(2).mean(1)),
    ],
)
def test_pruning_matches_eager_attention_reference(method, score_of):
    model = tiny_model("vit", layers=3, attn="eager")
    x = torch.randn(6, 3, 16, 16)
    pruned, _ = prune_tokens(model, method, keep=0.5, at_layers=1)
    ref = _hf_reference(model, x, 1, 8, score_of)
    torch.testing.assert_close(pruned(x).logits, ref, rtol=1e-4, atol=1e-5)
    sdpa = tiny_model("vit", layers=3)  # same seed, sdpa attention: the same pruned outputs
    torch.testing.assert_close(prune_tokens(sdpa, method, keep=0.5, at_layers=1).model(x).logits, ref)


def test_scorers_match_eager_attention_and_are_listed():
    model = tiny_model("vit", layers=3, attn="eager")
    x = torch.randn(4, 3, 16, 16)
    attns = model(x, output_attentions=True).attentions
    cls = score(model, "cls_attention", data=x)
    assert cls.unit == "token" and cls.values.shape == (4, 16)
    torch.testing.assert_close(cls.values, sum(a[:, :, 0, 1:].mean(1) for a in attns))
    got = score(model, "accumulated_attention", data=x, attn_layers=[-1]).values
    torch.testing.assert_close(got, attns[-1][..., 1:].sum(2).mean(1))
    a, b = (score(model, "random_tokens", data=x, seed=s).values for s in (3, 3))
    assert torch.equal(a, b) and not torch.equal(a, score(model, "random_tokens", data=x, seed=4).values)
    assert {"cls_attention", "token_transition", "random_tokens", "accumulated_attention"} <= set(
        whatmatters.methods(unit="token")
    )


def test_token_transition_is_the_relative_change():
    """Ground truth: with uniform attention every token gets the same update, so the smallest token moves most."""
    model, _, _ = _case("fashion", 2)
    parts = vit_layout(model).blocks[0]
    tokens = torch.randn(2, 17, 64) * torch.linspace(0.5, 3, 17)[:, None].roll(5, 0)
    with torch.no_grad():
        parts.q.weight.zero_()
        parts.q.bias.zero_()  # zero queries: uniform attention, one shared update for all tokens
    after, attn, _ = attend(parts, tokens)
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / 17))
    change = TOKEN_RULES["token_transition"](LayerView(attn, tokens, after, 1))
    expected = (after - tokens)[:, 1:].norm(dim=-1) / tokens[:, 1:].norm(dim=-1)
    torch.testing.assert_close(change, expected)
    assert torch.equal(change.argmax(1), tokens[:, 1:].norm(dim=-1).argmin(1))


def test_tome_merging_duplicates_is_exact():
    """Ground truth: merging identical tokens with proportional attention changes no other token's output."""
    model, _, _ = _case("fashion", 1)
    torch.manual_seed(3)
    distinct = torch.randn(3, 8, 64)
    tokens = torch.cat([torch.randn(3, 1, 64), distinct.repeat_interleave(2, dim=1)], 1)  # patches 2i, 2i+1 equal
    ref = model.blocks(tokens)[:, 0]
    for r in (2, 8):
        merged = merge_tokens(model, r=r, at_layers=[0]).model
        out = merged.blocks(tokens)
        assert out.shape[1] == 17 - r
        torch.testing.assert_close(out[:, 0], ref, rtol=1e-5, atol=1e-5)
    # without proportional attention the merged result would differ: the check can fail
    pruned, _ = prune_tokens(model, "random_tokens", keep=0.5, at_layers=0)
    assert not torch.allclose(pruned.blocks(tokens)[:, 0], ref, atol=1e-4)


def test_batch_rows_prune_independently():
    model, x, run = _case("fashion", 6)
    pruned, _ = prune_tokens(model, "cls_attention", keep=0.5, schedule="progressive")
    whole = run(pruned, x)
    torch.testing.assert_close(torch.cat([run(pruned, x[i : i + 1]) for i in range(6)]), whole)


def test_bad_arguments_are_refused():
    model = _case("fashion", 2)[0]
    with pytest.raises(InputError, match="out of range"):
        prune_tokens(model, keep=0.5, at_layers=[4])
    with pytest.raises(InputError, match="progressive"):
        prune_tokens(model, keep=0.5, at_layers=[1, 2])
    with pytest.raises(InputError, match="schedule"):
        prune_tokens(model, keep=0.5, schedule="cascade")
    with pytest.raises(MethodError, match="choose one of"):
        prune_tokens(model, "cls_attentoin", keep=0.5)
    with pytest.raises(ModelError, match="no transformer blocks"):
        prune_tokens(torch.nn.Linear(3, 3), keep=0.5)
    with pytest.raises(InputError, match="half"):
        merge_tokens(model, keep=0.1, at_layers=[0, 1])
    with pytest.raises(InputError, match="r must be"):
        merge_tokens(model, r=-1)
    with pytest.raises(InputError, match="already"):
        merge_tokens(prune_tokens(model, keep=0.5).model, r=2)
    shapes, sx, srun = _case("shapes", 2)
    with pytest.raises(MethodError, match="CLS token"):
        srun(prune_tokens(shapes, "cls_attention", keep=0.5).model, sx)


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.booleans(), st.text()))
def test_keep_outside_unit_interval_is_refused(keep):
    model = FashionViT(depth=1)
    ok = isinstance(keep, (int, float)) and not isinstance(keep, bool) and 0 < keep <= 1
    if ok:
        assert prune_tokens(model, keep=keep, at_layers=0).report.keep == float(keep)
    else:
        with pytest.raises(InputError, match="keep"):
            prune_tokens(model, keep=keep, at_layers=0)


def test_budgets_keep_the_fewest_tokens_reaching_the_score_mass():
    from whatmatters.compress.token_pruning import budgets

    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert budgets(scores, 0.7, 1, 4).tolist() == [1, 3]  # a peaked image needs 1 token, a flat one 3
    assert budgets(scores, 1.0, 1, 4).tolist() == [4, 4]
    assert budgets(scores, 0.7, 2, 2).tolist() == [2, 2]  # clamped to [min_keep, keep]


@pytest.mark.parametrize("name", ["fashion", "hf"])
def test_adaptive_budget_differs_per_image_and_keeps_all_at_threshold_one(name):
    model, x, run = _case(name, 8)
    if name == "fashion":  # real images: noise images are all alike to the model
        from whatmatters.vision.pretrained import load_fashion_mnist

        x = load_fashion_mnist("test", 8)[0]
    with torch.no_grad():  # sharper attention than at random init, so images differ in how peaked it is
        for n, p in model.named_parameters():
            if n.endswith(("q.weight", "k.weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(3.0 if name == "fashion" else 12.0)
    ref = run(model, x)
    same, report = prune_tokens(model, "cls_attention", keep=1.0, threshold=1.0)
    assert torch.equal(run(same, x), ref)
    adaptive, report = prune_tokens(model, "cls_attention", keep=1.0, threshold=0.5, min_keep=0.1)
    out = run(adaptive, x)
    need = report.budgets
    assert len(need) == 8 and len(set(need)) > 1  # images need different budgets
    patches = report.last_forward[0][1] - report.n_special
    assert all(max(1, round(0.1 * patches)) <= k <= patches for k in need)
    assert _final_tokens(adaptive, run, x) == report.n_special + max(need)  # the batch carries its largest
    # one image alone carries its own budget, and gives the same output as in the batch when it needs the most
    widest = max(range(8), key=need.__getitem__)
    torch.testing.assert_close(run(adaptive, x[widest : widest + 1]), out[widest : widest + 1])
    assert _final_tokens(adaptive, run, x[:1]) == report.n_special + need[0]


def test_adaptive_budget_bad_options_are_refused():
    model = _case("fashion", 2)[0]
    for bad in (0, 1.5, -0.1, True, "x"):
        with pytest.raises(InputError, match="threshold"):
            prune_tokens(model, keep=1.0, threshold=bad)
    with pytest.raises(InputError, match="min_keep"):
        prune_tokens(model, keep=0.3, threshold=0.5, min_keep=0.5)
    with pytest.raises(InputError, match="schedule='once'"):
        prune_tokens(model, keep=1.0, threshold=0.5, schedule="progressive")


def _tokens_entering_attention(model: torch.nn.Module, block: int, run, x: torch.Tensor) -> int:
    """Tokens that reach block ``block``'s attention sub-layer (its first norm)."""
    return _tokens_at(vit_layout(model).blocks[block].norm1, model, run, x)


def test_distinctiveness_prunes_before_the_attention_as_a_manual_forward_does():
    # ground truth: the tokens furthest from the image's mean patch token, gathered, then the unchanged blocks
    model, x, run = _case("fashion", 4)
    pruned, report = prune_tokens(model, "token_distinctiveness", keep=0.5, at_layers=1)
    with torch.no_grad():
        tokens = model.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], 1) + model.pos_embed
        tokens = model.blocks[0](tokens)
        patches = tokens[:, 1:]
        far = (patches - patches.mean(1, keepdim=True)).norm(dim=-1).topk(8, dim=1).indices.sort(1).values
        kept = torch.cat([tokens[:, :1], patches.gather(1, far[..., None].expand(-1, -1, 64))], 1)
        out = model.norm(model.blocks[3](model.blocks[2](model.blocks[1](kept))))
        expected = model.head(out[:, 0])
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-6)
    assert report.last_forward[0] == (1, 17, 9)
    assert _tokens_entering_attention(pruned, 1, run, x) == 9
    after, _ = prune_tokens(model, "token_distinctiveness", keep=0.5, at_layers=1, before_attention=False)
    assert _tokens_entering_attention(after, 1, run, x) == 17 and _final_tokens(after, run, x) == 9


def test_random_can_prune_before_the_attention_and_attention_scores_cannot():
    model, x, run = _case("hf", 3)
    pruned, report = prune_tokens(model, "random_tokens", keep=0.25, at_layers=0, before_attention=True)
    assert _tokens_entering_attention(pruned, 0, run, x) == 1 + 4 and report.kept_share == 0.25
    for method in ("cls_attention", "accumulated_attention", "token_transition"):
        with pytest.raises(InputError, match="before_attention"):
            prune_tokens(model, method, keep=0.5, before_attention=True)
    with pytest.raises(InputError, match="before_attention"):
        prune_tokens(model, "token_distinctiveness", keep=0.5, before_attention="yes")


def test_distinctiveness_scorer_reads_each_blocks_input():
    model, x, _ = _case("shapes", 3)
    inputs = []
    handle = vit_layout(model).blocks[1].block.register_forward_pre_hook(lambda _m, a: inputs.append(a[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    got = score(model, "token_distinctiveness", data=x, attn_layers=[1])
    patches = inputs[0]  # mean pooling: no CLS token
    torch.testing.assert_close(got.values, (patches - patches.mean(1, keepdim=True)).norm(dim=-1))
    assert got.unit == "token" and "token_distinctiveness" in whatmatters.methods(unit="token")


def _greedy_diverse(patches: torch.Tensor) -> list[int]:
    """DivPrune's greedy max-min order of one image's tokens, written plainly (the reference)."""
    z = torch.nn.functional.normalize(patches.double(), dim=-1)
    order = [int((z - z.mean(0)).norm(dim=-1).argmax())]  # the most distinct direction first
    while len(order) < len(z):
        nearest = {j: min(1 - float(z[j] @ z[i]) for i in order) for j in range(len(z)) if j not in order}
        order.append(max(nearest, key=lambda j: (nearest[j], -j)))
    return order


def test_diversity_order_equals_the_plain_greedy_max_min_selection():
    torch.manual_seed(3)
    before = torch.randn(4, 1 + 9, 8)  # one CLS token, nine patches
    rank = TOKEN_RULES["token_diversity"](LayerView(None, before, before, 1))
    for i in range(len(before)):
        got = rank[i].argsort(descending=True).tolist()
        assert got == _greedy_diverse(before[i, 1:])


def test_diversity_keeps_one_token_of_each_cluster_where_attention_need_not():
    # ground truth: three tight clusters of patch tokens; keeping three tokens must keep one of each
    torch.manual_seed(4)
    centres = torch.eye(3, 8) * 5
    which = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 2])
    before = torch.cat([torch.zeros(2, 1, 8), (centres[which] + 0.01 * torch.randn(2, 9, 8))], 1)
    rank = TOKEN_RULES["token_diversity"](LayerView(None, before, before, 1))
    top = rank.topk(3, dim=1).indices
    assert [sorted(which[t].tolist()) for t in top] == [[0, 1, 2], [0, 1, 2]]


def test_diversity_prunes_before_the_attention_and_is_a_token_scorer():
    model, x, run = _case("fashion", 3)
    pruned, report = prune_tokens(model, "token_diversity", keep=0.25, at_layers=0)
    assert _tokens_entering_attention(pruned, 0, run, x) == 1 + 4 and report.last_forward[0] == (0, 17, 5)
    got = score(model, "token_diversity", data=x, attn_layers=[0])
    assert got.unit == "token" and got.values.shape == (3, 16)
    assert "token_diversity" in whatmatters.methods(unit="token")
    assert sorted(got.values[0].tolist()) == list(range(1, 17))  # a rank: every patch has its place
