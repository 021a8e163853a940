"""Pairwise interaction strength of a model's features: normalized superset importance of each pair.

For features ``j`` and ``k``, let ``x'`` be another row of the data (a random permutation of the rows) and
``x_{S}`` the row ``x`` with the features in ``S`` taken from ``x'``. The second-order difference

    D_jk(x, x') = f(x_jk) - f(x_j) - f(x_k) + f(x)

is exactly 0 for every ``x, x'`` when ``f`` is additive in ``j`` and ``k`` (``f = g(x_j, rest) + h(x_k, rest)``),
and ``E[D_jk²] / 4`` is Liu & Owen's (2006) superset importance of ``{j, k}``: the output variance carried by
all ANOVA terms that contain both features. We report it divided by the output variance, so it is the
share of the model's output variance due to ``j`` and ``k`` acting together (0: no interaction; 1 for
``f = x_j * x_k`` with independent centred features). Unlike Friedman's H-statistic, it needs one model
call per row and feature pair (not ``n²`` partial-dependence calls), and its denominator is the total
variance, so a weak pair of strong features does not look like a strong interaction. Outputs with
several columns (class probabilities, logits) are summed over columns.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from whatmatters.core.adapters import row_slices, to_tensor, wrap
from whatmatters.core.errors import InputError
from whatmatters.core.task import progress_bar

# Input values per model call.
_CHUNK_ELEMENTS = 4_000_000


def pair_interactions(
    model: Any,
    data: Any,
    features: list[int] | None = None,
    *,
    seed: int = 0,
    progress: bool | None = None,
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Interaction strength of every pair of ``features`` (default: all columns) of ``model`` on ``data``.

    Returns ``(pairs, strength)``: the ``(j, k)`` index pairs (``j < k``) and one value per pair, the
    normalized superset importance described in the module docstring. All rows of all perturbed copies
    go to the model in a few batched calls; ``seed`` draws the row permutation.
    """
    x, _ = to_tensor(data, "data")
    if x.ndim != 2 or len(x) < 2:
        raise InputError(f"interactions need a 2-D table of at least 2 rows, got shape {tuple(x.shape)}")
    n, d = x.shape
    features = list(range(d)) if features is None else [int(j) for j in features]
    pairs = list(itertools.combinations(sorted(set(features)), 2))
    if not pairs:
        return [], torch.empty(0, dtype=torch.float64)
    other = x[torch.from_numpy(np.random.default_rng(seed).permutation(n))]
    singles = sorted({j for p in pairs for j in p})
    sets = [()] + [(j,) for j in singles] + pairs  # copy 0: the data itself
    outputs = _outputs(wrap(model), x, other, sets, progress)  # (copies, n, k)
    base, single = outputs[0], dict(zip(singles, outputs[1 : 1 + len(singles)]))
    both = outputs[1 + len(singles) :]
    first = torch.stack([single[j] for j, _ in pairs])
    second = torch.stack([single[k] for _, k in pairs])
    difference = both - first - second + base  # (pairs, n, k)
    variance = (base - base.mean(0)).pow(2).sum(-1).mean()
    strength = difference.pow(2).sum(-1).mean(-1) / 4 / variance.clamp_min(1e-300)
    return pairs, torch.where(variance > 0, strength, torch.zeros_like(strength))


def _outputs(
    model: Any, x: torch.Tensor, other: torch.Tensor, sets: list[tuple[int, ...]], progress: bool | None
) -> torch.Tensor:
    """Model outputs ``(len(sets), n, k)`` for copies of ``x`` whose columns in each set come from ``other``."""
    n, d = x.shape
    per_call = max(1, _CHUNK_ELEMENTS // (n * d))
    chunks = row_slices(len(sets), per_call)
    outs = []
    replaced = torch.zeros(len(sets), d, dtype=torch.bool)
    for i, cols in enumerate(sets):
        replaced[i, list(cols)] = True
    for s in progress_bar(chunks, len(chunks), "interactions", progress):
        block = torch.where(replaced[s, None, :], other, x)  # (copies, n, d)
        out = model.predict(block.reshape(-1, d))
        outs.append(out.to(torch.float64).reshape(s.stop - s.start, n, -1).cpu())
    return torch.cat(outs)
