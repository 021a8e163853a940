"""D'Hondt proportional importance (DhondtXAI): integer "seats" for features in proportion to their importance.

Features (or alliances of features) are parties; their absolute importance scores are their votes. A
fixed number of seats is shared out with the D'Hondt highest-averages rule: every party's votes are
divided by 1, 2, 3, ...; the ``seats`` largest quotients win a seat each. An electoral threshold
(a fraction of all votes) keeps small parties out of the parliament. The seat counts are an
integer, proportional summary of any importance ("feature X holds 12 of 100 seats").

Reference: T. B. Dönmez, "Explainable AI through a democratic lens: DhondtXAI for proportional
feature importance using the D'Hondt method" (arXiv:2411.05196).
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.importance import Importance
from whatmatters.core.params import check_params
from whatmatters.core.registry import get_method, scorer
from whatmatters.core.task import Task


def _check_seats(seats: Any) -> int:
    if isinstance(seats, bool) or not isinstance(seats, (int, np.integer)):
        raise InputError(f"seats must be a whole number of seats (an int >= 1), got {seats!r}")
    if seats < 1:
        raise InputError(f"seats must be at least 1, got {seats}; a parliament needs a seat to share out")
    return int(seats)


def _check_threshold(threshold: Any) -> float:
    try:
        tau = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"threshold must be a fraction of the votes in [0, 1), got {threshold!r}") from None
    if not 0.0 <= tau < 1.0:
        raise InputError(
            f"threshold must be a fraction of the votes in [0, 1), got {threshold!r} (a 5 % threshold is 0.05)"
        )
    return tau


def _votes_and_names(importance: Any, how: str | None) -> tuple[torch.Tensor, list[str] | None, Importance | None]:
    """Votes ``(rows, units)`` (absolute scores), unit names and the source importance, if any."""
    if isinstance(importance, Importance):
        source = importance
        if len(importance.unit_shape) != 1:
            raise InputError(
                f"D'Hondt seats need one score per unit, not a {importance.unit_shape} grid; "
                "aggregate pixels into regions (or flatten the units) first"
            )
        if importance.per_sample:
            if how is not None:
                votes = importance.aggregate(how).values.unsqueeze(0)  # type: ignore[arg-type]
            else:
                votes = importance.values
        else:
            votes = importance.values.unsqueeze(0)
        names = list(importance.names) if importance.names is not None else None
    elif isinstance(importance, Mapping):
        source, names = None, [str(k) for k in importance]
        try:
            votes = torch.tensor([float(v) for v in importance.values()], dtype=torch.float64).unsqueeze(0)
        except (TypeError, ValueError):
            raise InputError("votes must be numbers: give {name: score, ...}") from None
    else:
        source, names = None, None
        try:
            votes = torch.as_tensor(np.asarray(importance, dtype=np.float64))
        except (TypeError, ValueError):
            raise InputError(
                f"cannot read votes from a {type(importance).__name__}: give an Importance, a dict or an array"
            ) from None
        if votes.ndim != 1:
            raise InputError(f"votes must be one-dimensional (one score per unit), got shape {tuple(votes.shape)}")
        votes = votes.unsqueeze(0)
    if votes.shape[-1] == 0:
        raise InputError("there are no units to give seats to")
    votes = votes.detach().abs()
    if not votes.is_floating_point():
        votes = votes.to(torch.float64)
    if not bool(torch.isfinite(votes).all()):
        raise InputError("the importance scores contain NaN or infinite values; D'Hondt needs finite votes")
    return votes, names, source


def _resolve(member: Any, names: list[str] | None, n: int) -> int:
    """Index of a feature given by name or position."""
    if isinstance(member, (int, np.integer)) and not isinstance(member, bool):
        if not 0 <= member < n:
            raise InputError(f"feature index {member} is out of range: there are {n} features (0..{n - 1})")
        return int(member)
    key = str(member)
    if names is not None and key in names:
        return names.index(key)
    known = names if names is not None else [str(i) for i in range(n)]
    if names is None and key in known:
        return known.index(key)
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise InputError(f"unknown feature {key!r} in groups/exclude.{hint} Known features: {known[:20]}")


def _parties(
    names: list[str] | None, n: int, groups: Mapping[str, Sequence[Any]] | None
) -> tuple[list[str] | None, torch.Tensor | None, list[list[int]]]:
    """Party names, the (parties, features) membership matrix (None: one party per feature) and members."""
    if not groups:  # every feature is its own party
        return names, None, [[i] for i in range(n)]
    if not isinstance(groups, Mapping):
        raise InputError("groups must be a dict {group name: [feature names or indices], ...}")
    labels = names if names is not None else [str(i) for i in range(n)]
    owner: dict[int, str] = {}
    members = []
    for group, group_members in groups.items():
        if isinstance(group_members, (str, bytes)) or not isinstance(group_members, Sequence):
            raise InputError(f"group {group!r} must list its features, e.g. [{labels[0]!r}, ...]")
        if len(group_members) == 0:
            raise InputError(f"group {group!r} has no features")
        idx = []
        for m in group_members:
            i = _resolve(m, names, n)
            if i in owner:
                raise InputError(f"feature {labels[i]!r} is in two groups ({owner[i]!r} and {group!r}); give it one")
            owner[i] = str(group)
            idx.append(i)
        members.append(idx)
    rest = [i for i in range(n) if i not in owner]
    party_names = [str(g) for g in groups] + [labels[i] for i in rest]
    clash = sorted({p for p in party_names if party_names.count(p) > 1})
    if clash:
        raise InputError(f"group name(s) {clash} equal the name of a feature outside the group; rename the group")
    members += [[i] for i in rest]
    membership = torch.zeros(len(members), n, dtype=torch.float64)
    for p, idx in enumerate(members):
        membership[p, idx] = 1.0
    return party_names, membership, members


def allocate(votes: torch.Tensor, seats: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """D'Hondt seats for each row of ``votes`` ``(rows, parties)`` (non-negative); integer tensor, same shape.

    The ``seats`` largest quotients ``votes / 1, votes / 2, ...`` of a row win a seat each. Ties
    between equal quotients go to the party with more votes, then to the party that comes first.
    Parties outside ``eligible`` (and parties without votes) win nothing; rows without any eligible
    votes get no seats.

    Vectorized over rows without the full ``parties x seats`` quotient table: D'Hondt never gives a
    party fewer than ``floor(seats * share)`` seats (lower quota) nor more than
    ``floor((seats + parties) * share)``, so those seats are given at once and only the at most
    ``~4 x parties`` quotients in between are ranked (one batched sort).
    """
    rows, parties = votes.shape
    device, dtype = votes.device, votes.dtype
    if eligible is not None:
        votes = votes.masked_fill(~eligible.to(device), 0)
    order = torch.argsort(votes, dim=1, descending=True, stable=True)  # tie order: more votes, then position
    ordered = votes.gather(1, order)
    total = ordered.sum(1, keepdim=True)
    n_voted = (ordered > 0).sum(1, keepdim=True)
    share = torch.where(total > 0, ordered / total.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(ordered))
    # sure seats (one less than the lower quota, for rounding) and an upper bound (one more, likewise)
    sure = (share * seats).floor().sub(1).clamp_min(0).long()
    upper = (share * (seats + n_voted)).floor().add(1).long().where(ordered > 0, torch.zeros_like(sure))
    upper = torch.maximum(upper, sure)
    remaining = seats - sure.sum(1)  # seats still to give in each row
    counts = (upper - sure).reshape(-1)
    owner = torch.repeat_interleave(torch.arange(rows * parties, device=device), counts)  # candidate -> party
    first = torch.cumsum(counts, 0) - counts
    divisor = sure.reshape(-1)[owner] + 1 + (torch.arange(len(owner), device=device) - first[owner])
    quotient = ordered.reshape(-1)[owner] / divisor.to(dtype)
    # one padded row of candidates per election, in tie order; a batched sort ranks them
    row = torch.div(owner, parties, rounding_mode="floor")
    per_row = (upper - sure).sum(1)
    slot = torch.arange(len(owner), device=device) - (torch.cumsum(per_row, 0) - per_row)[row]
    width = int(per_row.max()) if rows else 0
    table = torch.full((rows, max(width, 1)), -math.inf, dtype=dtype, device=device)
    table[row, slot] = quotient
    party = torch.zeros(rows, max(width, 1), dtype=torch.long, device=device)
    party[row, slot] = owner - row * parties
    ranked = torch.argsort(table, dim=1, descending=True, stable=True)
    wins = torch.arange(ranked.shape[1], device=device) < remaining.unsqueeze(1)
    wins &= table.gather(1, ranked) > -math.inf  # padding never wins (rows without votes)
    won = sure.scatter_add(1, party.gather(1, ranked), wins.long())
    return torch.zeros_like(won).scatter_(1, order, won)


def dhondt_seats(
    importance: Importance | Mapping[str, float] | Sequence[float] | torch.Tensor | np.ndarray,
    seats: int = 100,
    threshold: float = 0.0,
    groups: Mapping[str, Sequence[str | int]] | None = None,
    *,
    exclude: Sequence[str | int] = (),
    how: str | None = "mean_abs",
) -> Importance:
    """Share ``seats`` integer seats among features in proportion to their importance (D'Hondt).

    Args:
        importance: an :class:`Importance` over one axis of units (features, heads, layers, ...),
            or votes as ``{name: score}`` / a 1-D array. Votes are the absolute scores.
        seats: number of seats to share out (>= 1); they always add up to ``seats`` per row.
        threshold: electoral threshold as a fraction of all votes in ``[0, 1)`` (0.05 = 5 %):
            parties with a smaller share get no seats.
        groups: alliances ``{group: [feature names or indices]}``; a group's votes are the sum of
            its members' votes. Features in no group stand alone. Parties are the groups (in the
            given order) followed by the remaining features.
        exclude: features left out of the election: their votes do not count, and a party whose
            features are all excluded gets no seats.
        how: how a per-sample importance is reduced over samples before the election
            (see :meth:`Importance.aggregate`); ``None`` holds one election per sample.

    Ties between equal quotients go to the party with more votes, then to the party listed first.

    Returns:
        An :class:`Importance` of integer seat counts, one per party, with ``extra`` holding the
        ``votes``, vote ``shares``, ``eligible`` parties, the ``threshold``, the ``last_quotient``
        (votes one seat cost), the Gallagher disproportionality index (percentage points) and the
        ``groups`` (members of every party).
    """
    start = time.perf_counter()
    seats = _check_seats(seats)
    tau = _check_threshold(threshold)
    if how is not None and how not in ("mean_abs", "mean", "sum", "max_abs", "median"):
        raise InputError(f"unknown aggregation {how!r}; choose mean_abs, mean, sum, max_abs, median or None")
    votes, names, source = _votes_and_names(importance, how)
    if isinstance(exclude, (str, int, np.integer)):
        exclude = [exclude]
    n_features = votes.shape[-1]
    party_names, membership, members = _parties(names, n_features, groups)
    excluded = torch.zeros(n_features, dtype=torch.bool, device=votes.device)
    excluded[[_resolve(m, names, n_features) for m in exclude]] = True
    # excluded features' votes do not count; a party whose features are all excluded is out
    if membership is None:
        party_votes, counted, out = votes, votes.masked_fill(excluded, 0), excluded
    else:
        membership = membership.to(votes.dtype).to(votes.device)
        party_votes = votes @ membership.T  # (rows, parties)
        counted = votes.masked_fill(excluded, 0) @ membership.T
        out = membership.masked_fill(excluded, 0).sum(1) == 0
    total = counted.sum(1, keepdim=True)
    shares = counted / total.clamp_min(torch.finfo(votes.dtype).tiny)
    eligible = (~out) & (shares >= tau) & (counted > 0)
    empty = ~eligible.any(1)
    per_sample = source is not None and source.per_sample and how is None
    if bool(empty.any()) and not per_sample:
        if bool((total == 0).all()):
            raise InputError("every importance score is zero, so there are no votes to give seats for")
        raise InputError(
            f"threshold {tau} keeps every party out (the largest vote share is {float(shares.max()):.3g}); "
            "lower the threshold"
        )
    seat_counts = allocate(counted, seats, eligible)
    # votes one seat cost: the smallest winning quotient
    won = seat_counts > 0
    quotient = torch.where(won, counted / seat_counts.clamp_min(1), torch.full_like(counted, math.inf))
    last_quotient = quotient.amin(1)
    last_quotient = torch.where(empty, torch.full_like(last_quotient, math.nan), last_quotient)
    seat_share = seat_counts.to(votes.dtype) / seats
    gallagher = 100 * ((shares - seat_share) ** 2).sum(1).div(2).sqrt()
    values = seat_counts if per_sample else seat_counts[0]
    squeeze = (lambda t: t) if per_sample else (lambda t: t[0])
    labels = names if names is not None else [str(i) for i in range(n_features)]
    extra = {
        "votes": squeeze(party_votes).cpu(),
        "shares": squeeze(shares).cpu(),
        "eligible": squeeze(eligible).cpu(),
        "threshold": tau,
        "last_quotient": squeeze(last_quotient).cpu(),
        "gallagher": squeeze(gallagher).cpu(),
        "groups": {p: [labels[i] for i in idx] for p, idx in zip(party_names or labels, members)},
        "base": source.method if source is not None else None,
    }
    if per_sample:
        extra["unallocated"] = empty.nonzero().flatten().cpu()
    params = {
        "seats": seats,
        "threshold": tau,
        "groups": {str(k): list(v) for k, v in groups.items()} if groups else None,
        "exclude": list(exclude),
        "how": how,
    }
    return Importance(
        values=values,
        unit=source.unit if source is not None else "feature",
        names=party_names,
        per_sample=per_sample,
        method="dhondt",
        params={**(source.params if source is not None else {}), **params},
        target=source.target if source is not None else None,
        seed=source.seed if source is not None else None,
        seconds=time.perf_counter() - start + (source.seconds if source is not None else 0.0),
        extra=extra,
    )


@scorer("dhondt", family="apportionment", units="feature", per_sample=False, aliases=("dhondtxai",))
def dhondt(
    task: Task,
    *,
    base: str = "ablation",
    seats: int = 100,
    threshold: float = 0.0,
    groups: Mapping[str, Sequence[str | int]] | None = None,
    exclude: Sequence[str | int] = (),
    how: str | None = "mean_abs",  # None is refused below, with the function that takes it
    base_params: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """D'Hondt proportional importance (DhondtXAI): integer seats for features, by their importance.

    Runs the feature method ``base`` (with ``base_params``), reduces its scores over samples with
    ``how`` and shares ``seats`` seats out with the D'Hondt rule; ``threshold`` (fraction of the
    votes), alliances ``groups`` and ``exclude`` as in :func:`whatmatters.explain.dhondt.dhondt_seats`.
    """
    seats = _check_seats(seats)
    _check_threshold(threshold)
    if how is None:
        raise InputError("method 'dhondt' gives one parliament for all samples; use dhondt_seats(..., how=None)")
    info = get_method(base)
    if info.name == "dhondt":
        raise MethodError("dhondt cannot use itself as its base method; choose a feature method such as 'ablation'")
    if info.verb != "explain" or "feature" not in info.units:
        raise MethodError(f"base method {base!r} does not score features; choose one of whatmatters.methods('feature')")
    if info.needs in ("gradients", "module") and task.model.kind != "torch":
        raise ModelError(f"base method {base!r} needs a PyTorch nn.Module; choose a model-agnostic base")
    base_params = check_params(info.name, dict(base_params or {}), info.defaults, fn=info.fn)
    start = time.perf_counter()
    out = info.fn(task, **base_params)
    values, _ = out if isinstance(out, tuple) else (out, {})
    source = Importance(
        values=values,
        unit="feature",
        names=task.names,
        per_sample=info.per_sample,
        method=info.name,
        params={**info.defaults, **base_params},
        seconds=time.perf_counter() - start,
    )
    result = dhondt_seats(source, seats, threshold, groups, exclude=exclude, how=how)
    extra = {**result.extra, "base_params": source.params}
    if groups:
        extra["names"] = list(result.names or ())
    return result.values, extra
