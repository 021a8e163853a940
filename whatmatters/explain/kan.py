"""KAN feature importance: fit a small Kolmogorov-Arnold network on the data, read scores off its first layer.

Four selectors from Akazan & Mbingui, "Splines-Based Feature Importance in Kolmogorov-Arnold
Networks" (arXiv:2509.23366; code github.com/AngeClementAkazan/Feature-Selection-Using-KAN):
``kan_l1``, ``kan_l2``, ``kan_si`` and ``kan_ko``. A KAN's first layer is additive in the inputs,
``h_o(x) = sum_j phi_oj(x_j) + b_o``, so each input ``j`` owns the edge functions ``phi_oj``.

They explain the *data* (which inputs a KAN fitted to ``y`` relies on), not a given model: call
``whatmatters.explain.select.score_features(X, y, "kan_l2")``, or ``whatmatters.explain(model, X,
"kan_l2", y=y)``, which ignores ``model``. One fit serves all four: fitted networks are cached by
data, labels, seed and fit parameters (:func:`shared_fit`); :func:`fit_kan` and
:func:`kan_importance` are the building blocks.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import torch

from whatmatters.core.errors import InputError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task
from whatmatters.explain._kan_net import FittedKAN, few_threads, fit_kan

__all__ = ["FittedKAN", "clear_cache", "fit_kan", "kan_importance", "shared_fit"]

Kind = Literal["l1", "l2", "si", "ko"]
_CACHE: OrderedDict[str, FittedKAN] = OrderedDict()
_CACHE_SIZE = 4
_ELEMENTS = 4_000_000  # bound on the elements of one intermediate tensor (memory)


def clear_cache() -> None:
    """Forget the cached fitted KANs."""
    _CACHE.clear()


def _fingerprint(x: torch.Tensor, y: torch.Tensor, seed: int, params: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for t in (x, y):
        arr = t.detach().cpu().contiguous()
        digest.update(f"{arr.dtype}{tuple(arr.shape)}{t.device}".encode())
        digest.update(arr.view(torch.uint8).numpy().tobytes() if arr.numel() else b"")
    digest.update(repr((seed, sorted(params.items()))).encode())
    return digest.hexdigest()


def shared_fit(x: torch.Tensor, y: torch.Tensor, *, seed: int = 0, **params: Any) -> tuple[FittedKAN, bool]:
    """:func:`fit_kan`, cached: the same data, labels, seed and parameters return the same network.

    Returns ``(fitted, was_cached)``. The last four fits are kept (``clear_cache()`` drops them).
    """
    key = _fingerprint(x, y, seed, params)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key], True
    fitted = fit_kan(x, y, seed=seed, **params)
    _CACHE[key] = fitted
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return fitted, False


def _row_chunks(n: int, per_row: int) -> list[slice]:
    size = max(1, _ELEMENTS // max(1, per_row))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _edge_norms(fitted: FittedKAN, xs: torch.Tensor, p: int, center: bool) -> torch.Tensor:
    """Mean over samples and hidden units of ``|phi_oj(x_j) - c_oj|^p``, per input ``j`` (then the p-th root)."""
    layer = fitted.net.layers[0]
    chunks = _row_chunks(len(xs), layer.out_dim * layer.in_dim)
    with torch.no_grad():
        mean = 0
        if center:
            mean = sum(layer.edges(xs[s]).double().sum(0) for s in chunks) / len(xs)  # (out, in)
        total = sum((layer.edges(xs[s]).double() - mean).abs().pow(p).sum(0) for s in chunks)
    return (total.mean(0) / len(xs)).pow(1 / p)


def _sensitivity(fitted: FittedKAN, xs: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ``sum_c |d z_c / d x_j|`` (z: logits centred over classes, or the regression output)."""
    n_out = fitted.net.widths[-1]
    total = torch.zeros(xs.shape[1], dtype=torch.float64, device=xs.device)
    for s in _row_chunks(len(xs), 4 * max(fitted.net.widths) * xs.shape[1]):
        xb = xs[s].detach().requires_grad_(True)
        with torch.enable_grad():
            out = fitted.net(xb)
            if fitted.objective == "classification":
                out = out - out.mean(1, keepdim=True)
            for c in range(n_out):  # one backward pass per output, every sample at once
                (grad,) = torch.autograd.grad(out[:, c].sum(), xb, retain_graph=c < n_out - 1)
                total += grad.abs().double().sum(0)
    return total / len(xs)


