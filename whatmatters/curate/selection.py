"""Which examples to keep: selection strategies over any example ``Importance`` (and embeddings).

``select(importance, keep=0.5, strategy="ccs")`` returns a :class:`Selection` (the kept indices, sorted, and a
report). Strategies are entries of one registry (``strategies()`` lists them, ``describe_strategy`` documents
them): ``top`` (highest scores), ``random``, ``ccs`` (coverage-centric coreset selection, Zheng et al. 2023),
``k_center`` (greedy k-center on embeddings), ``facility_location`` (stochastic greedy) and
``cluster_sample`` (k-means, then a share of every cluster). ``keep`` is a share in (0, 1] or a count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from whatmatters.core.errors import InputError
from whatmatters.core.fractions import kept_share, removed_share, whole
from whatmatters.core.importance import Importance
from whatmatters.core.registry import Registry, keyword_defaults


class Selection(NamedTuple):
    """The kept example indices (ascending) and a report of how they were chosen."""

    indices: torch.Tensor
    report: dict[str, Any]


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[..., torch.Tensor]
    needs: tuple[str, ...]  # "scores" and / or "embeddings"
    units: tuple[str, ...] = ("example",)
    aliases: tuple[str, ...] = ()

    @property
    def defaults(self) -> dict[str, Any]:
        return keyword_defaults(self.fn)

    @property
    def header(self) -> str:
        return f"{self.name} (selection strategy, needs {', '.join(self.needs) or 'nothing'})"


STRATEGIES = Registry("selection strategy", listing="whatmatters.curate.strategies() lists them", show_names=True)


def strategy(name: str, *, needs: tuple[str, ...], aliases: tuple[str, ...] = ()):
    """Register ``fn(k, scores, embeddings, generator, **params) -> indices`` as a selection strategy."""

    def register(fn):
        STRATEGIES.add(Strategy(name, fn, needs, aliases=aliases))
        return fn

    return register


def strategies() -> list[str]:
    return STRATEGIES.names()


def describe_strategy(name: str) -> str:
    return STRATEGIES.describe(name)


def scores_of(importance: Any) -> torch.Tensor | None:
    if importance is None:
        return None
    values = importance.values if isinstance(importance, Importance) else importance
    values = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values).detach()
    if isinstance(importance, Importance) and importance.per_sample:
        values = values.reshape(len(values), -1).mean(1)  # one score per example
    values = values.reshape(-1).double().cpu()
    if not len(values):
        raise InputError("the scores are empty; score at least one example")
    if not bool(values.isfinite().all()):
        raise InputError(
            f"the scores contain {int((~values.isfinite()).sum())} NaN or infinite value(s); "
            "drop or fill those examples first"
        )
    return values


def _embeddings(embeddings: Any, n: int | None) -> torch.Tensor | None:
    if embeddings is None:
        return None
    from whatmatters.core.adapters import to_tensor

    x, _ = to_tensor(embeddings, "embeddings")
    x = x.reshape(len(x), -1)
    x = x if x.is_floating_point() else x.double()
    if n is not None and len(x) != n:
        raise InputError(f"embeddings have {len(x)} rows but there are {n} scores; give one row per example")
    return x


def _count(keep: Any, n: int) -> int:
    if isinstance(keep, (int, np.integer)) and not isinstance(keep, bool):
        k = whole(keep, "keep", meaning="the number of examples kept")
        if k > n:
            raise InputError(f"keep={k} is larger than the pool of {n} examples; keep at most {n}")
        return k
    return max(1, round(kept_share(keep, of="examples") * n))


def select(
    importance: Any = None,
    keep: float | int = 0.5,
    *,
    strategy: str = "top",
    embeddings: Any = None,
    seed: int = 0,
    **params: Any,
) -> Selection:
    """Keep ``keep`` examples (a share in (0, 1] or a count) by ``strategy``.

    ``importance`` is an example :class:`Importance` (or any 1-D array of scores, high = important / hard);
    ``embeddings`` ``(n, d)`` are needed by the diversity strategies. ``params`` are the strategy's own
    (``describe_strategy(name)``).
    """
    from whatmatters.core.task import check_params

    entry = STRATEGIES.get(strategy)
    check_params(entry.name, params, entry.defaults)
    scores = scores_of(importance)
    x = _embeddings(embeddings, None if scores is None else len(scores))
    for need, given in (("scores", scores), ("embeddings", x)):
        if need in entry.needs and given is None:
            raise InputError(
                f"strategy {entry.name!r} needs {need}: pass {'importance' if need == 'scores' else need}="
            )
    n = len(scores) if scores is not None else (len(x) if x is not None else 0)
    if n == 0:
        raise InputError("nothing to select from: pass an example importance or embeddings")
    k = _count(keep, n)
    gen = torch.Generator().manual_seed(seed)
    indices = entry.fn(k, scores, x, gen, **params)
    indices = torch.as_tensor(indices, dtype=torch.long).cpu().sort().values
    report = {"strategy": entry.name, "kept": k, "of": n, "seed": seed, **entry.defaults, **params}
    return Selection(indices, report)


@strategy("top", needs=("scores",))
def top(k: int, scores: torch.Tensor, x, gen, *, largest: bool = True) -> torch.Tensor:
    """The ``k`` highest scores (``largest=False``: the lowest, e.g. the easiest examples)."""
    return scores.topk(k, largest=largest).indices


@strategy("random", needs=())
def random(k: int, scores, x, gen) -> torch.Tensor:
    """``k`` examples uniformly at random (the baseline every strategy should beat)."""
    n = len(scores) if scores is not None else len(x)
    return torch.randperm(n, generator=gen)[:k]


@strategy("ccs", needs=("scores",))
def ccs(k: int, scores: torch.Tensor, x, gen, *, hard_cutoff: float = 0.1, bins: int = 50) -> torch.Tensor:
    """Coverage-centric coreset selection (Zheng et al. 2023): drop the hardest ``hard_cutoff`` share, then
    sample evenly over ``bins`` equal-width score bins, filling the budget from the sparsest bins first."""
    cutoff = removed_share(hard_cutoff, "hard_cutoff", of="hardest examples")
    bins = whole(bins, "bins")
    n = len(scores)
    pool = scores.argsort()[: max(k, n - round(cutoff * n))]  # never prune below the budget
    values = scores[pool]
    edges = torch.linspace(float(values.min()), float(values.max()), bins + 1, dtype=values.dtype)
    member = torch.bucketize(values, edges[1:-1], right=True)
    sizes = torch.bincount(member, minlength=bins)
    budget, chosen = k, []
    for rank, b in enumerate(sizes.argsort().tolist()):  # sparsest bins first: they get all they have
        take = min(int(sizes[b]), budget // (bins - rank))
        in_bin = pool[member == b]
        chosen.append(in_bin[torch.randperm(len(in_bin), generator=gen)[:take]])
        budget -= take
    return torch.cat(chosen)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@strategy("k_center", needs=("embeddings",))
def k_center(k: int, scores, x: torch.Tensor, gen, *, chunk: int = 65536) -> torch.Tensor:
    """Greedy k-center (Sener & Savarese 2018): repeatedly add the example farthest from those chosen.

    Distances to the newest centre are one vectorized update per pick over ``chunk`` rows at a time.
    """
    n = len(x)
    first = int(torch.randint(n, (1,), generator=gen)) if scores is None else int(scores.argmax())
    chosen = torch.empty(k, dtype=torch.long)
    nearest = torch.full((n,), float("inf"), dtype=x.dtype)
    chosen[0] = first
    for i in range(k):
        centre = x[chosen[i]]
        for s in range(0, n, chunk):
            d = (x[s : s + chunk] - centre).square().sum(1)
            torch.minimum(nearest[s : s + chunk], d, out=nearest[s : s + chunk])
        if i + 1 < k:
            chosen[i + 1] = nearest.argmax()
    return chosen


@strategy("facility_location", needs=("embeddings",))
def facility_location(k: int, scores, x: torch.Tensor, gen, *, epsilon: float = 0.01, chunk: int = 4096):
    """Facility location: greedily maximise ``sum_i max_{j in S} sim(i, j)`` with cosine similarity in [0, 1].

    Stochastic greedy (Mirzasoleiman et al. 2015): each pick evaluates ``n / k * log(1 / epsilon)`` random
    candidates, so the cost is about ``n * log(1/epsilon)`` similarity columns in all, without an n x n matrix.
    """
    n = len(x)
    z = _normalized(x)
    covered = torch.zeros(n, dtype=x.dtype)
    free = torch.ones(n, dtype=torch.bool)
    sample = max(1, min(n, int(np.ceil(n / k * np.log(1 / epsilon)))))
    chosen = []
    for _ in range(k):
        pool = free.nonzero().squeeze(1)
        cand = pool[torch.randperm(len(pool), generator=gen)[:sample]]
        gains = torch.cat([((z @ z[c].T + 1) / 2 - covered[:, None]).clamp_min(0).sum(0) for c in cand.split(chunk)])
        best = int(cand[gains.argmax()])
        chosen.append(best)
        free[best] = False
        covered = torch.maximum(covered, (z @ z[best] + 1) / 2)
    return torch.tensor(chosen)


def kmeans(x: torch.Tensor, clusters: int, gen: torch.Generator, iterations: int = 20) -> torch.Tensor:
    """Cluster labels from Lloyd's k-means with k-means++ seeding (vectorized distances)."""
    n = len(x)
    centres = x[torch.randint(n, (1,), generator=gen)]
    for _ in range(1, clusters):
        d = torch.cdist(x, centres).min(1).values.square()
        centres = torch.cat([centres, x[torch.multinomial(d + 1e-12, 1, generator=gen)]])
    for _ in range(iterations):
        labels = torch.cdist(x, centres).argmin(1)
        counts = torch.bincount(labels, minlength=clusters).clamp_min(1).unsqueeze(1).to(x.dtype)
        centres = torch.zeros_like(centres).index_add_(0, labels, x) / counts
    return torch.cdist(x, centres).argmin(1)


