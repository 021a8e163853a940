"""GPTQ with real packed weights: parity with the paper's algorithm, ground truth against round-to-nearest,
exact packing, save/load and file size, the model left as it was, bad input.

Parity: ``gptqmodel`` (it would replace torch 2.13 with 2.14 and CUDA wheels) and ``llmcompressor`` (it pins
transformers <= 5.17) cannot be installed next to this environment's torch / transformers on CPU, so the
reference here is the paper's algorithm written out directly (:func:`reference_gptq`): no lazy batches,
no Cholesky, the inverse Hessian downdated explicitly after every column, in float64.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from whatmatters.compress.gptq import gptq
from whatmatters.compress.obs import quant_params, round_to_nearest, sweep, to_codes
from whatmatters.compress.packed import QuantLinear, load_quantized, pack, save_quantized, unpack
from whatmatters.core.errors import InputError


def reference_gptq(w, h, bits, group, sym, act_order, damp):
    """Algorithm 1 of Frantar et al. without its speed-ups: quantize column i, spread its error with row i
    of the current inverse Hessian, then remove input i from the inverse (Gaussian elimination)."""
    w, h = w.double().clone(), h.double().clone()
    cols = w.shape[1]
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, order], h[order][:, order]
    h += damp * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for i in range(cols):
        if i % group == 0:
            scale, zero = quant_params(w[:, i : i + group], bits, sym)
        q[:, i] = scale * (to_codes(w[:, i], scale, zero, bits) - zero)
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        hinv -= torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return q[:, torch.argsort(order)]


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 + torch.eye(d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix * torch.linspace(0.2, 3, d, dtype=torch.float64)


@pytest.mark.parametrize(
    ("bits", "group", "sym", "act_order"), [(4, 16, True, False), (3, 8, False, True), (2, 64, True, True)]
)
def test_sweep_matches_the_papers_algorithm(bits, group, sym, act_order):
    x = correlated_inputs(256, 64)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 2 * x.T @ x / len(x)
    ours = sweep(w, h, bits=bits, group_size=group, sym=sym, act_order=act_order, damp=0.01, block_size=32)
    ref = reference_gptq(w, h, bits, group, sym, act_order, 0.01)
    assert torch.allclose(ours.weight, ref, atol=1e-9)
    # the codes, scales and zeros reproduce the weight
    deq = ours.scales[:, ours.g_idx] * (ours.codes - ours.zeros[:, ours.g_idx])
    assert torch.allclose(deq, ours.weight, atol=1e-12)


def test_a_group_size_that_does_not_divide_leaves_a_short_last_group():
    x = correlated_inputs(256, 40)
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h = 2 * x.T @ x / len(x)
    ours = sweep(w, h, bits=4, group_size=16)
    assert ours.scales.shape == (8, 3) and ours.g_idx.tolist() == [0] * 16 + [1] * 16 + [2] * 8
    assert torch.allclose(ours.weight, reference_gptq(w, h, 4, 16, True, False, 0.01), atol=1e-9)
    rtn = round_to_nearest(w, 4, 16)
    last = round_to_nearest(w[:, 32:], 4, 8)
    assert torch.equal(rtn.weight[:, 32:], last.weight) and torch.equal(rtn.scales[:, 2], last.scales[:, 0])


def test_sweep_in_float32_agrees_with_float64():
    x = correlated_inputs(256, 64)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 2 * x.T @ x / len(x)
    ref = reference_gptq(w, h, 4, 16, True, False, 0.01)
    ours = sweep(w.float(), h.float(), bits=4, group_size=16).weight.double()
    err_ours, err_ref = ((ours - w) @ x.T).norm(), ((ref - w) @ x.T).norm()
    assert err_ours == pytest.approx(float(err_ref), rel=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_beats_round_to_nearest_on_one_layer(bits):
    x = correlated_inputs(512, 64).float()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    h = 2 * x.T @ x / len(x)
    ours = sweep(w, h, bits=bits, group_size=32).weight
    rtn = round_to_nearest(w, bits, 32).weight
    assert ((w - ours) @ x.T).norm() < 0.95 * ((w - rtn) @ x.T).norm()


def _layer_inputs(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda _m, i, _o, n=n: seen.__setitem__(n, i[0].reshape(-1, i[0].shape[-1])))
        for n in names
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for hd in handles:
        hd.remove()
    return seen


def test_gptq_layer_error_below_rtn_on_a_tiny_llama():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 60, (8, 32), generator=torch.Generator().manual_seed(0))
    quantized, report = gptq(model, 3, data=ids, group_size=16, progress=False)
    names = [r["layer"] for r in report.layers]
    assert len(names) == 14 and all(isinstance(quantized.get_submodule(n), QuantLinear) for n in names)
    inputs = _layer_inputs(quantized, names, ids)  # the inputs GPTQ saw: earlier blocks already quantized
    for name in names:
        w, x = model.get_submodule(name).weight, inputs[name]
        q = quantized.get_submodule(name).dequantize()
        rtn = round_to_nearest(w, 3, 16).weight
        assert ((w - q) @ x.T).norm() < ((w - rtn) @ x.T).norm(), name
    # the user's model is unchanged
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert not model.training and not quantized.training


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def test_mlp_gptq_beats_rtn_and_is_sequential():
    model = mlp()
    x = correlated_inputs(512, 256).float()
    ours, report = gptq(model, 4, data=x, group_size=64, layers=r"^[024]$", progress=False)
    rtn, _ = gptq(model, 4, method="rtn", group_size=64, layers=r"^[024]$")
    with torch.no_grad():
        ref = model(x)
        assert (ours(x) - ref).norm() < (rtn(x) - ref).norm()
    assert [r["layer"] for r in report.layers] == ["0", "2", "4"] and report.average_bits == 4


@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    rows=st.integers(1, 5),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_pack_unpack_round_trips_exactly(bits, rows, n, seed):
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, -(-n * bits // 32))
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.int32))


def test_quant_linear_follows_dtype_and_matches_its_dequantized_weight():
    model = mlp()
    quantized, _ = gptq(model, 4, method="rtn", group_size=64)
    layer = quantized[0]
    x = torch.randn(3, 256)
    assert torch.allclose(layer(x), x @ layer.dequantize().T + layer.bias, atol=1e-5)
    half = quantized.to(torch.bfloat16)
    assert half[0].scales.dtype == torch.bfloat16 and half[0].qweight.dtype == torch.int32
    assert half(x.bfloat16()).dtype == torch.bfloat16


def test_save_load_gives_identical_outputs_and_a_small_file(tmp_path):
    model = mlp()
    x = correlated_inputs(300, 256).float()
    float_file = tmp_path / "float.safetensors"
    from safetensors.torch import save_model

    save_model(model, str(float_file))
    for bits in (3, 4, 8):
        quantized, report = gptq(model, bits, data=x, group_size=128, progress=False)
        path = tmp_path / f"q{bits}.safetensors"
        size = save_quantized(quantized, path)
        loaded = load_quantized(mlp(seed=1), path)
        with torch.no_grad():
            assert torch.equal(loaded(x), quantized(x))
        # the file holds the packed codes, scales, zeros, group index and the float biases, and a header
        n_weights = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
        groups = 128 * 2 + 64 * 1 + 10 * 1  # (rows x groups of 128 inputs) per layer
        expected = n_weights * bits / 8 + 5 * groups + 4 * (256 + 128 + 64) + 4 * (128 + 64 + 10)
        assert report.packed_bytes == pytest.approx(expected - 4 * (128 + 64 + 10), abs=64)
        assert 0 <= size - expected < 2048
        assert size / float_file.stat().st_size < bits / 32 + 0.05
        assert report.packed_bytes < report.float_bytes * (bits / 32 + 0.05)


def test_bits_from_a_dict_quantize_only_those_layers():
    model = mlp()
    quantized, report = gptq(model, {"0": 2, "4": 8}, method="rtn", group_size=64)
    assert isinstance(quantized[0], QuantLinear) and quantized[0].bits == 2 and quantized[4].bits == 8
    assert isinstance(quantized[2], nn.Linear)
    assert report.average_bits == pytest.approx((2 * 256 * 128 + 8 * 64 * 10) / (256 * 128 + 640))


@given(bits=st.one_of(st.integers(-3, 20).filter(lambda b: b not in (2, 3, 4, 8)), st.just(4.0), st.just("4")))
@settings(max_examples=25, deadline=None)
def test_bits_outside_the_packable_set_are_refused(bits):
    with pytest.raises(InputError, match="bits"):
        gptq(mlp(), bits, method="rtn")


def test_bad_group_size_and_missing_data_are_refused():
    with pytest.raises(InputError, match="group_size"):
        gptq(mlp(), 4, method="rtn", group_size=0)
    with pytest.raises(InputError, match="calibration data"):
        gptq(mlp(), 4)
    with pytest.raises(InputError, match="damp"):
        gptq(mlp(), 4, data=torch.randn(8, 256), damp=0)


def test_few_calibration_tokens_warn():
    with pytest.warns(UserWarning, match="fewer than its 256 inputs"):
        gptq(mlp(), 4, data=torch.randn(16, 256), layers="^0$", progress=False)


def test_a_calibration_is_accepted_as_data_and_must_match_the_model():
    from whatmatters.compress import calibrate

    model, x = mlp(), correlated_inputs(300, 256).float()
    cal = calibrate(model, x, activations=False)
    via_cal, _ = gptq(model, 4, data=cal, progress=False)
    direct, _ = gptq(model, 4, data=x, batch_size=8, progress=False)
    assert torch.equal(via_cal[0].qweight, direct[0].qweight)
    with pytest.raises(InputError, match="another model"):
        gptq(mlp(seed=2), 4, data=cal)


def test_cached_block_inputs_equal_running_the_model_up_to_each_block():
    """Both drivers see the same Hessians when each block is changed (here: RTN-rounded) before the next."""
    from whatmatters.compress.hessian import prepare, reconstruct_sequentially

    model = tiny_model("llama")
    ids = torch.randint(0, 60, (4, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    for cache_inputs in (True, False):
        new, batches, layers = prepare(model, ids, None, None, 2, 128)
        hessians = {}

        def process(name, layer, hessian, tokens, hessians=hessians):
            hessians[name] = hessian
            layer.weight.data.copy_(round_to_nearest(layer.weight, 3, 16).weight)

        reconstruct_sequentially(new, batches, layers, process, description="t", progress=False,
                                 cache_inputs=cache_inputs)  # fmt: skip
        seen.append(hessians)
    assert seen[0].keys() == seen[1].keys() and len(seen[0]) == 14
    for name in seen[0]:
        assert torch.allclose(seen[0][name], seen[1][name], rtol=1e-5, atol=1e-6), name
