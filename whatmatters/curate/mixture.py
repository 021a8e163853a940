"""Domain mixture weights: which domains of the training data matter, as per-domain sampling proportions.

DoReMi (Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining"): a
reference model's per-example losses, then a proxy model trained with group DRO. At every step the domain
weights follow exponentiated-gradient ascent on each domain's clipped excess loss
``lambda_d = mean_{x in d} max(loss_proxy(x) - loss_ref(x), 0)``::

    alpha' = alpha * exp(step_size * lambda);  alpha = (1 - smoothing) * alpha' / sum(alpha') + smoothing / k

and the proxy minimises ``sum_d alpha_d * mean_{x in d} loss_proxy(x)``. The result is the average of the
weights over the steps. Domains the proxy still gets wrong but the reference gets right (learnable, underfit)
gain weight; pure noise (the reference cannot learn it either, excess ~ 0) and easy domains (learnt at once)
do not.

* :func:`domain_weights`: one online update from given per-example losses, to call inside your own loop.
* :func:`doremi`: the whole proxy run for torch classifiers; an :class:`Importance` of unit ``"domain"``.
* :func:`domain_sampler`: a torch sampler over examples that follows the proportions.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.fractions import whole
from whatmatters.core.importance import Importance
from whatmatters.core.state import parameter_device_dtype
from whatmatters.core.task import progress_bar
from whatmatters.curate.example_task import check_examples, check_logits
from whatmatters.curate.examples import score


def domain_index(domains: Any) -> tuple[list[str], torch.Tensor]:
    """The sorted distinct domain names and each example's domain index (LongTensor)."""
    array = domains.cpu().numpy() if isinstance(domains, torch.Tensor) else np.asarray(domains, dtype=object)
    if array.ndim != 1 or not len(array):
        raise InputError(f"domains must be one label per example (1-D, non-empty), got shape {array.shape}")
    names, index = np.unique(array.astype(str), return_inverse=True)
    return [str(n) for n in names], torch.from_numpy(index.astype(np.int64))


