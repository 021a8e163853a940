"""A small Kolmogorov-Arnold network (KAN) and its training, for the ``kan_*`` feature scorers.

Architecture (Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks", arXiv:2404.19756, as in pykan):
every edge ``i -> o`` of a layer carries a learnable univariate function

    phi_oi(x) = w_oi * silu(x) + sum_c c_oic * B_c(x)

where ``B_c`` are the B-splines of degree ``order`` (3: cubic, pykan's ``k``) on a uniform
grid of ``grid_size`` intervals over the range of the layer's input ``i``, extended by
``order`` knots on each side as pykan does. A node sums its incoming edges (plus a bias, our
addition). Grids of hidden layers follow their inputs: a few times early in training they are
re-laid over the current activation range and the coefficients refitted by least squares
(pykan's ``update_grid``). The regularizer is pykan's L1 term on the mean absolute edge
activations (without its entropy term).

Written for whatmatters (no pykan dependency: pykan pulls in sympy and writes checkpoints to disk).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import pairwise
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core.errors import InputError

Objective = Literal["classification", "regression"]


def uniform_knots(lo: torch.Tensor, hi: torch.Tensor, grid_size: int, order: int) -> torch.Tensor:
    """Knots ``(d, grid_size + 2 * order + 1)``: ``grid_size`` equal intervals over ``[lo, hi]`` per
    input, extended by ``order`` intervals on each side. A zero-width range becomes ``[lo - 1, hi + 1]``."""
    width = hi - lo
    flat = width <= 1e-8 * (1 + lo.abs())
    lo = torch.where(flat, lo - 1, lo)
    hi = torch.where(flat, hi + 1, hi)
    h = (hi - lo) / grid_size
    steps = torch.arange(-order, grid_size + order + 1, dtype=lo.dtype, device=lo.device)
    return lo.unsqueeze(1) + steps.unsqueeze(0) * h.unsqueeze(1)


@lru_cache(maxsize=8)
def _local_matrix(order: int) -> np.ndarray:
    """Polynomial coefficients of the ``order + 1`` uniform B-splines that are non-zero on one interval.

    Column ``r`` holds the coefficients (ascending powers of the position ``f`` in ``[0, 1)`` within
    the interval) of the basis function that starts ``order - r`` intervals before it; from the
    Cox-de Boor recursion ``b_q[r] = ((f + q - r) b_{q-1}[r-1] + (r + 1 - f) b_{q-1}[r]) / q``.
    """
    poly = np.polynomial.polynomial
    local = [np.array([1.0])]
    for q in range(1, order + 1):
        nxt = []
        for r in range(q + 1):
            acc = np.zeros(1)
            if r >= 1:
                acc = poly.polyadd(acc, poly.polymul([q - r, 1.0], local[r - 1]))
            if r <= q - 1:
                acc = poly.polyadd(acc, poly.polymul([r + 1, -1.0], local[r]))
            nxt.append(acc / q)
        local = nxt
    matrix = np.zeros((order + 1, order + 1))
    for r, coeffs in enumerate(local):
        matrix[: len(coeffs), r] = coeffs
    return matrix


def bspline_basis(x: torch.Tensor, knots: torch.Tensor, order: int) -> torch.Tensor:
    """B-spline basis values ``(n, d, n_knots - order - 1)`` of ``x`` ``(n, d)`` on uniform knots ``(d, n_knots)``.

    Each input has its own equally spaced knots. Only ``order + 1`` bases are non-zero at a point:
    their values are a fixed polynomial matrix applied to the powers of the point's position in
    its interval (a few tensor ops instead of the ``order`` dense levels of Cox-de Boor). Points
    outside the knots get all-zero bases. Differentiable in ``x``.
    """
    n_int = knots.shape[1] - 1
    u = (x - knots[:, 0]) / (knots[:, 1] - knots[:, 0])
    j = u.detach().floor()
    f = u - j
    powers = [torch.ones_like(f)]
    for _ in range(order):
        powers.append(powers[-1] * f)
    local = torch.stack(powers, -1) @ torch.as_tensor(_local_matrix(order), dtype=x.dtype, device=x.device)
    local = torch.where(((j >= 0) & (j < n_int)).unsqueeze(-1), local, 0)
    idx = j.clamp(0, n_int - 1).long().unsqueeze(-1) + torch.arange(order + 1, device=x.device)
    dense = torch.zeros(*x.shape, n_int + order, dtype=x.dtype, device=x.device).scatter_add(-1, idx, local)
    return dense[..., order:n_int]


class KANLayer(nn.Module):
    """One KAN layer ``in_dim -> out_dim``: a SiLU base term plus a B-spline on every edge."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        knots: torch.Tensor,
        order: int,
        generator: torch.Generator,
        noise_scale: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.order = in_dim, out_dim, order
        self.register_buffer("knots", knots.clone())
        n_coef = knots.shape[1] - order - 1
        dtype, device = knots.dtype, knots.device
        bound = 1 / math.sqrt(in_dim)
        base = (torch.rand(out_dim, in_dim, generator=generator, dtype=dtype) * 2 - 1) * bound
        coef = torch.randn(out_dim, in_dim, n_coef, generator=generator, dtype=dtype) * noise_scale * bound
        self.base_weight = nn.Parameter(base.to(device))
        self.coef = nn.Parameter(coef.to(device))
        self.bias = nn.Parameter(torch.zeros(out_dim, dtype=dtype, device=device))

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        return bspline_basis(x, self.knots, self.order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spline = self.basis(x).flatten(1) @ self.coef.flatten(1).T
        return F.silu(x) @ self.base_weight.T + spline + self.bias

    def edges(self, x: torch.Tensor) -> torch.Tensor:
        """Every edge's activation ``phi_oi(x_i)``, shape ``(n, out_dim, in_dim)``; summed (plus bias): the output."""
        spline = torch.einsum("nic,oic->noi", self.basis(x), self.coef)
        return F.silu(x).unsqueeze(1) * self.base_weight + spline

    def forward_penalized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output and pykan's L1 term of this layer (mean |phi_oi| over the batch, summed over edges)."""
        phi = self.edges(x)
        return phi.sum(-1) + self.bias, phi.abs().mean(0).sum()

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, grid_size: int) -> None:
        """Lay the grid over the range of ``x`` and refit the coefficients so the splines keep their values on ``x``."""
        old = torch.einsum("nic,oic->ino", self.basis(x), self.coef)  # (in, n, out)
        self.knots.copy_(uniform_knots(x.amin(0), x.amax(0), grid_size, self.order))
        design = self.basis(x).transpose(0, 1)  # (in, n, n_coef)
        ridge = 1e-6 * torch.eye(design.shape[-1], dtype=x.dtype, device=x.device)
        gram = design.transpose(1, 2) @ design + ridge
        coef = torch.linalg.solve(gram, design.transpose(1, 2) @ old)  # (in, n_coef, out)
        self.coef.copy_(coef.permute(2, 0, 1))


