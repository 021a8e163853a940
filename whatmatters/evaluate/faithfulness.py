"""Deletion and insertion curves: does removing the top-scored units change the output most?

Units (features, pixels, ...) are ranked by importance, and the model's output at the target is
recorded while a growing fraction of them is replaced by a baseline (deletion: most important
first, starting from the input) or revealed on top of the baseline (insertion: most important
first, starting from the baseline). Everything works on the flattened unit axis, so the same code
serves tabular features and image pixels; all steps of all samples go to the model in batched calls.

The area under a curve (AUC) is the trapezoid rule over the fraction axis ``[0, 1]``:

* raw (default): in the model's output units (probabilities for scikit-learn classifiers, logits
  or whatever a torch model returns), so comparable between methods on the same model and data;
* ``normalize=True``: each sample's curve rescaled to ``(f(step) - f(baseline)) / (f(x) - f(baseline))``
  so it runs from 1 to 0 (deletion) or 0 to 1 (insertion); samples whose input and baseline outputs
  are equal give NaN and are left out of the mean;
* ``relative=True``: the AUC minus the mean AUC of ``n_random`` random orders of the same units
  (below 0 is better than random for deletion, above 0 for insertion).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from whatmatters.core.adapters import row_slices
from whatmatters.core.errors import InputError
from whatmatters.core.importance import Importance
from whatmatters.core.task import Task, progress_bar
from whatmatters.evaluate.metrics import Curve, flat_scores, metric, metric_task, unit_axes
from whatmatters.explain.baselines import baseline_row

Baseline = str | float | np.ndarray | torch.Tensor | Callable[[torch.Tensor], Any]


def resolve_baseline(task: Task, baseline: Baseline) -> torch.Tensor:
    """The reference that replaces removed units, shape ``(1 or n, *sample_shape)``.

    ``baseline`` is ``"mean"`` / ``"median"`` of the background (the data when no background is
    given), ``"zero"``, a number, an array of the sample shape (one reference for all samples) or
    of the data's shape (one per sample), or a callable ``f(inputs) -> tensor`` of the data's shape
    (e.g. a blurred copy of every image).
    """
    x = task.inputs
    if callable(baseline) and not isinstance(baseline, (str, torch.Tensor, np.ndarray)):
        out = baseline(x.clone())
        out = out.detach() if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
        if tuple(out.shape) != tuple(x.shape):
            raise InputError(
                f"the baseline function returned shape {tuple(out.shape)} for inputs of shape {tuple(x.shape)}; "
                "it must return one reference per sample, of the inputs' shape"
            )
        return out.to("cpu", x.dtype)
    if not isinstance(baseline, str):
        value = torch.as_tensor(baseline.detach().cpu() if isinstance(baseline, torch.Tensor) else baseline)
        if value.ndim == x.ndim and tuple(value.shape) == tuple(x.shape):
            return value.to(x.dtype)
    return baseline_row(task, baseline).unsqueeze(0)


def order_ranks(key: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rank of every unit (0 = highest ``key``) per row; ties broken at random (seeded), not by index."""
    perm = torch.rand(key.shape, generator=generator, dtype=torch.float64).argsort(dim=-1)
    order = perm.gather(-1, key.gather(-1, perm).argsort(dim=-1, descending=True, stable=True))
    return torch.empty_like(order).scatter_(-1, order, torch.arange(key.shape[-1]).expand_as(order))


def step_counts(n_units: int, steps: int) -> torch.Tensor:
    """How many units are removed at each step: ``steps`` (at most ``n_units``) equal fractions, 0 and all included."""
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    m = min(int(steps), n_units)
    return torch.linspace(0, n_units, m + 1, dtype=torch.float64).round().long().unique()


