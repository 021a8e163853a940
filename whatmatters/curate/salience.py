"""LexRank salience (Erkan & Radev 2004): which sentences or documents are central to a collection.

A document's score is its stationary probability in a random walk on the graph of cosine similarities of
embeddings (e.g. ``text.pretrained.embed``) or of TF-IDF vectors (texts given as strings), by power iteration.
"""

from __future__ import annotations

from typing import Any

import torch

from whatmatters.core.adapters import to_tensor
from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.fractions import whole
from whatmatters.core.registry import scorer
from whatmatters.curate.example_task import ExampleTask


def _vectors(data: Any) -> torch.Tensor:
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        from sklearn.feature_extraction.text import TfidfVectorizer

        try:
            tfidf = TfidfVectorizer().fit_transform(data)
        except ValueError as err:  # only stop words / empty strings
            raise InputError(f"the texts have no words to compare ({err})") from None
        return torch.from_numpy(tfidf.toarray())
    x, _ = to_tensor(data, "data")
    if x.ndim != 2 or not x.is_floating_point():
        raise InputError(f"lexrank needs texts or float embeddings of shape (n, dim), got {tuple(x.shape)}")
    return x.double()


def similarity_graph(data: Any, threshold: float | None = None) -> torch.Tensor:
    """Cosine similarities clipped at 0 (or 0/1 edges above ``threshold``: LexRank's thresholded graph)."""
    x = _vectors(data)
    z = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = (z @ z.T).clamp_min(0)
    if threshold is not None:
        if not 0 <= threshold < 1:
            raise MethodError(f"threshold must be in [0, 1) (a cosine similarity) or None, got {threshold!r}")
        sim = (sim > threshold).to(sim.dtype)
    sim.fill_diagonal_(1.0)  # every document is similar to itself (as in the paper's matrix)
    return sim


@scorer("lexrank", verb="curate", units="example", family="salience", needs="data", per_sample=False)
def lexrank(
    task: ExampleTask,
    *,
    threshold: float | None = None,
    damping: float = 0.85,
    tol: float = 1e-10,
    max_iter: int = 1000,
) -> torch.Tensor:
    """LexRank: centrality of each document in the cosine-similarity graph of its embedding or TF-IDF vector.

    ``threshold=None`` is continuous LexRank (edge weights = similarities); a number keeps 0/1 edges above it.
    Power iteration of ``p = (1 - damping) / n + damping * M^T p`` with ``M`` the row-normalised graph; the
    scores sum to 1.
    """
    if not 0 < damping <= 1:
        raise MethodError(f"damping must be in (0, 1], got {damping!r}")
    sim = similarity_graph(task.data, threshold)
    walk = sim / sim.sum(1, keepdim=True)
    n = len(sim)
    p = torch.full((n,), 1.0 / n, dtype=sim.dtype)
    for _ in range(whole(max_iter, "max_iter")):
        nxt = (1 - damping) / n + damping * (walk.T @ p)
        if float((nxt - p).abs().sum()) < tol:
            return nxt
        p = nxt
    return p
