"""Dynamic loss-based sample reweighting: per-example weights from the current loss, within each batch.

Examples are ranked by their loss inside the batch: the easiest share (default the lowest 25 %) is down-weighted,
the medium-hard ones up-weighted, and the hardest (default the top 10 %) capped low, as likely label noise. The
weights are rescaled to mean 1, so the loss keeps its scale. :func:`weighted_loss` is a drop-in for ``loss.mean()``;
:class:`LossWeightedSampler` draws examples with those weights from the losses it was last told.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from whatmatters.core.errors import InputError
from whatmatters.core.fractions import whole


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


def weighted_loss(losses: torch.Tensor, **options: float) -> torch.Tensor:
    """``(loss_weights(losses) * losses).mean()``: the batch loss with easy examples and likely noise down-weighted."""
    return (loss_weights(losses, **options) * _losses(losses)).mean()


class LossWeightedSampler(Sampler[int]):
    """Draws ``num_samples`` indices per epoch (with replacement) with probability ``loss_weights`` of the losses.

    Call :meth:`update` with the indices of a batch and their per-example losses; examples never updated keep the
    mean loss seen so far. Before any update the draw is uniform.
    """

    def __init__(self, n: int, *, num_samples: int | None = None, seed: int = 0, **options: float) -> None:
        self.n = whole(n, "n", meaning="examples in the data set")
        self.num_samples = whole(num_samples if num_samples is not None else n, "num_samples")
        self.losses = torch.full((self.n,), float("nan"))
        self.options = options
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the current ``losses`` of the examples ``indices``."""
        self.losses[torch.as_tensor(indices).long().cpu()] = _losses(losses).detach().float().cpu()

    def weights(self) -> torch.Tensor:
        seen = ~torch.isnan(self.losses)
        if not seen.any():
            return torch.ones(self.n)
        filled = torch.where(seen, self.losses, self.losses[seen].mean())
        return loss_weights(filled, **self.options)

    def __iter__(self) -> Iterator[int]:
        draws = torch.multinomial(self.weights(), self.num_samples, replacement=True, generator=self.generator)
        yield from draws.tolist()

    def __len__(self) -> int:
        return self.num_samples