def _knockout(fitted: FittedKAN, xs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss increase and score drop when each input's first-layer edges are removed, all inputs batched.

    Removing input ``j``'s edges leaves ``h - phi_{:, j}`` as first-layer output; the rest of the
    network runs once on all ``n x d`` knocked-out copies (in chunks bounded in memory).
    """
    net, layer = fitted.net, fitted.net.layers[0]
    n, d = xs.shape
    with torch.no_grad():
        h = layer(xs)
        phi = layer.edges(xs)  # (n, hidden, d)
        base_out = net.head(h)
        base_loss = fitted.losses(base_out, target).double().mean()
        base_score = _score(fitted, base_out.unsqueeze(0), target).squeeze(0)
        loss_up, score_drop = [], []
        width = max(net.widths[1:])
        step = max(1, _ELEMENTS // max(1, n * width))
        for j in range(0, d, step):  # chunks of inputs, not a loop over inputs
            knocked = h.unsqueeze(1) - phi[:, :, j : j + step].transpose(1, 2)  # (n, m, hidden)
            m = knocked.shape[1]
            out = net.head(knocked.reshape(n * m, -1)).reshape(n, m, -1)
            losses = fitted.losses(out.reshape(n * m, -1), target.repeat_interleave(m, 0)).reshape(n, m).double()
            loss_up.append(losses.mean(0) - base_loss)
            score_drop.append(base_score - _score(fitted, out.transpose(0, 1), target))
    return torch.cat(loss_up), torch.cat(score_drop)


def _score(fitted: FittedKAN, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Accuracy or R² of outputs ``(m, n, k)`` against encoded targets, one per variant ``m``."""
    if fitted.objective == "classification":
        return (out.argmax(-1) == target).double().mean(-1)
    err = (out.squeeze(-1) - target.squeeze(-1)).double().pow(2).sum(-1)
    return 1 - err / (target - target.mean()).double().pow(2).sum().clamp_min(1e-12)


def kan_importance(
    fitted: FittedKAN,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    kind: Kind = "l2",
    center: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Per-input scores ``(d,)`` (float64) of a fitted KAN on the raw data ``x`` (and labels ``y`` for ``"ko"``).

    ``kind`` is one of ``"l1"``, ``"l2"`` (norms of the input's first-layer edge activations over
    ``x``; ``center`` subtracts each edge's mean first), ``"si"`` (mean absolute gradient) or
    ``"ko"`` (loss increase when the input's edges are removed, clipped at 0). Returns the scores
    and extra information (raw knock-out deltas and score drops for ``"ko"``).
    """
    if kind not in ("l1", "l2", "si", "ko"):
        raise InputError(f"kind must be 'l1', 'l2', 'si' or 'ko', got {kind!r}")
    if kind == "ko" and y is None:
        raise InputError("knock-out importance scores the loss against labels: pass y")
    xs = fitted.standardize(x)
    with few_threads(xs.numel() * fitted.net.widths[1]):
        if kind == "si":
            return _sensitivity(fitted, xs), {}
        if kind == "ko":
            loss_up, score_drop = _knockout(fitted, xs, fitted.encode(y))
            return loss_up.clamp_min(0), {"loss_increase": loss_up, "score_drop": score_drop}
        return _edge_norms(fitted, xs, 1 if kind == "l1" else 2, center), {}


def _run(task: Task, kind: Kind, fit_params: dict[str, Any], center: bool = True) -> tuple[torch.Tensor, dict]:
    if task.y is None:
        raise InputError(
            f"kan_{kind} fits its own KAN to the labels: pass y, as in whatmatters.explain.select.score_features(X, y, "
            f"'kan_{kind}') or whatmatters.explain(model, X, 'kan_{kind}', y=y)"
        )
    if task.inputs.ndim != 2:
        raise InputError(f"kan_{kind} needs tabular data (n, features), got shape {tuple(task.inputs.shape)}")
    start = time.perf_counter()
    fitted, cached = shared_fit(task.inputs, task.y, seed=task.seed, **fit_params)
    fit_seconds = time.perf_counter() - start
    if kind == "ko":
        rows = fitted.val_idx.to(task.inputs.device)
        values, extra = kan_importance(fitted, task.inputs[rows], task.y[rows.to(task.y.device)], kind="ko")
    else:
        values, extra = kan_importance(fitted, task.inputs, kind=kind, center=center)
    val = fitted.val_idx
    best = min(fitted.history, key=lambda h: h["val_loss"])
    extra = {
        **extra,
        "objective": fitted.objective,
        "widths": fitted.net.widths,
        "validation_score": fitted.score(task.inputs[val.to(task.inputs.device)], task.y[val.to(task.y.device)]),
        "validation_loss": best["val_loss"],
        "best_step": best["step"],
        "fit_cached": cached,
        "fit_seconds": fit_seconds,
    }
    dtype = task.inputs.dtype if task.inputs.is_floating_point() else torch.float32
    return values.to(dtype), extra


_FIT_DOC = """
    Fit parameters (shared by the four ``kan_*`` methods; equal values reuse one fitted network):
    ``objective`` ("auto": classification for integer labels with at most 20 values), ``hidden``
    (hidden width, or a list of widths; [] for a one-layer KAN), ``grid_size`` and ``order`` of
    the B-splines, ``steps`` of full-batch Adam at learning rate ``lr``, ``penalty`` (pykan's L1
    regularizer on edge activations), ``val_fraction`` held out for early stopping and knock-out.
"""


_FIT_DEFAULTS: dict[str, Any] = dict(
    objective="auto", hidden=8, grid_size=5, order=3, steps=200, lr=1e-2, penalty=1e-2, val_fraction=0.2
)


def _register(kind: Kind, doc: str, centered: bool) -> Callable[..., tuple[torch.Tensor, dict]]:
    """Register ``kan_<kind>``: the shared fit parameters (plus ``center`` for L1/L2) and ``doc``."""
    defaults = {**_FIT_DEFAULTS, **({"center": True} if centered else {})}

    def fn(task: Task, **params: Any) -> tuple[torch.Tensor, dict]:
        params = {**defaults, **params}
        center = params.pop("center", True)
        return _run(task, kind, params, center)

    fn.__name__ = fn.__qualname__ = f"kan_{kind}"
    fn.__doc__ = doc + _FIT_DOC
    task_param = inspect.Parameter("task", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Task)
    keyword = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in defaults.items()]
    fn.__signature__ = inspect.Signature([task_param, *keyword])  # type: ignore[attr-defined]
    return scorer(f"kan_{kind}", family="kan", units="feature", needs="fit", per_sample=False)(fn)


kan_l1 = _register(
    "l1",
    """KAN-L1: mean absolute first-layer edge activation of each input over the data.

    ``score_j = mean_{n, o} |phi_oj(x_nj) - c_oj|`` over samples ``n`` and hidden units ``o``. The
    authors' code (which produced the paper's results) uses the activations with ``c = 0``
    (``center=False``); the paper's text calls it the L1 norm of the input's spline coefficients.
    ``center=True`` (our default) subtracts each edge's mean over the data, ``c_oj = mean_n
    phi_oj``, because a constant offset is absorbed by the next layer and carries no information.
    """,
    centered=True,
)
kan_l2 = _register(
    "l2",
    """KAN-L2: root-mean-square first-layer edge activation of each input over the data.

    ``score_j = sqrt(mean_{n, o} (phi_oj(x_nj) - c_oj)^2)``: the L2 "energy" of the learned
    univariate transforms. As in the authors' code with ``center=False``; with ``center=True``
    (our default) it is the root mean of the edges' variances over the data (pykan's own
    attribution likewise uses the standard deviation of edge activations).
    """,
    centered=True,
)
kan_si = _register(
    "si",
    """KAN-SI (sensitivity integral): mean absolute gradient of the KAN's outputs w.r.t. each input.

    ``score_j = mean_n sum_c |d z_c(x_n) / d x_j|`` on standardized inputs over all samples, with
    ``z`` the logits centred over classes (classification) or the standardized prediction
    (regression). The paper's definition is the data average of the absolute gradient; the
    authors' code differentiates ``sum_c |z_c|`` in one pass, which lets class gradients cancel and
    depends on the logits' arbitrary shift. Summing per-class absolute gradients of centred
    logits (one backward pass per class, all samples at once) is our choice.
    """,
    centered=False,
)
kan_ko = _register(
    "ko",
    """KAN-KO (knock-out): increase of the held-out loss when an input's first-layer edges are removed.

    As in the paper and the authors' code: zero input ``j``'s base weights and spline coefficients
    in the first layer (equivalently, subtract its edge activations), run the full network, and
    take the loss increase (cross-entropy, or squared error on the standardized target) on the
    held-out rows, clipped at 0. The raw increases and the drop in held-out accuracy / R² are in
    ``extra``. Ours: all inputs are knocked out in one batched pass (no copy of the network per
    input); the paper normalizes scores to sum 1, we keep loss units.
    """,
    centered=False,
)
