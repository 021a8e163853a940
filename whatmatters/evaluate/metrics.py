"""Metrics registered by name: how good is an :class:`Importance` for this model and data?

A metric is a function ``fn(task, importance, *, **params)`` of the :class:`Task` (built once by the
wrapper from ``model``, ``data`` and the context ``target``, ``background``, ``y``, ``seed``,
``batch_size``, ``progress``; or handed over by the benchmark) and the importance, returning
per-sample scores (a tensor of shape ``(n,)``, or a 0-d tensor for an aggregated score) and,
where it draws curves, ``(scores, {curve_name: (x, y)})`` with ``x`` of shape ``(m,)`` and ``y``
of shape ``(n, m)``. ``@metric`` registers it with what a reader needs to know (category,
direction) and makes every call return a :class:`MetricResult`::

    @metric("deletion_auc", category="faithfulness", higher_is_better=False)
    def deletion_auc(task, importance, *, steps=50, baseline="mean"): ...

Calling the registered metric keeps the user's shape: ``deletion_auc(model, data, importance, target=...)``.

Every module in ``whatmatters/evaluate/`` is imported on first use of the registry, so a new
metric family is one new module.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from whatmatters.core.adapters import to_tensor
from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.importance import UNITS, Importance
from whatmatters.core.params import check_params
from whatmatters.core.registry import Registry, keyword_defaults
from whatmatters.core.task import Task, guarded, make_task

CATEGORIES = ("faithfulness", "localization", "robustness", "agreement", "randomization")

# Keyword arguments describing the evaluation request rather than the metric: the benchmark passes
# those a metric accepts, and they are not listed among the metric's parameters.
# The first ones are what the Metric wrapper turns into the task (metric_task) before it calls the metric.
TASK_CONTEXT = ("target", "background", "y", "seed", "batch_size", "progress", "allow_train_mode")
CONTEXT = (*TASK_CONTEXT, "relevant")

Curve = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class MetricResult:
    """Scores of one metric for one importance.

    ``scores`` has one value per sample (shape ``(n,)``), or a single value (shape ``()``) for a
    metric of an aggregated importance. ``curves`` maps a curve name to ``(x, y)``: ``x`` of shape
    ``(m,)`` (e.g. the fraction of units removed) and ``y`` of shape ``(n, m)`` (one curve per sample).
    """

    name: str
    scores: torch.Tensor
    category: str
    higher_is_better: bool
    curves: dict[str, Curve] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = math.nan

    @property
    def value(self) -> float:
        """Mean score over samples (NaN scores, e.g. undefined normalizations, are left out)."""
        scores = self.scores.detach().double().reshape(-1)
        finite = scores[~scores.isnan()]
        return float(finite.mean()) if len(finite) else math.nan

    def __float__(self) -> float:
        return self.value

    def mean_curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every curve averaged over samples, as NumPy ``(x, mean_y)``."""
        out = {}
        for name, (x, y) in self.curves.items():
            y2 = y.detach().double().reshape(-1, y.shape[-1])
            out[name] = (x.detach().double().cpu().numpy(), torch.nanmean(y2, 0).cpu().numpy())
        return out

    def __repr__(self) -> str:
        direction = "higher" if self.higher_is_better else "lower"
        return f"MetricResult({self.name}={self.value:.4g}, {direction} is better, n={self.scores.numel()})"


@dataclass(frozen=True)
class Metric:
    """A registered metric and what a reader of its score needs to know."""

    name: str
    fn: Callable[..., Any]
    category: str
    higher_is_better: bool
    units: tuple[str, ...]
    needs: str | None = None  # None (model and data suffice) or "relevant" (ground-truth units)
    aliases: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n\n")[0].replace("\n", " ")

    @property
    def takes_task(self) -> bool:
        """``fn(task, importance, ...)``; a function of ``(model, data, importance, ...)`` (the earlier form,
        still accepted) builds its task itself."""
        positional = [
            p for p in inspect.signature(self.fn).parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY
        ]
        return len(positional) == 2

    @property
    def accepted(self) -> tuple[str, ...]:
        """Every keyword argument the metric accepts: the task's context and the metric's parameters."""
        sig = inspect.signature(self.fn)
        own = tuple(n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)
        return (*TASK_CONTEXT, *own) if self.takes_task else own

    @property
    def defaults(self) -> dict[str, Any]:
        """The metric's own parameters with their defaults (context arguments left out)."""
        return keyword_defaults(self.fn, skip=CONTEXT)

    @property
    def header(self) -> str:
        direction = "higher" if self.higher_is_better else "lower"
        needs = f", needs {self.needs}" if self.needs else ""
        return f"{self.name} ({self.category}, {direction} is better, units {', '.join(self.units)}{needs})"

    def __call__(self, model: Any, data: Any, importance: Importance, **kwargs: Any) -> MetricResult:
        kwargs = check_params(self.name, kwargs, self.accepted, context=CONTEXT, fn=self.fn)
        if not isinstance(importance, Importance):
            raise InputError(
                f"{self.name} needs an Importance (from whatmatters.explain), got a {type(importance).__name__}; "
                "wrap raw scores with whatmatters.Importance(values, per_sample=...)"
            )
        start = time.perf_counter()
        if self.takes_task:
            context = {k: v for k, v in kwargs.items() if k in TASK_CONTEXT}
            with metric_task(model, data, importance, **context) as task:
                out = self.fn(task, importance, **{k: v for k, v in kwargs.items() if k not in TASK_CONTEXT})
        else:
            out = self.fn(model, data, importance, **kwargs)
        seconds = time.perf_counter() - start
        scores, curves = out if isinstance(out, tuple) else (out, {})
        if not isinstance(scores, torch.Tensor):
            scores = torch.as_tensor(np.asarray(scores, dtype=np.float64))
        params = {**self.defaults, **{k: v for k, v in kwargs.items() if k not in CONTEXT}}
        return MetricResult(self.name, scores, self.category, self.higher_is_better, dict(curves), params, seconds)


