"""GAIS-style graph-based instance selection for tabular data: attention over a k-nearest-neighbour graph.

The idea follows GAIS (graph attention-based instance selection, Rustamov et al. 2024): build a kNN graph over
the rows, let every row attend to its neighbours, and judge a row by the attention it exchanges with rows of its
own class versus other classes. GAIS learns the attention with a graph attention network; here the attention
is parameter-free (a GAT-like softmax over negative squared distances, with a per-row bandwidth), so there is
nothing to train::

    a_ij = softmax_{j in N(i)}(-d_ij^2 / tau_i),   tau_i = mean_{j in N(i)} d_ij^2
    out_i = sum_j a_ij [y_j = y_i]                                   (i's attention to its own class)
    in_j  = sum_{i: j in N(i)} a_ij [y_i = y_j] / sum_{i: j in N(i)} a_ij   (j's received attention, same class)
    score_i = 1 - (out_i + in_i) / 2            (in_i = out_i for a row no one attends to)

High scores mark borderline or mislabelled rows (the curate convention: high = hard / harmful); keep the most
consistent rows with ``curate.select(imp, keep, strategy="top", largest=False)``. ``extra`` holds the
attention each row receives from its own class (``representative``) and from other classes (``borderline``).

The graph is built without an ``n x n`` matrix: exact kNN in blocks of ``batch_size`` queries against blocks of
rows with a running top-k, or, for large ``n``, random-projection LSH candidates (``graph="lsh"``): each of
``tables`` hash tables orders the rows by the sign pattern of ``bits`` random projections (SimHash) and every
row's candidates are the ``window`` rows either side of it in each order; exact distances then rank the
candidates. The cost is ``n * tables * 2 * window`` distances instead of ``n^2``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.fractions import whole
from whatmatters.core.registry import scorer
from whatmatters.core.task import progress_bar
from whatmatters.curate.example_task import ExampleTask

GRAPHS = ("exact", "lsh")


class Neighbours(NamedTuple):
    """Each row's ``k`` nearest other rows ``(n, k)`` and their squared Euclidean distances ``(n, k)``."""

    indices: torch.Tensor
    distances: torch.Tensor


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    x = x.reshape(len(x), -1)
    x = x if x.is_floating_point() else x.float()
    if not bool(x.isfinite().all()):
        raise InputError("the rows hold NaN or infinite values; impute or drop them before building the graph")
    if not 1 <= k < len(x):
        raise MethodError(f"k={k} neighbours needs at least k + 1 rows (there are {len(x)}) and k >= 1")
    return x


