"""Scorers and metrics registered by name, so every verb can find them."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from whatmatters.core.errors import MethodError


@dataclass(frozen=True)
class Method:
    """A registered scorer: its name, what it scores and what it needs from a model."""

    name: str
    fn: Callable[..., Any]
    verb: str
    units: tuple[str, ...]
    family: str
    needs: str = "predict"  # "predict" (any black box), "gradients" (torch), "module" (torch internals), "fit"
    per_sample: bool = True
    aliases: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()  # optional dependencies it imports, e.g. ("shap",)

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n\n")[0].replace("\n", " ")

    @property
    def defaults(self) -> dict[str, Any]:
        """Keyword parameters the method accepts, with their defaults."""
        sig = inspect.signature(self.fn)
        return {
            name: p.default
            for name, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
        }


@dataclass
class Registry:
    kind: str
    entries: dict[str, Any] = field(default_factory=dict)
    alias_of: dict[str, str] = field(default_factory=dict)

    def add(self, entry: Any) -> None:
        for key in (entry.name, *getattr(entry, "aliases", ())):
            if key in self.entries or key in self.alias_of:
                raise RuntimeError(f"{self.kind} {key!r} is registered twice")
        self.entries[entry.name] = entry
        for alias in getattr(entry, "aliases", ()):
            self.alias_of[alias] = entry.name

    def get(self, name: str) -> Any:
        key = self.alias_of.get(name, name)
        if key not in self.entries:
            known = sorted([*self.entries, *self.alias_of])
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise MethodError(
                f"unknown {self.kind} {name!r}.{hint} whatmatters.{self.kind}s() lists the available ones."
            )
        return self.entries[key]


SCORERS = Registry("method")


def scorer(
    name: str,
    *,
    verb: str = "explain",
    units: str | tuple[str, ...] = "feature",
    family: str,
    needs: str = "predict",
    per_sample: bool = True,
    aliases: tuple[str, ...] = (),
    extras: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as a scorer called ``name``.

    The function's keyword-only parameters are the method's parameters; their defaults are the
    method's defaults and appear in ``whatmatters.describe(name)``.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        unit_tuple = (units,) if isinstance(units, str) else tuple(units)
        SCORERS.add(Method(name, fn, verb, unit_tuple, family, needs, per_sample, aliases, extras))
        return fn

    return register


VERB_PACKAGES = ("explain", "compress", "tune", "curate")
_loaded = False


def _load_all() -> None:
    """Import every module that registers scorers (once)."""
    global _loaded
    if _loaded:
        return
    from whatmatters.core.discover import import_submodules

    for verb in VERB_PACKAGES:
        import_submodules(f"whatmatters.{verb}")
    _loaded = True


def methods(unit: str | None = None, verb: str | None = None, family: str | None = None) -> list[str]:
    """Names of the registered methods, optionally those for one unit, verb or family."""
    _load_all()
    return sorted(
        m.name
        for m in SCORERS.entries.values()
        if (unit is None or unit in m.units)
        and (verb is None or m.verb == verb)
        and (family is None or m.family == family)
    )


def get_method(name: str) -> Method:
    _load_all()
    return SCORERS.get(name)


def describe(name: str) -> str:
    """A method's documentation, units, family and default parameters."""
    m = get_method(name)
    params = ", ".join(f"{k}={v!r}" for k, v in m.defaults.items()) or "none"
    return (
        f"{m.name} ({m.verb}, family {m.family}, units {', '.join(m.units)}, needs {m.needs})\n"
        f"parameters: {params}\n\n{inspect.getdoc(m.fn) or ''}"
    )
