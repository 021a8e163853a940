"""``explain(model, data, method=...)``: the one entry point for input attribution."""

from __future__ import annotations

import numbers
import time
from typing import Any

import torch

from whatmatters.core.adapters import TorchModel, to_tensor, wrap
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.importance import Importance
from whatmatters.core.registry import get_method
from whatmatters.core.state import preserved, require_eval
from whatmatters.core.task import Task, check_params, infer_unit, resolve_target


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
            DataFrame's columns become the unit names.
        method: a name from ``whatmatters.methods()``.
        target: output index to explain (int or one per sample); default: the predicted class
            (or the only output of a regressor).
        y: true labels, for methods that score against them (permutation importance).
        background: reference samples for baselines / maskers (default: ``data`` itself).
        seed: seed of every random draw, for reproducible results.
        batch_size: rows per model call (memory bound).
        progress: show progress bars (default: on a terminal, for long work).
        **params: the method's own parameters (``whatmatters.describe(method)`` lists them).

    Returns:
        An :class:`Importance` with one score per sample and unit (or per unit for global methods).
    """
    if not isinstance(method, str):
        raise MethodError(f"method must be a method name (str), got {method!r}; whatmatters.methods() lists them")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int (rows per model call), got {batch_size!r}")
        batch_size = int(batch_size)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InputError(f"seed must be an int, got {seed!r}")
    seed = int(seed)
    info = get_method(method)
    if info.verb != "explain":
        raise MethodError(f"{method!r} is a {info.verb} method; use whatmatters.{info.verb}(...) for it")
    check_params(info.name, params, info.defaults)
    inputs, names = to_tensor(data, "data")
    names = feature_names or names
    adapted = wrap(model, batch_size=batch_size)
    if not isinstance(adapted, TorchModel) and not inputs.is_floating_point():
        inputs = inputs.to(torch.float64)  # integer columns of a scikit-learn / NumPy model are features, not tokens
    if info.needs in ("gradients", "module") and not isinstance(adapted, TorchModel):
        raise ModelError(
            f"{info.name} needs gradients, so it needs a PyTorch nn.Module; for a {type(model).__name__} "
            f"use a model-agnostic method: {', '.join(m for m in _agnostic())}"
        )
    unit = infer_unit(inputs)
    if unit not in info.units:
        raise MethodError(
            f"{info.name} scores {', '.join(info.units)}, not {unit}s (data of shape {tuple(inputs.shape)})"
        )
    if names is not None and (inputs.ndim != 2 or len(names) != inputs.shape[1]):
        raise MethodError(f"{len(names)} feature names for data of shape {tuple(inputs.shape)}")
    bg = to_tensor(background, "background")[0] if background is not None else None
    if bg is not None and bg.shape[1:] != inputs.shape[1:]:
        raise MethodError(f"background has samples of shape {tuple(bg.shape[1:])}, data {tuple(inputs.shape[1:])}")
    labels = to_tensor(y, "y")[0] if y is not None else None
    if labels is not None and len(labels) != len(inputs):
        raise MethodError(f"y has {len(labels)} labels for {len(inputs)} samples")

    def run() -> Any:
        tgt = resolve_target(target, adapted, inputs)
        task = Task(adapted, inputs, tgt, bg, labels, names, seed, batch_size, progress)
        start = time.perf_counter()
        out = info.fn(task, **params)
        return tgt, out, time.perf_counter() - start

    if isinstance(adapted, TorchModel):
        require_eval(adapted.module, allow_train_mode)
        with preserved(adapted.module):
            tgt, out, seconds = run()
    else:
        tgt, out, seconds = run()
    values, extra = out if isinstance(out, tuple) else (out, {})
    if "unit_names" in extra:  # a scorer of its own units (e.g. feature groups) names them
        extra = dict(extra)
        names = list(extra.pop("unit_names"))
    unique = tgt.unique()
    return Importance(
        values=values,
        unit=unit,
        names=names if inputs.ndim == 2 else None,
        per_sample=info.per_sample,
        method=info.name,
        params={**info.defaults, **params},
        target=int(unique[0]) if len(unique) == 1 else tgt.tolist(),
        seed=seed,
        seconds=seconds,
        extra=extra,
    )


def _agnostic() -> list[str]:
    from whatmatters.core.registry import SCORERS

    return sorted(m.name for m in SCORERS.entries.values() if m.verb == "explain" and m.needs == "predict")