METRICS = Registry("metric", ("whatmatters.evaluate",))


def metric(
    name: str,
    *,
    category: str,
    higher_is_better: bool,
    units: str | tuple[str, ...] = ("feature", "pixel"),
    needs: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., MetricResult]]:
    """Register ``fn`` as a metric called ``name``; calling the result returns a :class:`MetricResult`.

    ``category`` is one of ``CATEGORIES``; ``higher_is_better`` gives the score's direction;
    ``units`` the input units it applies to; ``needs="relevant"`` marks a ground-truth metric
    (it takes a ``relevant=`` keyword: the units known to matter).
    """
    if category not in CATEGORIES:
        raise ValueError(f"metric {name!r}: category {category!r} is not one of {CATEGORIES}")
    unit_tuple = (units,) if isinstance(units, str) else tuple(units)
    if bad := [u for u in unit_tuple if u not in UNITS]:
        raise ValueError(f"metric {name!r}: unknown unit(s) {bad}")
    if needs not in (None, "relevant"):
        raise ValueError(f"metric {name!r}: needs must be None or 'relevant', got {needs!r}")

    def register(fn: Callable[..., Any]) -> Callable[..., MetricResult]:
        entry = Metric(name, fn, category, bool(higher_is_better), unit_tuple, needs, tuple(aliases))
        METRICS.add(entry)

        @functools.wraps(fn)
        def call(model: Any, data: Any, importance: Importance, **kwargs: Any) -> MetricResult:
            return entry(model, data, importance, **kwargs)

        call.metric = entry  # type: ignore[attr-defined]
        return call

    return register


def metrics(unit: str | None = None, category: str | None = None) -> list[str]:
    """Names of the registered metrics, optionally those for one input unit or category."""
    return METRICS.names(unit, category=category)


def get_metric(name: str) -> Metric:
    return METRICS.get(name)


def describe_metric(name: str) -> str:
    """A metric's documentation, category, direction and default parameters."""
    return METRICS.describe(name)


def measure(model: Any, data: Any, importance: Importance, metric: str, **kwargs: Any) -> MetricResult:
    """Evaluate ``importance`` with the metric called ``metric`` (``metrics()`` lists them)."""
    if not isinstance(metric, str):
        raise MethodError(f"metric must be a name from whatmatters.evaluate.metrics(), got {metric!r}")
    return get_metric(metric)(model, data, importance, **kwargs)


# ----------------------------------------------------------------------------- helpers for metrics
def unit_axes(importance: Importance, input_shape: tuple[int, ...]) -> int:
    """Number of leading sample dimensions (after the sample axis) the units broadcast over.

    Units match the input elements one to one (``unit_shape == input_shape``), or the trailing
    dimensions (pixel scores ``(H, W)`` for images ``(C, H, W)``: one score for all channels).
    Returns the number of leading input dimensions to broadcast over.
    """
    unit_shape = importance.unit_shape
    lead = len(input_shape) - len(unit_shape)
    if lead < 0 or tuple(input_shape[lead:]) != tuple(unit_shape):
        raise InputError(
            f"importance over units of shape {unit_shape} does not fit samples of shape {tuple(input_shape)}: "
            "units must match the sample shape or its trailing dimensions (e.g. (H, W) for (C, H, W) images)"
        )
    return lead


def flat_scores(importance: Importance, n: int | None = None) -> torch.Tensor:
    """Importance values as a float64 CPU tensor ``(rows, n_units)``; aggregated scores broadcast to ``n`` rows."""
    flat = importance._flat().detach().to("cpu", torch.float64)
    if torch.isnan(flat).any():
        raise InputError(f"the {importance.method or 'given'} importance contains NaN scores; it cannot be evaluated")
    if n is not None:
        if importance.per_sample and flat.shape[0] != n:
            raise InputError(
                f"the importance has {flat.shape[0]} samples but the data has {n}; "
                "evaluate it on the data that was explained"
            )
        flat = flat.expand(n, -1)
    return flat


@contextmanager
def metric_task(
    model: Any,
    data: Any,
    importance: Importance,
    *,
    target: Any = None,
    background: Any = None,
    y: Any = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool | None = None,
    allow_train_mode: bool = False,
) -> Iterator[Task]:
    """A :class:`Task` for evaluating ``importance``: validated inputs, wrapped model, resolved target.

    The target defaults to the importance's own target (the output that was explained), then to the
    predicted class. A torch model is checked to be in eval mode and left exactly as it was.
    """
    if target is None:
        target = importance.target
    given = data if isinstance(data, Task) else None
    inputs = given.inputs if given is not None else to_tensor(data, "data")[0]
    unit_axes(importance, tuple(inputs.shape[1:]))
    flat_scores(importance, len(inputs))
    with guarded(model, allow_train_mode):
        if given is not None:  # built once by the caller (benchmark): no re-check, no second prediction
            yield given.with_target(target)
            return
        yield make_task(
            model, data, target, y=y, background=background, seed=seed, batch_size=batch_size, progress=progress
        )