class KAN(nn.Module):
    """A stack of :class:`KANLayer`; ``widths`` like ``[d, hidden, n_outputs]``."""

    def __init__(self, widths: list[int], x: torch.Tensor, grid_size: int, order: int, generator: torch.Generator):
        super().__init__()
        self.widths, self.grid_size, self.order = list(widths), grid_size, order
        layers = []
        h = x
        for i, (a, b) in enumerate(pairwise(widths)):
            knots = uniform_knots(h.amin(0), h.amax(0), grid_size, order)
            layers.append(KANLayer(a, b, knots, order, generator))
            if i < len(widths) - 2:
                with torch.no_grad():
                    h = layers[-1](h)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The network after its first layer, applied to first-layer outputs ``h`` ``(m, widths[1])``."""
        for layer in self.layers[1:]:
            h = layer(h)
        return h

    @torch.no_grad()
    def update_hidden_grids(self, x: torch.Tensor) -> None:
        """Re-lay the grids of the layers after the first over their current input ranges."""
        h = self.layers[0](x)
        for layer in self.layers[1:]:
            layer.update_grid(h, self.grid_size)
            h = layer(h)

    def forward_penalized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output and pykan's L1 regularizer: the mean |phi_oi| over the batch, summed over all edges."""
        total = x.new_zeros(())
        for layer in self.layers:
            x, penalty = layer.forward_penalized(x)
            total = total + penalty
        return x, total


