"""Reference values that stand in for a "removed" feature."""

from __future__ import annotations

from typing import Any

import torch

from whatmatters.core.errors import InputError
from whatmatters.core.task import Task


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
        raise InputError(f"unknown baseline {baseline!r}; use 'mean', 'median', 'zero', a number or an array")
    value = torch.as_tensor(baseline, dtype=task.inputs.dtype)
    try:
        return value.expand(task.unit_shape).clone()
    except RuntimeError:
        raise InputError(
            f"baseline of shape {tuple(value.shape)} does not fit samples of shape {task.unit_shape}"
        ) from None
