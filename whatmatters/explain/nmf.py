"""Non-negative matrix factorization in torch, on the data's device: ``A ~ U @ H`` with ``U, H >= 0``.

Multiplicative updates (Lee & Seung 2001) for the Frobenius loss, the ``solver="mu"`` of scikit-learn's ``NMF``;
:func:`nmf` fits both factors, :func:`project` solves for ``U`` with ``H`` fixed (non-negative least squares,
one independent problem per row, all rows at once: CRAFT's concept coefficients of every crop or pixel).
"""

from __future__ import annotations

import torch

EPS = 1e-12


def _error(a: torch.Tensor, u: torch.Tensor, h: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - u @ h))


def project(
    a: torch.Tensor, h: torch.Tensor, *, iters: int = 500, tol: float = 0.0, u: torch.Tensor | None = None
) -> torch.Tensor:
    """``U >= 0`` minimizing ``||A - U H||`` for fixed ``H`` (rows of ``A``: ``(m, C)``, ``H``: ``(k, C)``).

    By default all ``iters`` run, so each row's result is the same whatever rows it is projected with; a
    positive ``tol`` stops early when the total error falls less than that (relative) over 20 iterations."""
    hht, aht = h @ h.T, a @ h.T
    if u is None:  # a positive start: the least-squares solution clipped, plus a small floor
        u = (aht @ torch.linalg.pinv(hht)).clamp_min(0) + 1e-3 * aht.mean().clamp_min(EPS)
    previous = None
    for i in range(iters):
        u = u * aht / (u @ hht).clamp_min(EPS)
        if tol > 0 and i % 20 == 19:
            err = _error(a, u, h)
            if previous is not None and previous - err <= tol * max(previous, EPS):
                break
            previous = err
    return u


def nmf(
    a: torch.Tensor,
    k: int,
    *,
    iters: int = 500,
    tol: float = 1e-5,
    generator: torch.Generator | None = None,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, H)``, ``(m, k)`` and ``(k, C)``, non-negative with ``A ~ U @ H``; random start scaled like
    scikit-learn's ``init="random"`` (``sqrt(mean(A) / k)``), stopped when the error falls less than ``tol``
    (relative) over 10 iterations (``tol=0``: all ``iters``); ``start`` gives the starting ``(U, H)`` instead."""
    if start is None:
        scale = max(float(a.mean()) / k, EPS) ** 0.5
        start = (torch.rand(a.shape[0], k, generator=generator), torch.rand(k, a.shape[1], generator=generator))
        start = (scale * start[0], scale * start[1])
    u, h = (t.to(a.device, a.dtype) for t in start)
    previous = None
    for i in range(iters):
        u = u * (a @ h.T) / (u @ (h @ h.T)).clamp_min(EPS)  # U first, then H: scikit-learn's order
        h = h * (u.T @ a) / (u.T @ u @ h).clamp_min(EPS)
        if tol > 0 and i % 10 == 9:
            err = _error(a, u, h)
            if previous is not None and previous - err <= tol * max(previous, EPS):
                break
            previous = err
    return u, h
