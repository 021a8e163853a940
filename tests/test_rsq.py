"""RSQ: fused rotations keep SmolLM2's function, importance-weighted Hessians are Xᵀ diag(r) X, weighted GPTQ
lowers the error on the weighted tokens, RSQ at 3 bits beats round-to-nearest on SmolLM2, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from whatmatters.compress import lm_windows
from whatmatters.compress.batches import Batch
from whatmatters.compress.hessian import HessianSum
from whatmatters.compress.obs import sweep
from whatmatters.compress.rotation import hadamard, rotate
from whatmatters.compress.rsq import rsq, scale_per_sequence
from whatmatters.core.errors import InputError, ModelError

TWO_BLOCKS = r"layers\.[01]\."


@pytest.fixture(scope="module")
def smollm2():
    from whatmatters.text import pretrained

    if not (pretrained.cache_root() / "smollm2-135m" / "config.json").exists():
        pytest.skip("SmolLM2 cache missing (whatmatters.text.pretrained.load_smollm2 converts it once)")
    model, tok = pretrained.load_smollm2()
    docs = pretrained.load_texts("python-docs")
    cal = lm_windows(docs[0::2], tok, n_sequences=4, seq_len=64, seed=0)
    ev = lm_windows(docs[1::2], tok, n_sequences=4, seq_len=64, seed=1)
    return model, cal, ev


def perplexity(model, ids):
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).exp())


@pytest.mark.parametrize("n", [4, 12, 20, 36, 64, 576, 1536])
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))


def test_rotation_keeps_smollm2s_logits_and_leaves_the_model(smollm2):
    model, cal, _ = smollm2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rotated, kinds = rotate(model)
    assert kinds == {"residual": "hadamard", "heads": "hadamard"}
    with torch.no_grad():
        a, b = model(cal[:2], use_cache=False).logits, rotated(cal[:2], use_cache=False).logits
    assert (a - b).abs().max() < 1e-3 * a.abs().max()
    # the weights really changed (spread), the user's model did not; the copy's lm_head is untied
    assert not torch.allclose(
        rotated.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight


def test_weighted_hessian_is_x_diag_r_x():
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    r = torch.rand(2, 5, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]).bool()
    s = HessianSum(3, torch.device("cpu"))
    s.see((mask, r))
    s(None, (x,), None)
    rows, w = x[mask], r[mask]
    assert torch.allclose(s.xtx, rows.T @ (w[:, None] * rows), atol=1e-6) and s.count == 7


def test_weighted_gptq_lowers_the_error_on_the_weighted_tokens():
    """GPTQ minimises Σ r_t ‖ΔW x_t‖²: with the tokens' weights in H, the weighted error is below plain GPTQ's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 48, generator=g) * torch.linspace(0.3, 3, 48)
    w = torch.randn(16, 48, generator=g)
    r = torch.ones(400)
    r[:40] = 20.0  # a few important tokens
    plain = sweep(w, 2 * x.T @ x / 400, bits=3, group_size=16).weight
    weighted = sweep(w, 2 * x.T @ (r[:, None] * x) / 400, bits=3, group_size=16).weight

    def err(q):
        return float((r * ((w - q) @ x.T).square().sum(0)).sum())

    assert err(weighted) < 0.9 * err(plain)


def test_rsq_beats_round_to_nearest_at_3_bits_on_smollm2(smollm2):
    """Against RTN in the same rotated basis (on these GGUF-derived weights rotation alone hurts RTN, see README)."""
    model, cal, ev = smollm2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="fewer than its 576 inputs"):  # 256 tokens: dampening keeps H invertible
        quantized, report = rsq(model, 3, data=cal, layers=TWO_BLOCKS, progress=False)
    rtn, _ = rsq(model, 3, data=cal, tokens="uniform", method="rtn", layers=TWO_BLOCKS)
    assert report.method == "rsq" and report.extra["rotation"]["residual"] == "hadamard" and len(report.layers) == 14
    assert perplexity(quantized, ev) < 0.98 * perplexity(rtn, ev)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_scaling_per_sequence_ignores_padding():
    scores = torch.tensor([[3.0, 1.0, 2.0, 9.0], [5.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = scale_per_sequence(scores, mask, 1.0, 3.0)
    assert torch.equal(out, torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))


def test_token_scores_of_the_wrong_shape_and_models_that_cannot_rotate_are_refused():
    from helpers import tiny_model

    ids = torch.randint(0, 60, (4, 16), generator=torch.Generator().manual_seed(0))
    llama = tiny_model("llama")
    with pytest.raises(InputError, match="tokens scores must be"):
        rsq(llama, 4, data=ids, tokens=torch.ones(3, 16))
    with pytest.raises(InputError, match="tokens must be"):
        rsq(llama, 4, data=ids, tokens="last")
    with pytest.raises(InputError, match="calibration data"):
        rsq(llama, 4)
    with pytest.raises(ModelError, match="Llama-style"):
        rsq(tiny_model("gpt2"), 4, data=ids, tokens="uniform")
    with pytest.raises(InputError, match="token ids"):
        rsq(llama, 4, data=[Batch(args=(torch.randn(2, 3),))])


@given(
    bits=st.one_of(st.integers(-2, 12).filter(lambda b: b not in (2, 3, 4, 8)), st.just(4.5)),
    r=st.tuples(st.one_of(st.floats(-2, 5), st.just(float("nan"))), st.one_of(st.floats(-2, 5), st.just(float("nan")))),
)
@settings(max_examples=30, deadline=None)
def test_bad_bits_and_token_weight_ranges_are_refused(bits, r):
    from helpers import tiny_model

    llama, ids = tiny_model("llama"), torch.randint(0, 60, (2, 8))
    with pytest.raises(InputError, match="bits"):
        rsq(llama, bits, data=ids)
    r_min, r_max = r
    if not (0 <= r_min <= r_max and r_max > 0):
        with pytest.raises(InputError, match="r_min"):
            rsq(llama, 4, data=ids, r_min=r_min, r_max=r_max)
