"""SparseGPT: lower reconstruction error than magnitude and Wanda at equal sparsity (one layer and a tiny
Llama), exact sparsity and N:M patterns, the model left as it was, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from test_gptq import _layer_inputs, correlated_inputs, mlp

from whatmatters.compress import prune
from whatmatters.compress.obs import sweep
from whatmatters.compress.sparsegpt import sparsegpt
from whatmatters.compress.sparsity import nm_mask, unstructured_mask
from whatmatters.core.errors import InputError


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_one_layer_error_below_magnitude_and_wanda(pattern):
    x = correlated_inputs(512, 64).float()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    h = 2 * x.T @ x / len(x)
    ours = sweep(w, h, sparsity=None if pattern else 0.5, n_m=pattern).weight
    assert float((ours == 0).float().mean()) == 0.5
    if pattern:
        assert bool(((ours.reshape(32, 16, 4) != 0).sum(-1) == 2).all())
    norms = x.norm(dim=0)
    for scores in (w.abs(), w.abs() * norms):  # magnitude, Wanda
        base = w * (nm_mask(scores, *pattern) if pattern else unstructured_mask(scores, 0.5))
        assert ((w - ours) @ x.T).norm() < 0.95 * ((w - base) @ x.T).norm()


def _relative_errors(model, pruned, names, ids):
    inputs = _layer_inputs(pruned, names, ids)
    errors = []
    for n in names:
        w, x = model.get_submodule(n).weight.detach(), inputs[n]
        ours = pruned.get_submodule(n).weight.detach()
        errors.append(float(((w - ours) @ x.T).norm() / (w @ x.T).norm()))
    return torch.tensor(errors)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_tiny_llama_sparsegpt_beats_magnitude_and_wanda(pattern):
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 60, (8, 32), generator=torch.Generator().manual_seed(0))
    sparsity = 0.5 if pattern == "unstructured" else None
    ours, report = sparsegpt(model, sparsity, pattern, data=ids, progress=False)
    assert report.method == "sparsegpt" and report.achieved == 0.5
    names = [r["layer"] for r in report.layers]
    mine = _relative_errors(model, ours, names, ids)
    for method in ("magnitude", "wanda"):
        other, _ = prune(model, method, sparsity, pattern, data=ids)
        theirs = _relative_errors(model, other, names, ids)
        assert mine.mean() < 0.9 * theirs.mean(), method
        assert float((mine < theirs).float().mean()) >= 0.8, method
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_bad_input_is_refused():
    x = torch.randn(32, 256)
    with pytest.raises(InputError, match="sparsity"):
        sparsegpt(mlp(), 1.0, data=x)
    with pytest.raises(InputError, match="fixes the sparsity"):
        sparsegpt(mlp(), 0.5, "2:4", data=x)
    with pytest.raises(InputError, match="not divisible by M=3"):
        sparsegpt(mlp(), None, "1:3", data=x)
    with pytest.raises(InputError, match="calibration data"):
        sparsegpt(mlp(), 0.5)
    with pytest.raises(InputError, match="block_size"):
        sparsegpt(mlp(), 0.5, data=x, block_size=0)
