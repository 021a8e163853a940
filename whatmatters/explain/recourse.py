"""Feature responsiveness scores for recourse: can a person reach the desired prediction by changing one feature?

For an individual ``x`` and a feature ``j``, the responsiveness score is the fraction of the feasible
values of ``j`` (those the person can actually move to, under user-declared actionability
constraints) for which changing *only* feature ``j`` gives the desired prediction. Immutable
features and features no feasible change of which reaches the target score 0; a person with no
responsive feature has no single-feature recourse (a "fixed" prediction for single changes).

Reference: S. H. Cheon, A. Wernerfelt, S. Friedler, B. Ustun, "Feature Responsiveness Scores:
Model-Agnostic Explanations for Recourse" (ICLR 2025, arXiv:2410.22598). Their reachable sets come from
enumerated or sampled actions; here every feature has a finite grid of candidate values and the
score is the fraction of the grid that reaches the target (the grid is built from the background
data's quantiles, so common values weigh like in the data).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from whatmatters.core.adapters import row_slices
from whatmatters.core.errors import InputError, TargetError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task, progress_bar

DIRECTIONS = ("any", "increase", "decrease")
# (person, feature, candidate) cells handled at once: bounds the memory of the feasibility table
_BLOCK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Actionability:
    """What a person can do to one feature.

    Attributes:
        mutable: ``False`` for features nobody can change (age, past events): no recourse through them.
        direction: ``"any"``, or ``"increase"`` / ``"decrease"`` only (monotone actions).
        lo, hi: bounds of the values the feature can take (default: the background data's range).
        integer: values are whole numbers (counts, years).
        values: the allowed values (categorical or ordinal features); the candidates are these.
        step: candidates on the grid ``lo, lo + step, lo + 2 step, ... <= hi``.

    Without ``values`` or ``step`` the candidates are ``n_values`` quantiles of the background
    values within the bounds (all of them when at most ``n_values`` are distinct; an even grid when
    none is) plus the bounds given.
    """

    mutable: bool = True
    direction: str = "any"
    lo: float | None = None
    hi: float | None = None
    integer: bool = False
    values: tuple[float, ...] | None = None
    step: float | None = None

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise InputError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        for name in ("lo", "hi", "step"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float, np.number)) and math.isfinite(v)):
                raise InputError(f"{name} must be a finite number, got {v!r}")
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            raise InputError(f"lo ({self.lo}) is above hi ({self.hi})")
        if self.step is not None and self.step <= 0:
            raise InputError(f"step must be positive, got {self.step}")
        if self.values is not None:
            if self.step is not None:
                raise InputError("give either values or step, not both")
            try:
                vals = tuple(float(v) for v in self.values)
            except (TypeError, ValueError):
                raise InputError(
                    f"values must be numbers (encode categories as numbers), got {self.values!r}"
                ) from None
            if not vals or not all(math.isfinite(v) for v in vals):
                raise InputError("values must be a non-empty list of finite numbers")
            object.__setattr__(self, "values", vals)


IMMUTABLE = Actionability(mutable=False)
_SHORTHANDS = {
    "immutable": IMMUTABLE,
    "any": Actionability(),
    "increase": Actionability(direction="increase"),
    "decrease": Actionability(direction="decrease"),
}


def _constraint(value: Any, feature: str) -> Actionability:
    if isinstance(value, Actionability):
        return value
    if isinstance(value, str) and value in _SHORTHANDS:
        return _SHORTHANDS[value]
    if isinstance(value, Mapping):
        try:
            return Actionability(**value)
        except TypeError as err:
            raise InputError(f"constraint for {feature!r}: {err}") from None
    raise InputError(
        f"constraint for {feature!r} must be an Actionability, a dict of its fields or one of "
        f"{sorted(_SHORTHANDS)}, got {value!r}"
    )


def resolve_constraints(
    constraints: Mapping[Any, Any] | None, names: Sequence[str] | None, d: int
) -> list[Actionability]:
    """One :class:`Actionability` per feature; features not mentioned can change freely within the data's range."""
    out = [_SHORTHANDS["any"]] * d
    if constraints is None:
        return out
    if not isinstance(constraints, Mapping):
        raise InputError("constraints must be a dict {feature name or index: Actionability | 'immutable' | ...}")
    labels = list(names) if names is not None else [str(i) for i in range(d)]
    for key, value in constraints.items():
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if not 0 <= key < d:
                raise InputError(f"constraint for feature index {key}, but there are {d} features (0..{d - 1})")
            j = int(key)
        elif str(key) in labels:
            j = labels.index(str(key))
        else:
            close = difflib.get_close_matches(str(key), labels, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise InputError(f"constraint for unknown feature {key!r}.{hint} Features: {labels[:20]}")
        out[j] = _constraint(value, labels[j])
    return out


def candidate_grid(c: Actionability, column: torch.Tensor, n_values: int) -> torch.Tensor:
    """Sorted distinct candidate values of one feature, from its constraint and background column."""
    dtype = column.dtype
    if not c.mutable:
        return column.new_empty(0)
    data_lo, data_hi = float(column.min()), float(column.max())
    lo = c.lo if c.lo is not None else (data_lo if c.hi is None else min(data_lo, c.hi))
    hi = c.hi if c.hi is not None else max(data_hi, lo)
    if c.values is not None:
        grid = torch.tensor(c.values, dtype=dtype)
        if c.lo is not None or c.hi is not None:
            grid = grid[(grid >= lo) & (grid <= hi)]
    elif c.step is not None:
        count = math.floor((hi - lo) / c.step + 1e-9) + 1
        grid = lo + c.step * torch.arange(count, dtype=dtype)
    elif c.integer and math.floor(hi) - math.ceil(lo) + 1 <= n_values:
        grid = torch.arange(math.ceil(lo), math.floor(hi) + 1, dtype=dtype)
    else:
        inside = column[(column >= lo) & (column <= hi)]
        distinct = inside.unique()
        if len(inside) == 0:  # bounds outside the data: an even grid
            grid = torch.linspace(lo, hi, n_values, dtype=dtype)
        elif len(distinct) <= n_values:
            grid = distinct
        else:
            levels = torch.linspace(0, 1, n_values, dtype=torch.float64)
            grid = torch.quantile(inside.to(torch.float64), levels).to(dtype)
        ends = [v for v in (c.lo, c.hi) if v is not None]
        if ends:
            grid = torch.cat([grid, torch.tensor(ends, dtype=dtype)])
    if c.integer:
        grid = grid.round()
        grid = grid[(grid >= lo) & (grid <= hi)] if len(grid) else grid
    return grid.unique()


def _predicate(desired: Any, n_outputs: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``outputs (m, n_outputs) -> bool (m,)``: does a prediction reach the desired outcome?"""
    if callable(desired):

        def check(out: torch.Tensor) -> torch.Tensor:
            hit = torch.as_tensor(desired(out), device=out.device)
            if hit.shape != out.shape[:1]:
                raise InputError(
                    f"desired(outputs) must return one bool per row ({out.shape[0]}), got shape {tuple(hit.shape)}"
                )
            return hit.bool()

        return check
    if isinstance(desired, bool) or not isinstance(desired, (int, float, np.number)):
        raise TargetError(
            f"desired must be a class index, a threshold (one-output models) or a callable, got {desired!r}"
        )
    if n_outputs == 1:
        threshold = float(desired)
        return lambda out: out[:, 0] >= threshold
    if float(desired) != int(desired) or not 0 <= int(desired) < n_outputs:
        raise TargetError(
            f"desired class {desired!r} is not an output of the model: it has {n_outputs} outputs, "
            f"indices 0..{n_outputs - 1}"
        )
    cls = int(desired)
    return lambda out: out.argmax(1) == cls


@scorer("responsiveness", family="recourse", units="feature", aliases=("feature_responsiveness",))
def responsiveness(
    task: Task,
    *,
    constraints: Mapping[Any, Any] | None = None,
    desired: Any = 1,
    n_values: int = 20,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Feature responsiveness for recourse: probability that changing one feature gives the desired prediction.

    For each person and feature, the fraction of the feature's feasible candidate values (other than
    the current one, within ``constraints``) at which the model's prediction is ``desired``, all other
    features unchanged.

    ``constraints``: ``{feature: Actionability | "immutable" | "increase" | "decrease" | dict}``
    (unmentioned features change freely within the background data's range). ``desired``: the
    class index for a model with several outputs (prediction = argmax), a threshold for a model
    with one output (reached when output >= threshold; 0.0 for a single logit, 0.5 for a
    probability), or a callable ``outputs (m, n_outputs) -> bool (m,)``. ``n_values``: number of
    quantile candidates per continuous feature. The explained ``target`` is not used.

    People already at the desired prediction need no recourse: their scores are 0 and
    ``extra["at_target"]`` marks them. ``extra["has_recourse"]`` tells, for everyone else, whether
    any single feature can reach the target; ``extra["n_feasible"]`` counts each feature's feasible values.
    """
    if isinstance(n_values, bool) or not isinstance(n_values, (int, np.integer)) or n_values < 2:
        raise InputError(f"n_values must be an int >= 2, got {n_values!r}")
    x = task.inputs
    if x.ndim != 2 or not x.is_floating_point():
        raise InputError(f"responsiveness needs tabular data of shape (n, features), got {tuple(x.shape)}")
    n, d = x.shape
    device = task.model.device
    background = (task.background if task.background is not None else x).to(x.dtype)
    rules = resolve_constraints(constraints, task.names, d)
    grids = [candidate_grid(c, background[:, j], int(n_values)) for j, c in enumerate(rules)]
    width = max((len(g) for g in grids), default=0)
    grid = torch.zeros(d, max(width, 1), dtype=x.dtype)
    valid = torch.zeros(d, max(width, 1), dtype=torch.bool)
    for j, g in enumerate(grids):  # d small tensors into one padded (features, candidates) table
        grid[j, : len(g)] = g
        valid[j, : len(g)] = True
    grid, valid, x_dev = grid.to(device), valid.to(device), x.to(device)
    direction = torch.tensor([DIRECTIONS.index(c.direction) for c in rules], device=device)[:, None]

    size = task.rows_per_call()
    current = torch.cat([task.model.predict(x[s], batch_size=size) for s in row_slices(n, size)])
    reach = _predicate(desired, current.shape[1])
    at_target = reach(current).to(device)

    # feasible (person, feature, candidate): a real change in the allowed direction; people at the
    # target are skipped. Blocks of people bound the memory of the (block, d, m) table.
    hits = torch.zeros(n, d, dtype=torch.float64, device=device)
    n_feasible = torch.zeros(n, d, dtype=torch.long, device=device)
    cand = grid.unsqueeze(0)  # (1, d, m)
    blocks = row_slices(n, max(1, _BLOCK_ELEMENTS // (d * grid.shape[1])))
    for b in progress_bar(blocks, len(blocks), "responsiveness", task.progress):
        xb = x_dev[b]
        value = xb.unsqueeze(2)  # (block, d, 1)
        feasible = valid.unsqueeze(0) & (cand != value)
        feasible &= (direction != 1) | (cand > value)
        feasible &= (direction != 2) | (cand < value)
        n_feasible[b] = feasible.sum(2)
        feasible &= ~at_target[b, None, None]
        person, feature, slot = feasible.nonzero(as_tuple=True)
        for s in row_slices(len(person), size):  # all single-feature changes, in full model batches
            rows = xb[person[s]].clone()
            rows[torch.arange(len(rows), device=device), feature[s]] = grid[feature[s], slot[s]]
            hit = reach(task.model.predict(rows, batch_size=size)).to(device, torch.float64)
            hits.index_put_((person[s] + b.start, feature[s]), hit, accumulate=True)
    scores = torch.where(n_feasible > 0, hits / n_feasible.clamp_min(1), torch.zeros_like(hits))
    scores = scores.masked_fill(at_target[:, None], 0.0)
    out_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float64
    extra = {
        "at_target": at_target.cpu(),
        "has_recourse": ((scores > 0).any(1) & ~at_target).cpu(),
        "n_feasible": n_feasible.cpu(),
        "grid_sizes": [len(g) for g in grids],
        "desired": desired if not callable(desired) else repr(desired),
    }
    return scores.to(out_dtype), extra