def perturbation_curves(
    task: Task,
    importance: Importance,
    *,
    mode: str = "deletion",
    steps: int = 50,
    baseline: Baseline = "mean",
    by_abs: bool = False,
    n_random: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion or insertion curves of every sample.

    Returns ``fractions`` of shape ``(m,)`` (exact fraction of units removed / inserted at each step,
    from 0 to 1) and ``outputs`` of shape ``(n, 1 + n_random, m)``: the target output along the order
    given by ``importance`` (index 0 on the second axis), then along ``n_random`` random orders.
    """
    if mode not in ("deletion", "insertion"):
        raise InputError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if not isinstance(n_random, (int, np.integer)) or n_random < 0:
        raise InputError(f"n_random must be a non-negative integer, got {n_random!r}")
    x = task.inputs
    n, sample_shape = x.shape[0], tuple(x.shape[1:])
    lead = unit_axes(importance, sample_shape)
    unit_shape = importance.unit_shape
    scores = flat_scores(importance, n)
    d = scores.shape[1]
    base = resolve_baseline(task, baseline)
    gen = task.generator()
    ranks = order_ranks(scores.abs() if by_abs else scores, gen).unsqueeze(1)  # (n, 1, d)
    if n_random:
        ranks = torch.cat([ranks, torch.rand(n, int(n_random), d, generator=gen).argsort(-1)], dim=1)
    counts = step_counts(d, steps)
    fractions = counts.double() / d
    r, m = ranks.shape[1], len(counts)
    # Row (i, j, k) of the flat list of variants: sample i, order j, step k. Variants are built one
    # model batch at a time, so memory stays that of one batch however many steps and samples.
    total = n * r * m
    size = task.rows_per_call()
    chunks = row_slices(total, size)
    outputs = torch.empty(total, dtype=torch.float64)
    for rows in progress_bar(chunks, len(chunks), mode, task.progress):
        idx = torch.arange(rows.start, rows.stop)
        i, j, k = idx // (r * m), (idx // m) % r, idx % m
        removed = ranks[i, j] < counts[k].unsqueeze(1)  # (b, d): unit u is among the counts[k] first
        mask = removed.reshape(len(idx), *([1] * lead), *unit_shape)
        xi, bi = x[i], base[i] if base.shape[0] > 1 else base
        variants = torch.where(mask, bi, xi) if mode == "deletion" else torch.where(mask, xi, bi)
        out = task.model.predict(variants, batch_size=size)
        outputs[rows] = out.gather(1, task.target[i].to(out.device).unsqueeze(1)).squeeze(1).to("cpu", torch.float64)
    return fractions, outputs.reshape(n, r, m)


def auc(fractions: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Area under ``outputs`` (last axis) over ``fractions`` by the trapezoid rule."""
    return torch.trapezoid(outputs, fractions.to(outputs), dim=-1)


def _normalized(outputs: torch.Tensor, mode: str) -> torch.Tensor:
    """Curves rescaled so that the full input gives 1 and the baseline 0 (NaN where they coincide)."""
    fx, fb = (outputs[..., :1], outputs[..., -1:]) if mode == "deletion" else (outputs[..., -1:], outputs[..., :1])
    span = fx - fb
    scale = torch.maximum(fx.abs(), fb.abs()).clamp_min(1.0)
    span = torch.where(span.abs() > 1e-9 * scale, span, torch.full_like(span, float("nan")))
    return (outputs - fb) / span


def _curve_fn(mode: str, doc: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def curve(
        model: Any,
        data: Any,
        importance: Importance,
        *,
        target: Any = None,
        baseline: Baseline = "mean",
        steps: int = 50,
        by_abs: bool = False,
        background: Any = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with metric_task(
            model, data, importance, target=target, background=background, seed=seed, batch_size=batch_size
        ) as task:
            fractions, outputs = perturbation_curves(
                task, importance, mode=mode, steps=steps, baseline=baseline, by_abs=by_abs
            )
        return fractions, outputs[:, 0]

    curve.__name__ = curve.__qualname__ = f"{mode}_curve"
    curve.__doc__ = doc
    return curve


deletion_curve = _curve_fn(
    "deletion",
    """``(fractions (m,), outputs (n, m))``: target output as the most important units are removed.

    ``outputs[:, 0]`` is ``f(x)`` and ``outputs[:, -1]`` is ``f(baseline)``.
    """,
)
insertion_curve = _curve_fn(
    "insertion",
    """``(fractions (m,), outputs (n, m))``: target output as the most important units are revealed.

    ``outputs[:, 0]`` is ``f(baseline)`` and ``outputs[:, -1]`` is ``f(x)``.
    """,
)


def _auc_metric(mode: str, doc: str) -> Callable[..., tuple[torch.Tensor, dict[str, Curve]]]:
    def auc_metric(
        task: Task,
        importance: Importance,
        *,
        baseline: Baseline = "mean",
        steps: int = 50,
        by_abs: bool = False,
        normalize: bool = False,
        relative: bool = False,
        n_random: int = 4,
    ) -> tuple[torch.Tensor, dict[str, Curve]]:
        if relative and n_random < 1:
            raise InputError("relative=True compares with random orders: n_random must be at least 1")
        fractions, outputs = perturbation_curves(
            task,
            importance,
            mode=mode,
            steps=steps,
            baseline=baseline,
            by_abs=by_abs,
            n_random=n_random if relative else 0,
        )
        if normalize:
            outputs = _normalized(outputs, mode)
        areas = auc(fractions, outputs)
        curves = {mode: (fractions, outputs[:, 0])}
        if not relative:
            return areas[:, 0], curves
        curves[f"{mode}_random"] = (fractions, outputs[:, 1:].mean(1))
        return areas[:, 0] - areas[:, 1:].mean(1), curves

    auc_metric.__name__ = auc_metric.__qualname__ = f"{mode}_auc"
    auc_metric.__doc__ = doc
    return auc_metric


deletion_auc = metric("deletion_auc", category="faithfulness", higher_is_better=False, units=("feature", "pixel"))(
    _auc_metric(
        "deletion",
        """Deletion AUC: area under the target output as units are removed, most important first (lower is better).

    Units are replaced by ``baseline`` (``"mean"`` of the background or data, ``"zero"``, a number,
    an array, or a callable ``f(inputs) -> references``) in ``steps`` equal fractions, in order of
    decreasing score (``by_abs``: decreasing absolute score). The AUC is the trapezoid rule over the
    fraction removed, in the model's output units; ``normalize`` rescales each curve to run from 1
    (``f(x)``) to 0 (``f(baseline)``); ``relative`` subtracts the mean AUC of ``n_random`` random
    orders. Curve: ``"deletion"`` (and ``"deletion_random"`` when relative).
    """,
    )
)
insertion_auc = metric("insertion_auc", category="faithfulness", higher_is_better=True, units=("feature", "pixel"))(
    _auc_metric(
        "insertion",
        """Insertion AUC: area under the target output as units are revealed, most important first (higher is better).

    Starts from ``baseline`` (see ``deletion_auc``) and puts back the input's units in order of
    decreasing score, in ``steps`` equal fractions; trapezoid rule over the fraction inserted.
    ``normalize`` rescales each curve to run from 0 (``f(baseline)``) to 1 (``f(x)``); ``relative``
    subtracts the mean AUC of ``n_random`` random orders. Curve: ``"insertion"`` (and
    ``"insertion_random"`` when relative).
    """,
    )
)