def _losses(values: Any, name: str, n: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(values).detach()
    if t.ndim != 1 or not t.numel() or not t.is_floating_point():
        raise InputError(f"{name} must be a non-empty 1-D float tensor of per-example losses, got {tuple(t.shape)}")
    if n is not None and len(t) != n:
        raise InputError(f"{name} has {len(t)} values but there are {n} examples; give one loss per example")
    if not bool(t.isfinite().all()):
        raise InputError(f"{name} holds NaN or infinite values; check the model and the labels")
    return t


def _check_rates(step_size: float, smoothing: float) -> None:
    if not step_size > 0:
        raise InputError(f"step_size must be > 0 (the exponentiated-gradient rate), got {step_size!r}")
    if not 0 <= smoothing <= 1:
        raise InputError(f"smoothing must be in [0, 1] (the share of the uniform distribution), got {smoothing!r}")


def excess_loss(losses: torch.Tensor, ref_losses: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Per-domain mean of ``max(losses - ref_losses, 0)`` (0 for a domain absent from the batch)."""
    excess = (losses - ref_losses.to(losses)).clamp_min(0).double()
    index = index.to(excess.device)
    total = torch.zeros(k, dtype=excess.dtype, device=excess.device).index_add_(0, index, excess)
    count = torch.bincount(index, minlength=k).to(excess.dtype)
    return (total / count.clamp_min(1)).cpu()


def domain_weights(
    losses: Any,
    ref_losses: Any,
    domains: Any,
    weights: Any = None,
    *,
    n_domains: int | None = None,
    step_size: float = 1.0,
    smoothing: float = 1e-3,
) -> torch.Tensor:
    """One DoReMi update of the domain weights from a batch's per-example losses.

    ``domains`` are integer domain indices ``0..k-1`` per example (``domain_index`` maps names to them);
    ``weights`` the current weights (default uniform over ``n_domains``, or over ``max(domains) + 1``).
    Returns the new weights (float64, sum 1). Weight your loss with them, e.g.
    ``(w[domains] * losses).sum() / ...`` or per-domain means times ``w``; average them over steps for the
    final mixture.
    """
    _check_rates(step_size, smoothing)
    losses = _losses(losses, "losses")
    ref = _losses(ref_losses, "ref_losses", len(losses))
    index = torch.as_tensor(domains)
    if index.shape != losses.shape or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise InputError(
            f"domains must be integer domain indices, one per loss, got {index.dtype} {tuple(index.shape)}"
        )
    index = index.long()
    if bool((index < 0).any()):
        raise InputError("domain indices must be >= 0; map names with curate.mixture.domain_index")
    k = n_domains if n_domains is not None else (len(weights) if weights is not None else int(index.max()) + 1)
    k = whole(k, "n_domains")
    if int(index.max()) >= k:
        raise InputError(f"domain index {int(index.max())} is out of range for {k} domains")
    alpha = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else _weights(weights, k)
    return _step(alpha, excess_loss(losses, ref, index, k), step_size, smoothing)


def _weights(weights: Any, k: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    if w.shape != (k,) or not bool(w.isfinite().all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise InputError(f"weights must be {k} non-negative finite numbers with a positive sum, got {weights!r}")
    return w / w.sum()


def _step(alpha: torch.Tensor, excess: torch.Tensor, step_size: float, smoothing: float) -> torch.Tensor:
    log_alpha = alpha.clamp_min(1e-300).log() + step_size * excess
    new = torch.softmax(log_alpha, 0)
    return (1 - smoothing) * new + smoothing / len(alpha)


def per_example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cross-entropy of every example under ``model`` in eval mode, no gradients (the model is not changed):
    the ``"loss"`` scores of :func:`whatmatters.curate.score`."""
    return score(model, x, "loss", y=y, batch_size=batch_size, progress=False).values.double().cpu()


def _balanced_batch(members: list[torch.Tensor], per_domain: int, gen: torch.Generator) -> torch.Tensor:
    """``per_domain`` random examples of every domain (with replacement: small domains still fill)."""
    return torch.cat([m[torch.randint(len(m), (per_domain,), generator=gen)] for m in members])


def doremi(
    proxy: nn.Module,
    reference: Any,
    data: Any,
    y: Any,
    domains: Sequence[Any] | Any,
    *,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 1e-2,
    step_size: float = 1.0,
    smoothing: float = 1e-3,
    seed: int = 0,
    progress: bool | None = None,
) -> Importance:
    """DoReMi domain weights: train a copy of ``proxy`` with group DRO against ``reference``'s losses.

    Args:
        proxy: a torch classifier (class logits), usually freshly initialised; a copy is trained, ``proxy``
            itself is not changed.
        reference: the reference model (trained on the uniform mixture) or its per-example losses ``(n,)``.
        data, y: the examples ``(n, ...)`` and their class indices.
        domains: one domain label per example (any hashable; names are their strings, sorted).
        steps, batch_size, lr: the proxy run (Adam); each batch holds ``batch_size // k`` examples of every
            domain (the uniform reference mixture).
        step_size, smoothing: the exponentiated-gradient rate and the uniform share mixed in each step.

    Returns:
        An :class:`Importance` with ``unit="domain"``, one proportion per domain (sum 1, the average over
        steps), ``names`` the domains; ``extra`` holds ``final`` (the last weights) and ``excess`` (the last
        per-domain excess losses).
    """
    if not isinstance(proxy, nn.Module):
        raise ModelError(f"doremi needs a torch nn.Module proxy, got {type(proxy).__name__}")
    _check_rates(step_size, smoothing)
    steps, batch_size = whole(steps, "steps"), whole(batch_size, "batch_size")
    x, labels = check_examples(data, y)
    names, index = domain_index(domains)
    if len(index) != len(x):
        raise InputError(f"domains has {len(index)} labels but data has {len(x)} rows; give one per row")
    k = len(names)
    if batch_size < k:
        raise InputError(f"batch_size={batch_size} is smaller than the {k} domains; use at least one per domain")
    if isinstance(reference, nn.Module):
        ref = per_example_losses(reference, x, labels, max(batch_size, 256))
    else:
        ref = _losses(reference, "reference losses", len(x))
    start = time.perf_counter()
    model = copy.deepcopy(proxy).train()
    for p in model.parameters():
        p.requires_grad_(True)
    device, dtype = parameter_device_dtype(model)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and the like in the copy
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    members = [(index == d).nonzero().squeeze(1) for d in range(k)]
    alpha = torch.full((k,), 1.0 / k, dtype=torch.float64)
    total = torch.zeros(k, dtype=torch.float64)
    excess = torch.zeros(k, dtype=torch.float64)
    for _ in progress_bar(range(steps), steps, "doremi", progress):
        batch = _balanced_batch(members, batch_size // k, gen)
        xb = x[batch].to(device, dtype if x.is_floating_point() else None)
        logits = check_logits(model(xb), labels, model)
        losses = F.cross_entropy(logits, labels[batch].to(logits.device), reduction="none")
        excess = excess_loss(losses.detach(), ref[batch], index[batch], k)
        alpha = _step(alpha, excess, step_size, smoothing)
        total += alpha
        per_domain = losses.view(k, -1).mean(1)  # the batch is domain-major, batch_size // k rows each
        loss = (alpha.to(per_domain) * per_domain).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = {"steps": steps, "batch_size": batch_size, "lr": lr, "step_size": step_size, "smoothing": smoothing}
    return Importance(
        values=total / steps, unit="domain", names=tuple(names), per_sample=False, method="doremi",
        params=params, seed=seed, seconds=time.perf_counter() - start,
        extra={"final": alpha.tolist(), "excess": excess.tolist()},
    )  # fmt: skip


class DomainSampler(Sampler[int]):
    """Draws example indices so that domains appear in the given proportions (uniform within a domain)."""

    def __init__(self, domains: Any, proportions: Any, num_samples: int | None = None, *, seed: int = 0) -> None:
        names, index = domain_index(domains)
        if isinstance(proportions, Importance):
            if proportions.names is not None and list(proportions.names) != names:
                raise InputError(f"the proportions name domains {list(proportions.names)} but the data has {names}")
            proportions = proportions.values
        self.proportions = _weights(proportions, len(names))
        self.order = index.argsort(stable=True)  # examples grouped by domain
        self.sizes = torch.bincount(index, minlength=len(names))
        self.starts = self.sizes.cumsum(0) - self.sizes
        self.num_samples = len(index) if num_samples is None else whole(num_samples, "num_samples")
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[int]:
        drawn = torch.multinomial(self.proportions, self.num_samples, replacement=True, generator=self.generator)
        offset = torch.rand(self.num_samples, generator=self.generator, dtype=torch.float64) * self.sizes[drawn]
        return iter(self.order[self.starts[drawn] + offset.long()].tolist())

    def __len__(self) -> int:
        return self.num_samples


def domain_sampler(domains: Any, proportions: Any, num_samples: int | None = None, *, seed: int = 0) -> DomainSampler:
    """A torch ``Sampler`` over examples following per-domain ``proportions`` (an ``Importance`` from
    :func:`doremi` or one number per sorted domain name); ``num_samples`` defaults to the number of examples."""
    return DomainSampler(domains, proportions, num_samples, seed=seed)
