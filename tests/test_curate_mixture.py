"""Domain mixture weights: DoReMi's excess-loss reweighting finds the learnable-but-underfit domain."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from whatmatters import curate
from whatmatters.core.errors import InputError, ModelError
from whatmatters.curate.mixture import domain_index, per_example_losses

NAMES = ("easy", "learnable", "noise")


def mixture(n: int = 400, d: int = 8, seed: int = 0):
    """Three domains told apart by indicator features: easy (one feature's sign), learnable (a nonlinear rule
    a trained MLP fits but a fresh one does not) and noise (random labels: nobody can learn them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, d, generator=g)
    dom = torch.arange(3).repeat_interleave(n)
    x[:, :3] = 0
    x[torch.arange(3 * n), dom] = 3.0
    w = torch.randn(d - 3, generator=g)
    h = x[n : 2 * n, 3:]
    y = torch.cat(
        [(x[:n, 3] > 0).long(), ((h @ w) * h[:, 0] * h[:, 1] > 0).long(), torch.randint(2, (n,), generator=g)]
    )
    return x, y, [NAMES[i] for i in dom]


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))


def reference(x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> nn.Module:
    """The reference model: ``net(1)`` trained full-batch on the uniform mixture."""
    ref = net(1)
    opt = torch.optim.Adam(ref.parameters(), 1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ref


@pytest.fixture(scope="module")
def trained():
    x, y, domains = mixture()
    return x, y, domains, reference(x, y)


def test_doremi_up_weights_the_learnable_underfit_domain_deterministically(trained):
    x, y, domains, ref = trained
    proxy = net(2)
    before = [p.clone() for p in proxy.parameters()]
    imp = curate.doremi(proxy, ref, x, y, domains, steps=80, batch_size=96, progress=False)
    assert imp.unit == "domain" and imp.names == NAMES and imp.method == "doremi"
    assert math.isclose(float(imp.values.sum()), 1.0, rel_tol=1e-9)
    assert imp.top(1)[0][0] == "learnable" and float(imp.values[1]) > 0.5
    assert float(imp.values[2]) < 1 / 3  # noise is never up-weighted
    assert all(torch.equal(a, b) for a, b in zip(before, proxy.parameters()))  # the proxy given is untouched
    again = curate.doremi(net(2), per_example_losses(ref, x, y, 256), x, y, domains, steps=80, batch_size=96)
    assert torch.equal(imp.values, again.values)  # same seed, reference model or its losses: same weights


def test_domain_weights_is_one_exponentiated_gradient_step():
    losses = torch.tensor([1.0, 2.0, 0.5, 0.5, 3.0])
    ref = torch.tensor([0.5, 1.0, 1.0, 0.5, 1.0])
    domains = torch.tensor([0, 0, 1, 1, 2])
    excess = torch.tensor([0.75, 0.0, 2.0], dtype=torch.float64)  # clipped at 0, mean per domain
    w = curate.domain_weights(losses, ref, domains, step_size=0.5, smoothing=0.1)
    expected = 0.9 * torch.softmax(0.5 * excess, 0) + 0.1 / 3
    assert torch.allclose(w, expected) and math.isclose(float(w.sum()), 1.0)
    w2 = curate.domain_weights(losses, ref, domains, w, step_size=0.5, smoothing=0.0)
    assert torch.allclose(w2, w * torch.exp(0.5 * excess) / (w * torch.exp(0.5 * excess)).sum())


def test_domain_sampler_follows_the_proportions():
    domains = ["b"] * 10 + ["a"] * 90 + ["c"] * 5
    names, index = domain_index(domains)
    sampler = curate.domain_sampler(domains, [0.2, 0.5, 0.3], 20000, seed=3)
    drawn = torch.tensor(list(sampler))
    assert len(sampler) == 20000 and drawn.min() >= 0 and drawn.max() < len(domains)
    share = np.bincount(index[drawn].numpy(), minlength=3) / len(drawn)
    assert names == ["a", "b", "c"] and np.allclose(share, [0.2, 0.5, 0.3], atol=0.02)
    assert len(set(drawn[index[drawn] == 2].tolist())) == 5  # every example of a domain is reachable
    assert list(curate.domain_sampler(domains, [0.2, 0.5, 0.3], 20000, seed=3)) == drawn.tolist()  # seeded


def test_bad_inputs_are_refused_clearly(trained):
    x, y, domains, ref = trained
    with pytest.raises(InputError, match="one per row"):
        curate.doremi(net(0), ref, x, y, domains[:-1], steps=1)
    with pytest.raises(InputError, match="smaller than the 3 domains"):
        curate.doremi(net(0), ref, x, y, domains, steps=1, batch_size=2)
    with pytest.raises(ModelError, match=r"nn\.Module"):
        curate.doremi("model", ref, x, y, domains)
    with pytest.raises(InputError, match="reference losses has 3"):
        curate.doremi(net(0), torch.ones(3), x, y, domains, steps=1)
    with pytest.raises(InputError, match="name domains"):
        curate.domain_sampler(domains, curate.doremi(net(0), ref, x, y, [d + "!" for d in domains], steps=1))


@settings(max_examples=30, deadline=None)
@given(
    step_size=st.one_of(st.floats(-2, 2), st.just(math.nan)),
    smoothing=st.one_of(st.floats(-1, 2), st.just(math.nan)),
    shift=st.integers(-2, 3),
    bad_loss=st.sampled_from([None, math.nan, math.inf]),
)
def test_domain_weights_bad_arguments_raise_input_errors(step_size, smoothing, shift, bad_loss):
    losses = torch.tensor([1.0, 2.0, 0.5])
    if bad_loss is not None:
        losses[1] = bad_loss
    domains = torch.tensor([0, 1, 1]) + shift
    ok = step_size > 0 and 0 <= smoothing <= 1 and shift >= 0 and bad_loss is None
    if ok:
        w = curate.domain_weights(losses, torch.zeros(3), domains, step_size=step_size, smoothing=smoothing)
        assert w.shape == (int(domains.max()) + 1,) and math.isclose(float(w.sum()), 1.0)
    else:
        with pytest.raises(InputError):
            curate.domain_weights(losses, torch.zeros(3), domains, step_size=step_size, smoothing=smoothing)
