"""whatmatters: find out what matters in a model and its data, and act on it."""

from whatmatters._version import __version__
from whatmatters.core.errors import InputError, MethodError, ModelError, TargetError, WhatMattersError
from whatmatters.core.importance import Importance
from whatmatters.core.registry import describe, methods
from whatmatters.explain import explain

__all__ = [
    "Importance",
    "InputError",
    "MethodError",
    "ModelError",
    "TargetError",
    "WhatMattersError",
    "__version__",
    "describe",
    "explain",
    "methods",
]
