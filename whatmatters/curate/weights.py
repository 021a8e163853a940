"""Reweighting: turn example scores into sample weights (scikit-learn ``sample_weight``) or a torch sampler.

``sample_weights(imp, how="rank")`` returns a NumPy array with mean 1 (so a learning rate or a regulariser
tuned on unweighted data keeps its meaning). High scores get high weights; ``invert=True`` down-weights high
scores instead (e.g. suspected label noise found by EL2N or forgetting).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from whatmatters.core.errors import InputError
from whatmatters.core.fractions import whole
from whatmatters.curate.selection import scores_of

HOW = ("rank", "linear", "softmax")


def sample_weights(
    importance: Any, *, how: str = "rank", invert: bool = False, temperature: float = 1.0, floor: float = 0.1
) -> np.ndarray:
    """One weight per example (float64, mean 1) from an example ``Importance`` or a 1-D array of scores.

    ``how``: ``"rank"`` (weights linear in the rank, from ``floor`` to 1), ``"linear"`` (min-max scaled
    scores, from ``floor`` to 1) or ``"softmax"`` (``exp(z / temperature)`` of z-scored scores).
    """
    scores = scores_of(importance)
    if scores is None:
        raise InputError("sample_weights needs scores: an example Importance or a 1-D array")
    scores = -scores if invert else scores
    if not 0 <= floor < 1:
        raise InputError(f"floor must be in [0, 1) (the weight of the lowest score before rescaling), got {floor!r}")
    if how == "rank":
        ranks = scores.argsort().argsort().double()
        unit = ranks / max(len(scores) - 1, 1)
    elif how == "linear":
        span = scores.max() - scores.min()
        unit = (scores - scores.min()) / span if span > 0 else torch.ones_like(scores)
    elif how == "softmax":
        if not temperature > 0:
            raise InputError(f"temperature must be > 0, got {temperature!r}")
        sd = scores.std() if len(scores) > 1 else torch.tensor(1.0)
        z = (scores - scores.mean()) / (sd if sd > 0 else 1.0)
        weights = torch.softmax(z / temperature, 0)
        return (weights / weights.mean()).numpy()
    else:
        raise InputError(f"unknown weighting {how!r}; choose one of {', '.join(HOW)}")
    weights = floor + (1 - floor) * unit
    return (weights / weights.mean()).numpy()


def weighted_sampler(
    importance: Any,
    num_samples: int | None = None,
    *,
    replacement: bool = True,
    seed: int = 0,
    **weighting: Any,
) -> torch.utils.data.WeightedRandomSampler:
    """A ``torch.utils.data.WeightedRandomSampler`` drawing examples in proportion to :func:`sample_weights`.

    ``num_samples`` defaults to the number of examples (one epoch); ``weighting`` goes to ``sample_weights``.
    """
    weights = torch.from_numpy(sample_weights(importance, **weighting))
    count = len(weights) if num_samples is None else whole(num_samples, "num_samples")
    if not replacement and count > int((weights > 0).sum()):
        raise InputError(f"num_samples={count} without replacement needs that many examples of nonzero weight")
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(weights, count, replacement=replacement, generator=generator)
