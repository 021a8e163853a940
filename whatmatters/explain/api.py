"""``explain(model, data, method=...)``: the one entry point for input attribution."""

from __future__ import annotations

import time
from typing import Any

from whatmatters.core.errors import MethodError, ModelError, WhatMattersError
from whatmatters.core.importance import Importance
from whatmatters.core.params import check_params
from whatmatters.core.registry import get_method
from whatmatters.core.task import Task, check_units, guarded, make_task, probe, torch_module


def explain(
    model: Any,
    data: Any,
    method: str,
    target: Any = None,
    *,
    y: Any = None,
    background: Any = None,
    feature_names: list[str] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool | None = None,
    allow_train_mode: bool = False,
    **params: Any,
) -> Importance:
    """Score the inputs of ``model`` on ``data`` with ``method``.

    Args:
        model: a torch ``nn.Module``, a scikit-learn estimator, or a callable on arrays.
        data: samples to explain, shape ``(n, features)`` or ``(n, C, H, W)``; a pandas
            DataFrame's columns become the unit names (matched by name, in any order, to the features
            of a model that knows them, e.g. scikit-learn's ``feature_names_in_``). A
            :class:`~whatmatters.core.task.Task` from ``make_task`` is used as it is (its data,
            background, labels and target).
        method: a name from ``whatmatters.methods()``.
        target: output index to explain (int or one per sample); default: the predicted class
            (or the only output of a regressor).
        y: true labels, for methods that score against them (permutation importance).
        background: reference samples for baselines / maskers (default: ``data`` itself).
        feature_names: names of the data's columns (default: a DataFrame's columns).
        seed: seed of every random draw, for reproducible results.
        batch_size: rows per model call (memory bound).
        progress: show progress bars (default: on a terminal, for long work).
        **params: the method's own parameters (``whatmatters.describe(method)`` lists them); values of
            the wrong type, NaN or infinite ones raise :class:`~whatmatters.core.errors.ParameterError`.

    Returns:
        An :class:`Importance` with one score per sample and unit (or per unit for global methods).
    """
    if not isinstance(method, str):
        raise MethodError(f"method must be a method name (str), got {method!r}; whatmatters.methods() lists them")
    info = get_method(method)
    if info.verb != "explain":
        hint = "whatmatters.compress.score(model, method, data=...)" if info.verb == "compress" else info.verb
        raise MethodError(f"{method!r} is a {info.verb} method, not an explain method; use {hint} for it")
    params = check_params(info.name, params, info.defaults, fn=info.fn)
    if info.needs in ("gradients", "module") and torch_module(model) is None:
        raise ModelError(
            f"{info.name} needs gradients, so it needs a PyTorch nn.Module; for a {type(model).__name__} "
            f"use a model-agnostic method: {', '.join(m for m in _agnostic())}"
        )
    with guarded(model, allow_train_mode):
        if isinstance(data, Task):  # built once by the caller (benchmark): no re-check, no second prediction
            task = data.with_target(target)
            check_units(task.inputs, (info.name, info.units))
        else:
            task = make_task(
                model, data, target, y=y, background=background, feature_names=feature_names,
                seed=seed, batch_size=batch_size, progress=progress, method=(info.name, info.units),
                checks_target=info.checks_target,
            )  # fmt: skip
        start = time.perf_counter()
        try:
            out = info.fn(task, **params)
        except WhatMattersError:
            raise
        except Exception:
            if task.n_outputs is None:  # no probe row was run: if the model fails on one row, say so with its shape
                probe(task.model, task.inputs)
            raise
        seconds = time.perf_counter() - start
    unique = task.target.unique()
    return info.to_importance(
        out,
        unit=task.unit,
        names=task.names if task.inputs.ndim == 2 else None,
        params=params,
        seed=task.seed,
        seconds=seconds,
        target=int(unique[0]) if len(unique) == 1 else task.target.tolist(),
    )


def _agnostic() -> list[str]:
    from whatmatters.core.registry import SCORERS

    return sorted(m.name for m in SCORERS.entries.values() if m.verb == "explain" and m.needs == "predict")
