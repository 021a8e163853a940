"""One fraction vocabulary for actions: ``amount``, ``sparsity``, ``compression_ratio`` = share removed;
``keep`` = share kept; and whole numbers (bits, batch sizes, counts) checked one way.

Every action validates its fraction here: a real number (Python or NumPy scalar, never a bool or NaN),
removed shares in ``[0, 1)`` and kept shares in ``(0, 1]``; the error names the argument, what it means and
an example.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

from whatmatters.core.errors import InputError


def _real(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        return None
    return float(value)


def removed_share(value: Any, name: str = "amount", *, of: str = "units", example: str = "") -> float:
    """``value`` as the share of ``of`` removed, a float in ``[0, 1)``; ``InputError`` naming the fix otherwise."""
    share = _real(value)
    if share is None or not 0 <= share < 1:
        hint = f" (e.g. {name}={example})" if example else ""
        raise InputError(
            f"{name} must be a number in [0, 1) (the fraction of {of} removed; 0.75 keeps 25 %), got {value!r}{hint}"
        )
    return share


def kept_share(value: Any, name: str = "keep", *, of: str = "units") -> float:
    """``value`` as the share of ``of`` kept, a float in ``(0, 1]``."""
    share = _real(value)
    if share is None or not 0 < share <= 1:
        raise InputError(f"{name} as a fraction must be in (0, 1] (the share of {of} kept), got {value!r}")
    return share


def whole(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None, meaning: str = "") -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (Python or NumPy integer, never a bool or a float)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        what = f" ({meaning})" if meaning else ""
        raise InputError(f"{name} must be an integer {bound}{what}, got {value!r}")
    return int(value)


def units_removed(share: float, total: int, what: str, name: str = "amount") -> int:
    """``round(share * total)``: how many of ``total`` units a removed ``share`` means; warns when it rounds to 0."""
    count = round(share * total)
    if share > 0 and count == 0:
        warnings.warn(
            f"{name}={share:g} of {total} {what} rounds to 0, so nothing is removed; "
            f"use {name} > {0.5 / total:.3g} to remove one",
            UserWarning,
            stacklevel=3,
        )
    return count


__all__ = ["kept_share", "removed_share", "units_removed", "whole"]
