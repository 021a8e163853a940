"""Mixed-precision bit allocation and fake quantization (whatmatters.compress.quantize)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from whatmatters.compress.quantize import (
    allocate_bits,
    average_bits,
    fake_quantize,
    fake_quantize_weight,
    layer_scores,
    quantize,
)
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.importance import Importance
from whatmatters.vision.nets import ShapesViT

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return ShapesViT(n_classes=4, image_size=16, patch=4, dim=32, depth=2, heads=2).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- allocation
@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=12),
    data=st.data(),
    budget=st.floats(2, 9),
)
def test_allocation_never_exceeds_the_budget(scores, data, budget):
    sizes = data.draw(st.lists(st.integers(1, 10_000), min_size=len(scores), max_size=len(scores)))
    names = [f"l{i}" for i in range(len(scores))]
    bits = allocate_bits(dict(zip(names, scores)), budget, sizes=dict(zip(names, sizes)))
    assert set(bits) == set(names) and set(bits.values()) <= {2, 3, 4, 6, 8}
    avg = average_bits(bits, dict(zip(names, sizes)))
    assert avg <= budget + 1e-9
    if budget >= 8:
        assert set(bits.values()) == {8}


def test_more_relevant_layers_get_at_least_as_many_bits():
    scores = {f"l{i}": s for i, s in enumerate([0.1, 5.0, 1.0, 20.0, 0.5, 2.0])}
    for budget in (3, 4, 5, 6):
        bits = allocate_bits(scores, budget)
        order = sorted(scores, key=scores.get)
        assert [bits[n] for n in order] == sorted(bits[n] for n in order), (budget, bits)
        assert average_bits(bits, dict.fromkeys(scores, 1)) <= budget
    # the budget is used: no single upgrade would still fit
    bits = allocate_bits(scores, 4)
    assert average_bits(bits, dict.fromkeys(scores, 1)) > 4 - 2 / len(scores)


def test_equal_scores_give_uniform_bits():
    sizes = {"a": 10, "b": 1000, "c": 37}
    for budget in (2, 3, 4, 6, 8):
        assert set(allocate_bits(dict.fromkeys(sizes, 1.0), budget, sizes=sizes).values()) == {budget}
    assert set(allocate_bits(dict.fromkeys(sizes, 0.0), 4, sizes=sizes).values()) == {4}


def test_rate_distortion_rule_by_hand():
    """Two equal layers, scores 64:1, budget 4: the noise 64 * 4**-b1 + 4**-b2 is 0.078 at (6, 2) and
    0.254 at (4, 4), the least among allocations with b1 + b2 <= 8 from the choices; the greedy finds (6, 2)."""
    assert allocate_bits({"a": 64.0, "b": 1.0}, 4) == {"a": 6, "b": 2}
    assert allocate_bits({"a": 1.0, "b": 64.0}, 4) == {"a": 2, "b": 6}
    assert allocate_bits({"a": 1.0, "b": 1.0}, 4) == {"a": 4, "b": 4}


def test_allocation_from_an_importance_and_model_sizes(vit):
    names = ("blocks.0.attn.q", "blocks.0.mlp.0")
    imp = Importance(torch.tensor([[1.0, 9.0], [3.0, 7.0]]), unit="layer", names=names)
    bits = allocate_bits(imp, 4, sizes=vit)
    assert bits["blocks.0.mlp.0"] >= bits["blocks.0.attn.q"]
    assert average_bits(bits, vit) <= 4


def test_allocation_errors(vit):
    with pytest.raises(InputError, match="impossible"):
        allocate_bits({"a": 1.0}, 1.5)
    with pytest.raises(InputError, match="bit"):
        allocate_bits({"a": 1.0}, 4, choices=(1, 4))
    with pytest.raises(InputError, match="bit"):
        allocate_bits({"a": 1.0}, 4, choices=(4.5, 8))
    with pytest.raises(InputError):
        allocate_bits({"a": 1.0}, 4, choices=())
    with pytest.raises(InputError, match="NaN"):
        allocate_bits({"a": float("nan")}, 4)
    with pytest.raises(InputError, match="sizes"):
        allocate_bits({"a": 1.0, "b": 2.0}, 4, sizes={"a": 3})
    with pytest.raises(InputError, match="no layer"):
        allocate_bits({"nope": 1.0}, 4, sizes=vit)
    with pytest.raises(InputError):
        allocate_bits([1.0, 2.0], 4)


# -------------------------------------------------------------- quantizers
def test_per_channel_weight_quantization_by_hand():
    w = torch.tensor([[1.0, -0.5, 0.25], [3.0, 1.0, -2.0], [0.0, 0.0, 0.0]])
    # 3 bits: q = 3 levels each side; row 0 step 1/3: 1 -> 3, -0.5 -> -1.5 -> -2 (half to even), 0.25 -> 0.75 -> 1
    expected = torch.tensor([[1.0, -2 / 3, 1 / 3], [3.0, 1.0, -2.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(fake_quantize_weight(w, 3, clip="max"), expected, atol=1e-7)
    # per output column when dim=1 (transformers' Conv1D layout)
    assert torch.allclose(fake_quantize_weight(w.T, 3, dim=1, clip="max"), expected.T, atol=1e-7)
    # 2 bits are ternary: {-a, 0, a}
    assert torch.equal(
        fake_quantize_weight(torch.tensor([[1.0, 0.4, -0.6]]), 2, clip="max"), torch.tensor([[1.0, 0, -1]])
    )
    # mse clipping never has a larger error than max scaling
    g = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for b in (2, 3, 4):
        err_mse = (fake_quantize_weight(g, b, clip="mse") - g).square().sum(1)
        err_max = (fake_quantize_weight(g, b, clip="max") - g).square().sum(1)
        assert bool((err_mse <= err_max + 1e-6).all())


def test_activation_quantizer_by_hand():
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [-0.9, 0.05, 3.0, -4.0]])
    # per tensor, 2 bits on [-1, 2]: step 1, zero point 1: values snap to {-1, 0, 1, 2}
    out = fake_quantize(x[:1], torch.tensor(-1.0), torch.tensor(2.0), 2)
    assert torch.equal(out, torch.tensor([[-1.0, 0.0, 0.0, 2.0]]))  # 0.5 rounds half to even
    # per channel ranges (last axis): clipping at each channel's range
    lo, hi = torch.tensor([-1.0, -1.0, 0.0, -3.0]), torch.tensor([1.0, 1.0, 3.0, 0.0])
    q = fake_quantize(x, lo, hi, 8)
    assert (q - x.clamp(torch.minimum(lo, torch.zeros(4)), hi)).abs().max() <= (hi - lo).max() / 255 / 2 + 1e-6


def test_eight_bits_is_close_and_two_bits_is_worse(vit, images):
    with torch.no_grad():
        ref = vit(images)
    errors = {}
    for b in (8, 4, 2):
        q, report = quantize(vit, b, activations=b, calibration=images)
        with torch.no_grad():
            errors[b] = float((q(images) - ref).norm() / ref.norm())
        assert report.average_bits == b and report.activation_bits == b
    assert errors[8] < 0.05
    assert errors[2] > 0.5 and errors[2] > 2 * errors[4] > 4 * errors[8]  # measured: 0.91, 0.31, < 0.05
    w8, _ = quantize(vit, 8)
    with torch.no_grad():
        assert float((w8(images) - ref).norm() / ref.norm()) < 0.01


def test_input_model_is_unchanged_and_copy_has_hooks(vit, images):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in vit.modules())
    q, report = quantize(vit, 4, activations=4, calibration=images)
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in before.items())
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in vit.modules()) == hooks_before
    assert not vit.training
    assert set(q.state_dict()) == set(before)  # activation ranges are non-persistent buffers
    modes = report.to_frame()["activations"].to_dict()
    assert modes["blocks.0.attn.q"].startswith("channel-clipped") and modes["blocks.0.mlp.0"].startswith("channel")
    assert modes["blocks.0.attn.proj"] == "tensor" and modes["blocks.0.mlp.2"] == "tensor"
    assert "head" not in modes  # output heads are left out by default


def test_mixed_bits_and_model_size():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    q, report = quantize(model, {"0": 8, "2": 2}, weight_clip="max")
    assert report.average_bits == pytest.approx((200 * 8 + 100 * 2) / 300)
    n_params = 200 + 20 + 100 + 5
    # quantized weights at their bits + one 32-bit scale per output channel; biases stay float32
    assert report.size_mb == pytest.approx((200 * 8 + 100 * 2 + 32 * 25 + 25 * 32) / 8e6)
    assert report.float_mb == pytest.approx(n_params * 32 / 8e6)
    assert len(set(q[2].weight.abs().flatten().tolist()) - {0.0}) <= 5  # ternary rows: one magnitude each


def test_quantize_bad_input(vit, images):
    with pytest.raises(InputError, match="no layer"):
        quantize(vit, {"blocks.9.attn.q": 4})
    with pytest.raises(InputError, match="did you mean"):
        quantize(vit, {"blocks.0.attn.qq": 4})
    with pytest.raises(ModelError, match="LayerNorm"):
        quantize(vit, {"blocks.0.norm1": 4})
    for bad in (1, 17, 4.0, True, "4"):
        with pytest.raises(InputError, match="bits"):
            quantize(vit, bad)
    with pytest.raises(InputError, match="bits"):
        quantize(vit, {"blocks.0.attn.q": 0})
    with pytest.raises(InputError, match="calibration"):
        quantize(vit, 4, activations=4)
    with pytest.raises(InputError, match="matches none"):
        quantize(vit, 4, layers="nothing_like_this")
    with pytest.raises(InputError, match="clip"):
        quantize(vit, 4, activations=4, calibration=images, clip=0.2)
    with pytest.raises(ModelError):
        quantize("not a model", 4)


# ------------------------------------------------------------- layer scores
def test_layer_scores(vit, images):
    mag = layer_scores(vit, "magnitude", layers="blocks.0")
    assert mag.unit == "layer" and not mag.per_sample
    q = dict(vit.named_modules())["blocks.0.attn.q"]
    assert float(mag.values[mag.names.index("blocks.0.attn.q")]) == pytest.approx(float(q.weight.detach().abs().mean()))

    lrp = layer_scores(vit, "lrp", images[:8], layers="blocks")
    names = list(lrp.names)
    assert float(lrp.values[names.index("blocks.1.attn.q")]) > 0  # relevance reaches q/k through the softmax
    const = layer_scores(vit, "lrp", images[:8], layers="blocks", attention="constant")
    assert float(const.values[names.index("blocks.1.attn.q")]) == 0  # the conservative AH-rule stops it

    ga = layer_scores(vit, "gradient_activation", images[:8], layers="blocks")
    assert bool((ga.values >= 0).all()) and bool((ga.values > 0).any())

    bi = layer_scores(vit, "block_influence", images[:8], layers="blocks")
    by_block = {n: float(v) for n, v in zip(bi.names, bi.values)}
    assert by_block["blocks.0.attn.q"] == by_block["blocks.0.mlp.2"] != by_block["blocks.1.attn.q"]

    fisher = layer_scores(vit, "fisher", images[:8], layers="blocks")
    assert fisher.names == lrp.names and bool((fisher.values > 0).all())
    with pytest.raises(InputError, match="Linear"):
        layer_scores(vit, "fisher", images[:8], layers="patch_embed")
    with pytest.raises(MethodError):
        layer_scores(vit, "nope")
    bits = allocate_bits(lrp, 4, sizes=vit)
    qmodel, report = quantize(vit, bits)
    assert report.average_bits <= 4 and qmodel(images[:2]).shape == (2, 4)


# ------------------------------------------------------------ Fashion-MNIST ViT
def test_fashion_vit_trains_and_caches(tmp_path):
    from whatmatters.vision import nets
    from whatmatters.vision.pretrained import FASHION_MNIST_DIR

    if not FASHION_MNIST_DIR.exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    model = nets.FashionViT()
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10) and model.grid == 4
    model, info = nets.train_shapes("fashion_vit", n_train=64, epochs=1, batch_size=32, n_test=32, max_steps=2)
    assert info["steps"] == 2 and info["classes"][0] == "T-shirt/top" and info["config"]["size"] == 28
    path = nets.cache_path("fashion_vit", cache=tmp_path)
    assert path.name.startswith("fashion-mnist-fashion_vit-28px-")
    assert path != nets.cache_path("fashion_vit", epochs=3, cache=tmp_path)
    with pytest.raises(InputError, match="28"):
        nets.train_shapes("fashion_vit", size=32, n_train=8, epochs=1, n_test=0, max_steps=1)


def test_the_fine_fashion_vit_has_49_patch_tokens_and_its_own_cache(tmp_path):
    from whatmatters.vision import nets
    from whatmatters.vision.pretrained import FASHION_MNIST_DIR

    if not FASHION_MNIST_DIR.exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    model, info = nets.train_shapes("fashion_vit_fine", n_train=64, epochs=1, batch_size=32, n_test=32, max_steps=1)
    assert model.grid == 7 and model.pos_embed.shape[1] == 50 and info["steps"] == 1
    assert nets.cache_path("fashion_vit_fine", cache=tmp_path) != nets.cache_path("fashion_vit", cache=tmp_path)


def test_layer_scores_are_registry_entries(vit, images):
    from whatmatters.compress.layer_scoring import LAYER_SCORE_REGISTRY, LAYER_SCORES

    assert LAYER_SCORES == ("magnitude", "fisher", "lrp", "gradient_activation", "block_influence")
    assert "blocks=None" in LAYER_SCORE_REGISTRY.describe("block_influence")
    mag = layer_scores(vit, "magnitude")
    assert mag.unit == "layer" and mag.method == "magnitude" and len(mag.names) == len(mag.values)
    with pytest.raises(MethodError, match=r"unknown layer score 'magnitud'.*Did you mean 'magnitude'.*Choose one of"):
        layer_scores(vit, "magnitud")
    with pytest.raises(MethodError, match="unknown parameter"):
        layer_scores(vit, "magnitude", blocks="x")
