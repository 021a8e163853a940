"""Scorers and metrics registered by name, so every verb can find them."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from whatmatters.core.errors import MethodError
from whatmatters.core.importance import Importance


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
    checks_target: bool = False  # checks a given target on its own first forward: make_task needs no probe row
    class_agnostic: bool = False  # reads no target: with target=None, no prediction is made to choose one
    predicts_target: bool = False  # target=None: its own forward on the samples picks the predicted class
    # unit -> the function that scores that unit where it is not ``fn`` (``"token"``: it takes a TextTask)
    variants: dict[str, Callable[..., Any]] = field(default_factory=dict, compare=False, hash=False)

    def fn_for(self, unit: str | None) -> Callable[..., Any]:
        """The function that scores ``unit`` (``fn`` unless a variant is registered for it)."""
        return self.variants.get(unit, self.fn) if unit is not None else self.fn

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n\n")[0].replace("\n", " ")

    @property
    def defaults(self) -> dict[str, Any]:
        """Keyword parameters the method accepts, with their defaults."""
        return keyword_defaults(self.fn)

    @property
    def header(self) -> str:
        return f"{self.name} ({self.verb}, family {self.family}, units {', '.join(self.units)}, needs {self.needs})"

    def to_importance(
        self,
        out: Any,
        *,
        unit: str,
        names: Any = None,
        params: dict[str, Any],
        seed: int,
        seconds: float,
        target: Any = None,
    ) -> Importance:
        """The one builder of a scorer's result: ``out`` is ``values`` or ``(values, extra)``.

        ``extra["names"]``, when a scorer names its own units (feature groups, blocks, channels), replaces
        ``names``, ``extra["unit"]`` replaces ``unit`` (a layer attribution's ``"neuron"``); the parameters
        recorded are the method's defaults updated with ``params``.
        """
        values, extra = out if isinstance(out, tuple) else (out, {})
        extra = dict(extra)
        if "names" in extra:
            names = list(extra.pop("names"))
        unit = extra.pop("unit", unit)
        return Importance(
            values=values,
            unit=unit,
            names=names,
            per_sample=self.per_sample,
            method=self.name,
            params={**self.defaults, **params},
            target=target,
            seed=seed,
            seconds=seconds,
            extra=extra,
        )


def keyword_defaults(fn: Callable[..., Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A function's keyword-only parameters with defaults (less ``skip``): an entry's parameters."""
    return dict(_keyword_defaults(fn, skip))


@functools.lru_cache(maxsize=1024)  # read on every call of a method: inspect.signature costs tens of µs
def _keyword_defaults(fn: Callable[..., Any], skip: tuple[str, ...]) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty and name not in skip
    }