@dataclass
class FittedKAN:
    """A KAN trained on standardized inputs, with everything needed to score features with it.

    ``classes`` holds the original class labels (classification); regression targets are
    standardized with ``y_mean`` / ``y_scale`` for training. ``train_idx`` / ``val_idx`` index the
    rows used for fitting and for early stopping (and knock-out scoring).
    """

    net: KAN
    objective: Objective
    x_mean: torch.Tensor
    x_scale: torch.Tensor
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    classes: torch.Tensor | None = None
    y_mean: float = 0.0
    y_scale: float = 1.0
    history: list[dict[str, float]] = field(default_factory=list)
    params: dict[str, object] = field(default_factory=dict)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.x_mean.device, self.x_mean.dtype)
        return (x - self.x_mean) / self.x_scale

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Labels as the network sees them: class indices, or standardized targets ``(n, 1)``."""
        y = y.to(self.x_mean.device)
        if self.objective == "classification":
            classes = self.classes.to(y.device)
            idx = torch.searchsorted(classes, y.to(classes.dtype).contiguous())
            idx = idx.clamp_max(len(classes) - 1)
            if not bool((classes[idx] == y.to(classes.dtype)).all()):
                raise InputError("y contains class labels the KAN was not trained on")
            return idx
        return ((y.to(self.x_mean.dtype) - self.y_mean) / self.y_scale).reshape(-1, 1)

    def losses(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample training loss: cross-entropy (classification) or squared error (standardized regression)."""
        if self.objective == "classification":
            return F.cross_entropy(out, target, reduction="none")
        return (out - target).pow(2).squeeze(-1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(n, k)``, or regression predictions ``(n, 1)`` in the units of ``y``."""
        out = self.net(self.standardize(x))
        if self.objective == "classification":
            return out.softmax(1)
        return out * self.y_scale + self.y_mean

    def score(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy (classification) or R² (regression) on ``(x, y)``."""
        pred = self.predict(x)
        if self.objective == "classification":
            return float((self.classes.to(pred.device)[pred.argmax(1)] == y.to(pred.device)).double().mean())
        y = y.to(pred.dtype).reshape(-1, 1)
        return float(1 - (pred - y).pow(2).sum() / (y - y.mean()).pow(2).sum().clamp_min(1e-12))


@contextmanager
def few_threads(work: int) -> Iterator[None]:
    """One intra-op CPU thread for the small tensors of a tabular KAN (restored after).

    The tensors of a tabular KAN are small; splitting each op over threads costs more than it
    saves, many times more on a shared machine. ``work`` ~ elements of the widest activation.
    """
    before = torch.get_num_threads()
    if work > 2_000_000 or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def infer_objective(y: torch.Tensor, objective: str) -> Objective:
    """``"classification"`` for integer-valued labels with at most 20 distinct values, else ``"regression"``."""
    if objective in ("classification", "regression"):
        return objective  # type: ignore[return-value]
    if objective != "auto":
        raise InputError(f"objective must be 'auto', 'classification' or 'regression', got {objective!r}")
    if y.dtype == torch.bool:
        return "classification"
    integral = not y.is_floating_point() or bool((y == y.round()).all())
    return "classification" if integral and len(torch.unique(y)) <= 20 else "regression"


def _split(y: torch.Tensor | None, n: int, val_fraction: float, seed: int, stratify: bool):
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if n_val == 0 or n - n_val < 2:
        idx = torch.arange(n)
        return idx, idx
    from sklearn.model_selection import train_test_split

    labels = y.cpu().numpy() if stratify and y is not None else None
    if labels is not None:
        _, counts = torch.unique(y, return_counts=True)
        if int(counts.min()) < 2 or n_val < len(counts) or n - n_val < len(counts):
            labels = None
    train, val = train_test_split(range(n), test_size=n_val, random_state=seed, stratify=labels)
    return torch.as_tensor(sorted(train)), torch.as_tensor(sorted(val))


def fit_kan(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    objective: str = "auto",
    hidden: int | list[int] = 8,
    grid_size: int = 5,
    order: int = 3,
    steps: int = 200,
    lr: float = 1e-2,
    penalty: float = 1e-2,
    val_fraction: float = 0.2,
    batch_size: int = 4096,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> FittedKAN:
    """Train a KAN ``[d, *hidden, n_outputs]`` on ``(x, y)`` with Adam, seeded.

    Inputs are standardized (training rows' mean and standard deviation). Classification uses
    cross-entropy over one logit per class, regression the squared error on the standardized
    target. ``val_fraction`` of the rows (stratified by class) are held out; the weights with the
    lowest validation loss (checked every 10 steps) are kept. ``penalty`` weighs pykan's L1
    regularizer on edge activations. Full-batch steps when ``n <= batch_size``, else mini-batches.
    """
    if x.ndim != 2:
        raise InputError(f"a KAN needs tabular data of shape (n, features), got shape {tuple(x.shape)}")
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1 or len(y) != len(x):
        raise InputError(f"y must hold one label per sample ({len(x)}), got shape {tuple(y.shape)}")
    if grid_size < 1 or order < 1 or steps < 0:
        raise InputError(f"need grid_size >= 1, order >= 1 and steps >= 0; got {grid_size}, {order}, {steps}")
    if y.dtype == torch.bool:
        y = y.long()
    kind = infer_objective(y, objective)
    device = x.device
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx = _split(y, len(x), val_fraction, seed, stratify=kind == "classification")

    xf = x.to(device, dtype)
    mean = xf[train_idx].mean(0)
    scale = xf[train_idx].std(0, unbiased=False)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    fitted = FittedKAN(net=None, objective=kind, x_mean=mean, x_scale=scale, train_idx=train_idx, val_idx=val_idx)  # type: ignore[arg-type]
    if kind == "classification":
        fitted.classes = torch.unique(y)
        if len(fitted.classes) < 2:
            raise InputError("y has a single class; feature importance needs at least two classes")
        n_out = len(fitted.classes)
    else:
        yt = y.to(dtype)[train_idx]
        fitted.y_mean = float(yt.mean())
        fitted.y_scale = float(yt.std(unbiased=False)) or 1.0
        n_out = 1
    xs = fitted.standardize(xf)
    target = fitted.encode(y)
    widths = [x.shape[1], *([hidden] if isinstance(hidden, int) else list(hidden)), n_out]
    net = KAN(widths, xs[train_idx], grid_size, order, gen)
    fitted.net = net
    fitted.params = {
        "objective": kind,
        "widths": widths,
        "grid_size": grid_size,
        "order": order,
        "steps": steps,
        "lr": lr,
        "penalty": penalty,
        "val_fraction": val_fraction,
        "seed": seed,
    }

    xtr, ttr, xva, tva = xs[train_idx], target[train_idx], xs[val_idx], target[val_idx]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    grid_updates = set(range(0, steps // 2 + 1, max(1, steps // 10))) if len(widths) > 2 else set()
    best = (math.inf, {k: v.clone() for k, v in net.state_dict().items()})
    with torch.enable_grad(), few_threads(xtr.numel() * widths[1]):
        for step in range(steps + 1):
            if step in grid_updates:
                net.update_hidden_grids(xtr)
            if step % 10 == 0 or step == steps:
                with torch.no_grad():
                    val_loss = float(fitted.losses(net(xva), tva).mean())
                if val_loss < best[0]:
                    best = (val_loss, {k: v.clone() for k, v in net.state_dict().items()})
            if step == steps:
                fitted.history.append({"step": step, "val_loss": val_loss})
                break
            full = len(xtr) <= batch_size
            rows = slice(None) if full else torch.randperm(len(xtr), generator=gen)[:batch_size].to(device)
            out, reg = net.forward_penalized(xtr[rows]) if penalty else (net(xtr[rows]), 0.0)
            loss = fitted.losses(out, ttr[rows]).mean()
            if step % 10 == 0:
                fitted.history.append({"step": step, "train_loss": float(loss.detach()), "val_loss": val_loss})
            opt.zero_grad()
            (loss + penalty * reg).backward()
            opt.step()
    net.load_state_dict(best[1])
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return fitted
