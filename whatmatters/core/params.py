"""Parameters bound to a registered entry (scorer, metric): checked once, in one place, for every entry.

``check_params`` runs wherever a method's parameters meet the method (``explain``, ``benchmark``, the
metrics, ``compress.score``, D'Hondt's base method), before any model call:

* unknown names are refused (:class:`MethodError`, with the accepted ones);
* NumPy scalars become the Python numbers the methods expect (``np.float32(0.1)`` -> ``0.1``);
* a value that does not fit the parameter's annotation (``steps: int`` given ``2.5``, ``base: str`` given a
  list) is refused, when the entry's function is given (:class:`ParameterError`);
* NaN or infinite numbers, alone or in arrays, tensors and lists, are refused (:class:`ParameterError`).

The errors name the method, the parameter and the fix, so no method computes with such a value.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from whatmatters.core.errors import MethodError, ParameterError

INT64 = 2**63


def plain(value: Any) -> Any:
    """A NumPy bool, integer or float scalar as the Python ``bool`` / ``int`` / ``float``; anything else as it is."""
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    return value


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of a tensor is finite: one sum first (a NaN or an infinity reaches it), the
    elementwise test only when the sum is not finite (then a NaN, an infinity or an overflow of the sum)."""
    if tensor.is_floating_point():  # one reduction and one read of a Python float (no further tensor ops)
        return math.isfinite(tensor.detach().sum().item()) or bool(torch.isfinite(tensor.detach()).all())
    if tensor.is_complex():
        return bool(torch.isfinite(tensor.detach()).all())
    return True


def count_non_finite(value: Any) -> int:
    """NaN or infinite numbers in a number, array, tensor or (nested) list of numbers; 0 for anything else."""
    if isinstance(value, float):
        return 0 if math.isfinite(value) else 1
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()):
            return 0
        return int((~torch.isfinite(value.detach())).sum())
    if isinstance(value, (np.ndarray, np.generic, list, tuple)):
        try:
            array = np.asarray(value)
        except (ValueError, TypeError, RuntimeError):  # ragged, or holds objects NumPy cannot convert
            return 0
        return int((~np.isfinite(array)).sum()) if array.dtype.kind in "fc" else 0
    return 0


@functools.cache
def parameter_types(fn: Callable[..., Any]) -> dict[str, Any]:
    """The annotation of each keyword-only parameter of ``fn``, evaluated; those that do not evaluate (names
    imported for type checking only) are left out, so they are not checked."""
    return dict(_parameter_types(fn))


@functools.lru_cache(maxsize=1024)
def _parameter_types(fn: Callable[..., Any]) -> dict[str, Any]:
    hints = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.annotation is inspect.Parameter.empty:
            continue
        hint = p.annotation
        if isinstance(hint, str):  # postponed annotations: evaluated as typing.get_type_hints does
            try:
                hint = eval(hint, getattr(fn, "__globals__", {}))
            except Exception:
                continue
        hints[name] = hint
    return hints


def _options(hint: Any) -> tuple[Any, ...] | None:
    """The members of a union annotation (``a | b``, ``Optional[a]``); None for any other annotation."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


SEQUENCES = (list, tuple, Sequence)


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type (numbers as PEP 484 reads them; unknown annotations: yes)."""
    if hint is Any:
        return True
    if (options := _options(hint)) is not None:
        return any(fits(value, h) for h in options)
    if hint is None or hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and -INT64 <= value < INT64
    origin = typing.get_origin(hint) or hint
    if origin is typing.Literal:  # compared as plain values only (an array's == is not a yes or no)
        return isinstance(value, (str, bytes, int, float, type(None))) and value in typing.get_args(hint)
    if origin in SEQUENCES:  # arrays and tensors are sequences here, text is not
        return isinstance(value, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(value, (str, bytes))
    if origin is Callable:
        return callable(value)
    return not isinstance(origin, type) or isinstance(value, origin)


def describe(hint: Any) -> str:
    """An annotation in words: ``int | None`` -> ``an int or None``."""
    if (options := _options(hint)) is not None:
        return " or ".join(dict.fromkeys(describe(h) for h in options))
    origin = typing.get_origin(hint) or hint
    words = {float: "a number", int: "an int", bool: "True or False", str: "a str", Callable: "a callable"}
    if hint is None or hint is type(None):
        return "None"
    if origin is typing.Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    if origin in SEQUENCES:
        return "a list or tuple"
    if origin in (dict, Mapping):
        return "a dict"
    return words.get(origin) or f"a {getattr(origin, '__name__', origin)}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_float(value: int) -> float:
    try:
        return float(value)
    except OverflowError:  # beyond the float range: as infinite as a float gets
        return math.inf


def _bound(owner: str, name: str, value: Any, hint: Any, defaults: Mapping[str, Any]) -> Any:
    """One parameter's value checked against its annotation and for NaN / inf; ints of a float one as floats."""
    default = f" (or leave it out: default {defaults[name]!r})" if name in defaults else ""
    if hint is not None and not fits(value, hint):
        raise ParameterError(f"{owner}: {name} must be {describe(hint)}, got {_short(value)}{default}")
    if hint is float and isinstance(value, int):
        value = _as_float(value)
    bad = count_non_finite(value)
    if bad:
        found = (
            f"{name}={value!r} is not a finite number" if isinstance(value, float) else f"{name} holds {bad} NaN or inf"
        )
        raise ParameterError(f"{owner}: {found}; pass a finite {name}{default}")
    return value


def check_params(
    owner: str,
    given: Mapping[str, Any],
    accepted: Mapping[str, Any] | Sequence[str],
    *,
    context: Collection[str] = (),
    fn: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """``given`` bound as the parameters of ``owner``: accepted names, plain numbers, annotated types, finite.

    ``accepted`` is the entry's parameters (a mapping to their defaults, named in the errors, or only the
    names); ``fn``, the entry's function, gives the annotations that values must fit. Values under
    ``context`` names (targets, data) are someone else's to check and pass unchanged.
    """
    if not given:
        return {}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise MethodError(f"{owner} got unknown parameter(s) {unknown}; it accepts {sorted(accepted) or 'none'}")
    defaults = accepted if isinstance(accepted, Mapping) else {}
    hints = parameter_types(fn) if fn is not None and given else {}
    return {
        name: value if name in context else _bound(owner, name, plain(value), hints.get(name), defaults)
        for name, value in given.items()
    }


__all__ = ["all_finite", "check_params", "count_non_finite", "describe", "fits", "parameter_types", "plain"]
