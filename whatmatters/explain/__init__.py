"""Input attribution: which features, pixels or tokens drive a prediction.

Every module in this package is imported on first use of the registry, so a new method family
is one new module with ``@scorer`` functions.
"""

from whatmatters.explain.api import explain

__all__ = ["explain"]
