"""Input attribution: which features, pixels or tokens drive a prediction.

Importing this package registers every method family below.
"""

from whatmatters.explain import perturbation  # noqa: F401
from whatmatters.explain.api import explain

__all__ = ["explain"]
