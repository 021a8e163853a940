"""The action contract: every action that changes a model returns a new model and a report of what it did.

``prune``, ``prune_structured``, ``prune_channels``, ``prune_experts`` and ``quantize`` take
``(model, importance_or_method, fraction, ...)`` (fractions validated by :mod:`whatmatters.core.fractions`)
and return a :class:`Compressed` pair; the input model is never changed unless asked (``inplace=True``).
Context-manager actions (``evicting_kv``) yield a handle instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn


class Compressed(NamedTuple):
    """An action's result: the new model and its report (unpack as ``model, report``)."""

    model: nn.Module
    report: Any


class RemovalCounts:
    """``n_removed`` and ``parameter_ratio`` of a removal report with ``removed`` and parameter counts."""

    removed: dict
    n_parameters_before: int
    n_parameters_after: int

    @property
    def n_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())

    @property
    def parameter_ratio(self) -> float:
        return self.n_parameters_after / max(self.n_parameters_before, 1)


def n_parameters(model: nn.Module) -> int:
    """Number of parameter elements (tied weights counted once: ``parameters()`` yields each once)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["Compressed", "RemovalCounts", "n_parameters"]
