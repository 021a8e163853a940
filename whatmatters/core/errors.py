"""Errors that name the problem and the fix."""

from __future__ import annotations


class WhatMattersError(ValueError):
    """Base class: bad input or a request whatmatters cannot satisfy.

    Subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working.
    """


class InputError(WhatMattersError):
    """The data given to a method is unusable (shape, NaN, empty, dtype)."""


class ModelError(WhatMattersError):
    """The model cannot be used as asked (no gradients, wrong mode, no such layer)."""


class MethodError(WhatMattersError):
    """Unknown method, or parameters a method does not accept."""


class TargetError(WhatMattersError):
    """The requested target output does not exist."""


class ParameterError(MethodError, InputError):
    """A method parameter with a value the method cannot use (wrong type, NaN or infinite).

    Both a :class:`MethodError` (a parameter value the method does not accept) and an :class:`InputError`
    (unusable input), so code that catches either keeps working.
    """