@strategy("cluster_sample", needs=("embeddings",))
def cluster_sample(k: int, scores, x: torch.Tensor, gen, *, clusters: int = 0) -> torch.Tensor:
    """k-means into ``clusters`` (default ``sqrt(k)``, at most 100), then each cluster's share of the budget
    (proportional to its size, largest remainders): its highest-scoring examples, or random ones without scores."""
    clusters = whole(clusters, "clusters", minimum=0) or min(100, max(2, round(k**0.5)))
    labels = kmeans(x, min(clusters, len(x)), gen)
    sizes = torch.bincount(labels).double()
    quota = sizes / sizes.sum() * k
    budget = quota.floor().long()
    budget[(quota - budget).argsort(descending=True)[: k - int(budget.sum())]] += 1
    key = scores if scores is not None else torch.rand(len(x), generator=gen, dtype=torch.float64)
    # rank of every example inside its cluster by key (best first), then keep those under the cluster's budget
    order = torch.argsort(key, descending=True)
    order = order[torch.argsort(labels[order], stable=True)]
    starts = torch.cumsum(torch.bincount(labels), 0) - torch.bincount(labels)
    rank_in_cluster = torch.arange(len(x)) - starts[labels[order]]
    return order[rank_in_cluster < budget[labels[order]]]
