"""Dynamic loss-based sample reweighting: per-example weights from the current loss, within each batch.

Two schemes (``SCHEMES``), both rank examples by their loss inside the batch and rescale the weights to mean 1, so
the loss keeps its scale:

* ``"bands"`` (:func:`loss_weights`): the easiest share (default the lowest 25 %) is down-weighted, the medium-hard
  ones up-weighted, and the hardest (default the top 10 %) capped low, as likely label noise.
* ``"small_loss"`` (:func:`small_loss_weights`): small-loss selection, the rule of Co-teaching (Han et al., 2018)
  with one network: the ``drop`` share with the highest loss gets weight 0. Networks fit clean labels before they
  memorize noisy ones, so :func:`drop_schedule` ramps ``drop`` from 0 over a warm-up.

:func:`weighted_loss` is a drop-in for ``loss.mean()``; :class:`LossWeightedSampler` draws examples with those
weights from the losses it was last told.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.fractions import removed_share, whole


def _losses(losses: torch.Tensor) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor):
        losses = torch.as_tensor(losses, dtype=torch.float32)
    if losses.ndim != 1 or losses.numel() == 0:
        raise InputError(f"per-example losses must be a non-empty 1-D tensor, got shape {tuple(losses.shape)}")
    if not torch.isfinite(losses).all():
        raise InputError("the per-example losses hold NaN or infinite values; check the model and the labels")
    return losses


def loss_weights(
    losses: torch.Tensor,
    *,
    easy: float = 0.25,
    hard: float = 0.9,
    easy_weight: float = 0.5,
    medium_weight: float = 1.5,
    hard_weight: float = 0.1,
) -> torch.Tensor:
    """Weights (mean 1, no gradient) for per-example ``losses`` from their rank in the batch.

    Rank quantile ``q`` in ``[0, 1]`` (0: lowest loss): ``q < easy`` -> ``easy_weight``, ``q > hard`` ->
    ``hard_weight`` (likely noise), otherwise ``medium_weight``.
    """
    losses = _losses(losses).detach()
    if not 0 <= easy <= hard <= 1:
        raise InputError(f"need 0 <= easy <= hard <= 1 (rank quantiles), got easy={easy}, hard={hard}")
    if min(easy_weight, medium_weight, hard_weight) < 0 or medium_weight == 0:
        raise InputError("weights must be >= 0 and medium_weight > 0")
    n = losses.numel()
    ranks = torch.empty(n, device=losses.device, dtype=losses.dtype)
    ranks[losses.argsort()] = torch.arange(n, device=losses.device, dtype=losses.dtype)
    q = ranks / max(n - 1, 1)
    w = torch.full_like(losses, float(medium_weight))
    w = torch.where(q < easy, torch.full_like(w, float(easy_weight)), w)
    w = torch.where(q > hard, torch.full_like(w, float(hard_weight)), w)
    return w * (n / w.sum().clamp_min(1e-12))


def small_loss_weights(losses: torch.Tensor, *, drop: float = 0.2) -> torch.Tensor:
    """Small-loss selection: weight 0 for the ``drop`` share of ``losses`` with the highest loss (likely noisy
    labels), ``n / kept`` for the rest (mean 1, no gradient); at least one example is kept."""
    losses = _losses(losses).detach()
    drop = removed_share(drop, "drop", of="the batch's highest-loss examples given weight 0", example="0.2")
    n = losses.numel()
    kept = max(1, n - round(drop * n))
    w = torch.zeros_like(losses)
    w[losses.argsort()[:kept]] = n / kept
    return w


def drop_schedule(step: int, *, drop: float, warmup: int) -> float:
    """Co-teaching's ramp of the dropped share: ``drop * min(1, step / warmup)`` (0 at step 0, ``drop`` from
    step ``warmup`` on), since a network fits the clean labels first and memorizes the noisy ones later."""
    drop = removed_share(drop, "drop", of="the batch's highest-loss examples given weight 0", example="0.2")
    step = whole(step, "step", minimum=0)
    warmup = whole(warmup, "warmup", minimum=0, meaning="steps over which drop ramps up from 0")
    return drop * min(1.0, step / warmup) if warmup else drop


SCHEMES = {"bands": loss_weights, "small_loss": small_loss_weights}


def scheme_weights(losses: torch.Tensor, scheme: str = "bands", **options: float) -> torch.Tensor:
    """The weights of ``losses`` under the reweighting ``scheme`` (a key of ``SCHEMES``) with its ``options``."""
    if scheme not in SCHEMES:
        raise MethodError(f"unknown reweighting scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    known = [p for p in inspect.signature(SCHEMES[scheme]).parameters if p != "losses"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise MethodError(f"the {scheme!r} reweighting takes {', '.join(known)}, not {', '.join(unknown)}")
    return SCHEMES[scheme](losses, **options)


def _check_weights(weights: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    weights = torch.as_tensor(weights, dtype=losses.dtype, device=losses.device).detach()
    if weights.shape != losses.shape:
        raise InputError(f"weights have shape {tuple(weights.shape)}, the losses {tuple(losses.shape)}; give one each")
    if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise InputError("the sample weights must be finite (no NaN), >= 0 and not all 0; check how they were made")
    return weights


def weighted_loss(
    losses: torch.Tensor, *, scheme: str = "bands", weights: torch.Tensor | None = None, **options: float
) -> torch.Tensor:
    """``(w * losses).mean()`` with ``w = scheme_weights(losses, scheme, **options)`` (or the given ``weights``):
    a drop-in for ``losses.mean()`` with easy examples and likely noise down-weighted."""
    losses = _losses(losses)
    w = scheme_weights(losses, scheme, **options) if weights is None else _check_weights(weights, losses)
    return (w * losses).mean()


class LossWeightedSampler(Sampler[int]):
    """Draws ``num_samples`` indices per epoch (with replacement) with probability ``scheme_weights`` of the losses
    (ranked over the whole data set; ``options`` may be changed between epochs, e.g. ``sampler.options["drop"]``).

    Call :meth:`update` with the indices of a batch and their per-example losses; examples never updated keep the
    mean loss seen so far. Before any update the draw is uniform.
    """

    def __init__(
        self, n: int, *, scheme: str = "bands", num_samples: int | None = None, seed: int = 0, **options: float
    ) -> None:
        self.n = whole(n, "n", meaning="examples in the data set")
        self.num_samples = whole(num_samples if num_samples is not None else n, "num_samples")
        self.losses = torch.full((self.n,), float("nan"))
        self.scheme, self.options = scheme, options
        scheme_weights(torch.zeros(1), scheme, **options)  # a bad scheme or option fails here, not at the first draw
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the current ``losses`` of the examples ``indices``."""
        self.losses[torch.as_tensor(indices).long().cpu()] = _losses(losses).detach().float().cpu()

    def weights(self) -> torch.Tensor:
        seen = ~torch.isnan(self.losses)
        if not seen.any():
            return torch.ones(self.n)
        filled = torch.where(seen, self.losses, self.losses[seen].mean())
        return scheme_weights(filled, self.scheme, **self.options)

    def __iter__(self) -> Iterator[int]:
        draws = torch.multinomial(self.weights(), self.num_samples, replacement=True, generator=self.generator)
        yield from draws.tolist()

    def __len__(self) -> int:
        return self.num_samples
