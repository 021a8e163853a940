"""Old import paths that keep working for one release, with a ``DeprecationWarning`` naming the new one."""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType


def moved(old: str, new: str, submodules: tuple[str, ...] = ()) -> ModuleType:
    """Make module ``old`` (and ``old.<sub>`` for each of ``submodules``) the module ``new``; warn once."""
    warnings.warn(
        f"{old} moved to {new}; import it from there ({old} will be removed in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    module = importlib.import_module(new)
    for sub in submodules:
        sys.modules[f"{old}.{sub}"] = importlib.import_module(f"{new}.{sub}")
    sys.modules[old] = module
    return module


__all__ = ["moved"]
