"""whatmatters: find out what matters in a model and its data, and act on it.

``explain`` scores inputs, ``evaluate`` measures any score, ``report`` shows it; compress, tune and
curate act on model parts, training and data. Heavy submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from whatmatters._version import __version__
from whatmatters.core.errors import (
    InputError,
    MethodError,
    ModelError,
    ParameterError,
    TargetError,
    WhatMattersError,
)
from whatmatters.core.importance import Importance
from whatmatters.core.registry import describe, methods
from whatmatters.explain import explain

# name -> module that defines it, imported on first access (keeps `import whatmatters` fast)
_LAZY = {
    "benchmark": "whatmatters.evaluate.benchmark",
    "BenchmarkResult": "whatmatters.evaluate.benchmark",
    "compare": "whatmatters.evaluate.benchmark",
    "metrics": "whatmatters.evaluate",
    "measure": "whatmatters.evaluate.metrics",
    "write_report": "whatmatters.report.html",
    "dhondt_seats": "whatmatters.explain.dhondt",
    "Actionability": "whatmatters.explain.recourse",
    "layer_relevance": "whatmatters.explain.lrp",
    "select_features": "whatmatters.explain.select",
    "score_features": "whatmatters.explain.select",
    "sequential_select": "whatmatters.explain.select",
}


# Subpackages reachable as attributes after ``import whatmatters`` (imported on first use).
_SUBPACKAGES = ("compress", "curate", "tune", "evaluate", "vision", "text", "models", "report", "lrp", "select")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"whatmatters.{name}")
    raise AttributeError(f"module 'whatmatters' has no attribute {name!r}")


__all__ = [
    "Importance",
    "InputError",
    "MethodError",
    "ModelError",
    "ParameterError",
    "TargetError",
    "WhatMattersError",
    "__version__",
    "describe",
    "explain",
    "methods",
    *_LAZY,
]