def exact_knn(
    x: torch.Tensor, k: int, *, batch_size: int = 1024, block: int = 1 << 24, progress: bool | None = None
) -> Neighbours:
    """Exact kNN: ``batch_size`` queries at a time against blocks of about ``block`` distances, running top-k."""
    x = _rows(x, whole(k, "k"))
    n, b = len(x), whole(batch_size, "batch_size")
    reference_block = max(k + 1, whole(block, "block") // b)  # rows per block: 64 MB of float32 by default
    sq = x.square().sum(1)
    starts = range(0, n, b)
    out_idx, out_d = [], []
    for s in progress_bar(starts, len(starts), "kNN graph", progress):
        q = x[s : s + b]
        best_d = torch.full((len(q), k), float("inf"), dtype=x.dtype, device=x.device)
        best_i = torch.zeros((len(q), k), dtype=torch.long, device=x.device)
        for r in range(0, n, reference_block):
            ref = x[r : r + reference_block]
            # ||q||^2 + ||r||^2 - 2 q.r: one matrix product per block (clamped: rounding can go below 0)
            d = torch.addmm(sq[r : r + len(ref)][None, :], q, ref.T, alpha=-2).add_(sq[s : s + len(q), None])
            d.clamp_min_(0)
            own = torch.arange(s, s + len(q), device=x.device)
            inside = (own >= r) & (own < r + len(ref))
            d[inside.nonzero().squeeze(1), own[inside] - r] = float("inf")  # a row is not its own neighbour
            block_d, block_i = d.topk(min(k, d.shape[1]), dim=1, largest=False)  # then merge 2k per row
            best_d, pick = torch.cat([best_d, block_d], 1).topk(k, dim=1, largest=False)
            best_i = torch.cat([best_i, block_i + r], 1).gather(1, pick)
        out_idx.append(best_i)
        out_d.append(best_d)
    return Neighbours(torch.cat(out_idx), torch.cat(out_d))


def lsh_knn(
    x: torch.Tensor,
    k: int,
    *,
    bits: int = 16,
    tables: int = 8,
    window: int | None = None,
    batch_size: int = 4096,
    seed: int = 0,
    progress: bool | None = None,
) -> Neighbours:
    """Approximate kNN from random-projection LSH candidates (see the module docstring); ``window`` defaults to k."""
    x = _rows(x, whole(k, "k"))
    n = len(x)
    bits, tables = whole(bits, "bits"), whole(tables, "tables")
    if bits > 62:
        raise MethodError(f"bits={bits} is too many for a 64-bit hash code; use at most 62")
    window = k if window is None else whole(window, "window")
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(tables, x.shape[1], bits, generator=gen, dtype=torch.float64).to(x)
    weights = 2 ** torch.arange(bits - 1, -1, -1, device=x.device)  # the first projection is the top bit
    centred = x - x.mean(0)
    offsets = torch.cat([torch.arange(-window, 0), torch.arange(1, window + 1)]).to(x.device)
    candidates = []
    for t in range(tables):
        codes = ((centred @ planes[t]) > 0).long() @ weights
        order = codes.argsort()
        position = torch.empty_like(order)
        position[order] = torch.arange(n, device=x.device)
        candidates.append(order[(position[:, None] + offsets).clamp(0, n - 1)])
    cand = torch.cat(candidates, 1).sort(1).values
    duplicate = torch.zeros_like(cand, dtype=torch.bool)
    duplicate[:, 1:] = cand[:, 1:] == cand[:, :-1]
    duplicate |= cand == torch.arange(n, device=x.device)[:, None]
    b = whole(batch_size, "batch_size")
    starts = range(0, n, b)
    out_idx, out_d = [], []
    for s in progress_bar(starts, len(starts), "LSH kNN graph", progress):
        c = cand[s : s + b]
        d = (x[s : s + b, None, :] - x[c]).square().sum(-1).masked_fill(duplicate[s : s + b], float("inf"))
        best_d, pick = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        out_idx.append(c.gather(1, pick))
        out_d.append(best_d)
    idx, dist = torch.cat(out_idx), torch.cat(out_d)
    if bool(dist.isinf().any()):
        raise MethodError(f"LSH found fewer than k={k} distinct candidates for some rows; raise window or tables")
    return Neighbours(idx, dist)


def attention(distances: torch.Tensor) -> torch.Tensor:
    """Each row's attention over its neighbours: ``softmax(-d^2 / mean(d^2))`` per row (rows sum to 1)."""
    tau = distances.mean(1, keepdim=True).clamp_min(torch.finfo(distances.dtype).tiny)
    return torch.softmax(-distances / tau, dim=1)


def consistency(graph: Neighbours, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The attention exchanged with same-class and other-class neighbours, and the GAIS-style score."""
    a = attention(graph.distances).double()
    y = y.to(graph.indices.device)
    same = (y[graph.indices] == y[:, None]).to(a.dtype)
    out = (a * same).sum(1)
    n, flat = len(y), graph.indices.reshape(-1)
    received_same = torch.zeros(n, dtype=a.dtype, device=a.device).index_add_(0, flat, (a * same).reshape(-1))
    received = torch.zeros(n, dtype=a.dtype, device=a.device).index_add_(0, flat, a.reshape(-1))
    incoming = torch.where(received > 0, received_same / received.clamp_min(1e-300), out)
    return {
        "score": 1 - (out + incoming) / 2,
        "representative": received_same,
        "borderline": received - received_same,
    }


def _standardized(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(len(x), -1)
    x = x if x.is_floating_point() else x.float()
    sd = x.std(0, keepdim=True) if len(x) > 1 else torch.ones_like(x[:1])
    return (x - x.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))


@scorer("gais", verb="curate", units="example", family="graph", needs="labels", per_sample=False)
def gais(
    task: ExampleTask,
    *,
    k: int = 10,
    graph: str = "exact",
    standardize: bool = True,
    bits: int = 16,
    tables: int = 8,
    window: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GAIS-style label consistency of each row over a kNN graph (high = borderline or mislabelled).

    ``k`` neighbours per row; ``graph="exact"`` (blocked exact kNN) or ``"lsh"`` (random-projection LSH
    candidates: ``bits`` per code, ``tables`` orders, ``window`` rows either side, 0 = ``k``); ``standardize``
    z-scores the columns first. Needs no model: ``curate.score(data=X, y=y, method="gais")``.
    """
    if graph not in GRAPHS:
        raise MethodError(f"unknown graph {graph!r}; choose one of {', '.join(GRAPHS)}")
    x = _standardized(task.inputs) if standardize else task.inputs
    k = whole(k, "k")
    if graph == "exact":
        nbrs = exact_knn(x, k, batch_size=task.batch_size * 4, progress=task.progress)
    else:
        nbrs = lsh_knn(
            x, k, bits=bits, tables=tables, window=whole(window, "window", minimum=0) or None,
            seed=task.seed, progress=task.progress,
        )  # fmt: skip
    found = consistency(nbrs, task.y)
    return found.pop("score"), found
