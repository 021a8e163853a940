"""Reference values that stand in for a "removed" feature."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from whatmatters.core.errors import InputError
from whatmatters.core.task import Task

CHOICES = "'mean', 'median', 'zero', a number or an array"


def baseline_values(baseline: Any) -> torch.Tensor:
    """A number or array-like ``baseline`` as a CPU tensor; :class:`InputError` for anything that is not numeric."""
    if isinstance(baseline, torch.Tensor):
        return baseline.detach().cpu()
    try:
        array = np.asarray(baseline)
    except (TypeError, ValueError):  # ragged lists
        array = np.asarray(None)
    if array.dtype.kind not in "biuf":
        raise InputError(f"baseline must be {CHOICES} of numbers, got {baseline!r:.60}")
    return torch.from_numpy(array.astype(np.float64))  # a copy; uint64 and bools too, which torch cannot take


def baseline_row(task: Task, baseline: Any = "mean") -> torch.Tensor:
    """One reference sample of shape ``unit_shape``.

    ``baseline`` is ``"mean"`` / ``"median"`` of the background data (the data itself when no
    background is given), ``"zero"``, a number, or an array of shape ``unit_shape``.
    """
    ref = task.background if task.background is not None else task.inputs
    ref = ref.to(task.inputs.dtype)
    if isinstance(baseline, str):
        if baseline == "mean":
            return ref.mean(0)
        if baseline == "median":
            return ref.median(0).values
        if baseline == "zero":
            return torch.zeros(task.unit_shape, dtype=task.inputs.dtype)
        raise InputError(f"unknown baseline {baseline!r}; use {CHOICES}")
    value = baseline_values(baseline).to(task.inputs.dtype)
    try:
        return value.expand(task.unit_shape).clone()
    except RuntimeError:
        raise InputError(
            f"baseline of shape {tuple(value.shape)} does not fit samples of shape {task.unit_shape}"
        ) from None