@dataclass
class Registry:
    """Entries by name (scorers, metrics, KV policies, ...): add, get with "did you mean", list, describe.

    ``packages`` are imported on first use, so that every module in them registers its entries. An entry
    has ``name``, ``aliases``, ``fn`` (its documentation), ``defaults`` (its parameters) and ``header``.
    """

    kind: str
    packages: tuple[str, ...] = ()
    listing: str = ""  # how a user lists the entries (default: whatmatters.<kind>s())
    show_names: bool = False  # unknown names: list every entry in the error (small registries)
    entries: dict[str, Any] = field(default_factory=dict)
    alias_of: dict[str, str] = field(default_factory=dict)
    _loaded: bool = False

    def add(self, entry: Any) -> None:
        for key in (entry.name, *getattr(entry, "aliases", ())):
            if key in self.entries or key in self.alias_of:
                raise RuntimeError(f"{self.kind} {key!r} is registered twice")
        self.entries[entry.name] = entry
        for alias in getattr(entry, "aliases", ()):
            self.alias_of[alias] = entry.name

    def extend(self, name: str, unit: str, fn: Callable[..., Any], aliases: tuple[str, ...] = ()) -> None:
        """Entry ``name`` also scores ``unit``, with ``fn`` (a :class:`Method`'s ``variants``); ``aliases`` added."""
        entry = self.entries[name]
        for alias in aliases:
            if alias in self.entries or alias in self.alias_of:
                raise RuntimeError(f"{self.kind} {alias!r} is registered twice")
            self.alias_of[alias] = name
        units = entry.units if unit in entry.units else (*entry.units, unit)
        self.entries[name] = replace(
            entry, units=units, aliases=(*entry.aliases, *aliases), variants={**entry.variants, unit: fn}
        )

    def load(self) -> None:
        """Import every module of ``packages`` (once)."""
        if self._loaded:
            return
        from whatmatters.core.discover import import_submodules

        for package in self.packages:
            import_submodules(package)
        self._loaded = True

    def get(self, name: str) -> Any:
        self.load()
        key = self.alias_of.get(name, name) if isinstance(name, str) else name
        if key not in self.entries:
            known = sorted([*self.entries, *self.alias_of])
            close = difflib.get_close_matches(str(name), known, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            choose = f" Choose one of {', '.join(self.entries)}." if self.show_names else ""
            listing = self.listing or f"whatmatters.{self.kind}s() lists the available ones"
            raise MethodError(f"unknown {self.kind} {name!r}.{hint}{choose} {listing}.")
        return self.entries[key]

    def names(self, unit: str | None = None, **attributes: Any) -> list[str]:
        """Sorted names of the entries for ``unit`` (in their ``units``) whose attributes equal the given ones."""
        self.load()
        return sorted(
            e.name
            for e in self.entries.values()
            if (unit is None or unit in e.units)
            and all(value is None or getattr(e, key) == value for key, value in attributes.items())
        )

    def describe(self, name: str) -> str:
        """An entry's header line, its parameters with their defaults, and its documentation."""
        e = self.get(name)
        params = ", ".join(f"{k}={v!r}" for k, v in e.defaults.items()) or "none"
        text = f"{e.header}\nparameters: {params}\n\n{inspect.getdoc(e.fn) or ''}"
        for unit, fn in getattr(e, "variants", {}).items():
            if fn is not e.fn:
                shown = ", ".join(f"{k}={v!r}" for k, v in keyword_defaults(fn).items()) or "none"
                text += f"\n\non {unit}s (parameters: {shown}):\n{inspect.getdoc(fn) or ''}"
        return text


VERB_PACKAGES = ("explain", "compress", "tune", "curate")
SCORERS = Registry("method", tuple(f"whatmatters.{verb}" for verb in VERB_PACKAGES))


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
    checks_target: bool = False,
    class_agnostic: bool = False,
    predicts_target: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as a scorer called ``name``.

    The function's keyword-only parameters are the method's parameters; their defaults are the
    method's defaults and appear in ``whatmatters.describe(name)``. ``checks_target``: every model output
    the method reads goes through ``Task.forward_target`` / ``Task.check_first_outputs``, so a given target
    is range-checked on the method's own forward instead of a probe row. ``class_agnostic``: the scores do
    not depend on the target, so ``target=None`` makes no prediction to choose one. ``predicts_target`` (with
    ``checks_target``): the method's first forward runs every sample itself and reads the target through
    ``Task.targets_for``, so ``target=None`` takes the predicted class from that forward (no separate prediction).
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        unit_tuple = (units,) if isinstance(units, str) else tuple(units)
        flags = {"checks_target": checks_target, "class_agnostic": class_agnostic, "predicts_target": predicts_target}
        SCORERS.add(Method(name, fn, verb, unit_tuple, family, needs, per_sample, aliases, extras, **flags))
        return fn

    return register


def methods(unit: str | None = None, verb: str | None = None, family: str | None = None) -> list[str]:
    """Names of the registered methods, optionally those for one unit, verb or family."""
    return SCORERS.names(unit, verb=verb, family=family)


def get_method(name: str) -> Method:
    return SCORERS.get(name)


def describe(name: str) -> str:
    """A method's documentation, units, family and default parameters."""
    return SCORERS.describe(name)
