"""KV eviction policies: what each one scores and keeps, as entries of ``KV_POLICIES`` that hold the behaviour."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.fractions import removed_share
from whatmatters.core.registry import Registry, keyword_defaults

if TYPE_CHECKING:
    pass


from whatmatters.compress.kvcache.layout import AttentionLayout, causal_attention, rotated_queries


# --------------------------------------------------------------------------------------------- state
@dataclass
class _LayerState:
    cache: Any  # weakref to the cache object
    budget: int
    kept: torch.Tensor  # (b, n_kv, n) original positions of the entries the last eviction (or prefill) left
    seen: int  # tokens seen by this cache layer
    acc: torch.Tensor | None = None  # heavy_hitter: accumulated attention (b, n_kv, cache_len)
    hist: torch.Tensor | None = None  # scissorhands: important counts of the last queries (b, n_kv, w, cache_len)
    scores: torch.Tensor | None = None  # prefill scores (b, n_kv, prompt_len) when recording
    since: int = field(init=False)  # ``seen`` when ``kept`` was set: later tokens follow in order (not stored)

    def __post_init__(self) -> None:
        self.since = self.seen

    @property
    def length(self) -> int:
        """Number of cached entries."""
        return self.kept.shape[-1] + self.seen - self.since

    @property
    def positions(self) -> torch.Tensor:
        """``(b, n_kv, cache_len)``: the original position of every cached entry."""
        if self.seen == self.since:
            return self.kept
        new = torch.arange(self.since, self.seen, device=self.kept.device).expand(*self.kept.shape[:2], -1)
        return torch.cat([self.kept, new], dim=-1)

    @positions.setter
    def positions(self, value: torch.Tensor) -> None:
        self.kept, self.since = value, self.seen


@dataclass
class _Call:
    """One attention call: what a policy may use to score the cached positions of one layer."""

    arch: AttentionLayout
    module: nn.Module
    hidden: torch.Tensor
    kwargs: dict[str, Any]
    keys: torch.Tensor  # (b, n_kv, k_len, d), the whole cache layer after this call's update
    values: torch.Tensor
    _q: torch.Tensor | None = None
    _full: torch.Tensor | None = None

    def queries(self, last: int | None = None) -> torch.Tensor:
        if self._q is not None:
            return self._q if last is None else self._q[:, :, -last:]
        if last is None or last >= self.hidden.shape[1]:
            self._q = rotated_queries(self.arch, self.module, self.hidden, self.kwargs)
            return self._q
        kwargs = self.kwargs
        if kwargs.get("position_embeddings") is not None:  # only the last queries: slice their cos / sin too
            kwargs = {**kwargs, "position_embeddings": tuple(t[:, -last:] for t in kwargs["position_embeddings"])}
        return rotated_queries(self.arch, self.module, self.hidden[:, -last:].contiguous(), kwargs)

    def attention(self, last: int | None = None) -> torch.Tensor:
        """Attention of this call's (last ``last``) queries over the cache, ``(b, n_kv, group, q, k_len)``."""
        if self._full is not None:
            return self._full if last is None else self._full[..., -last:, :]
        att = causal_attention(self.queries(last), self.keys, float(self.module.scaling))
        if last is None:
            self._full = att
        return att


def _window(size: int, k_len: int) -> int:
    return max(1, min(int(size), k_len - 1))


def _pin(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Give the positions in ``keep`` (bool, broadcast over ``scores``) a score above every other one."""
    top = scores.masked_fill(keep, float("-inf")).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.where(keep, top + 1, scores)


def _score_knorm(call: _Call, p: dict[str, Any], budget: int, state: _LayerState) -> torch.Tensor:
    return -call.keys.float().norm(dim=-1)


def _score_sink_recent(call: _Call, p: dict[str, Any], budget: int, state: _LayerState) -> torch.Tensor:
    k_len = call.keys.shape[2]
    n_sink = min(int(p["n_sink"]), budget)
    idx = torch.arange(k_len, device=call.keys.device)
    keep = (idx < n_sink) | (idx >= k_len - (budget - n_sink))
    # ties broken towards recent positions; kept positions scored 1, evicted 0
    return keep.to(torch.float32).expand(*call.keys.shape[:2], k_len).clone()


def _window_votes(call: _Call, window: int) -> torch.Tensor:
    """Mean attention of the last ``window`` queries per query head: ``(b, n_kv, group, k_len)``."""
    return call.attention(window).mean(dim=-2)


def _score_snapkv(call: _Call, p: dict[str, Any], budget: int, state: _LayerState) -> torch.Tensor:
    k_len = call.keys.shape[2]
    window = _window(p["window_size"], k_len)
    votes = _window_votes(call, window)[..., : k_len - window]
    b, n_kv, group, n = votes.shape
    kernel = int(p["kernel_size"])
    flat = votes.reshape(b * n_kv * group, 1, n)
    if p["pooling"] == "max":
        pooled = F.max_pool1d(flat, kernel_size=kernel, padding=kernel // 2, stride=1)
    else:
        pooled = F.avg_pool1d(flat, kernel_size=kernel, padding=kernel // 2, stride=1)
    scores = pooled.reshape(b, n_kv, group, -1)[..., :n].mean(dim=2)
    scores = F.pad(scores, (0, window))
    in_window = torch.arange(k_len, device=scores.device) >= k_len - window
    return _pin(scores, in_window)


def _accumulated(call: _Call) -> torch.Tensor:
    """Attention each cached position received from this call's queries, summed over the group: (b, n_kv, k)."""
    return call.attention().sum(dim=(2, 3))


def _score_ems(call: _Call, p: dict[str, Any], budget: int, state: _LayerState) -> torch.Tensor:
    k_len = call.keys.shape[2]
    q_len = call.hidden.shape[1]
    window = _window(p["window_size"], k_len)
    # global: mean attention received over the queries that can see the position (causal normalisation)
    seen_by = (k_len - torch.arange(k_len, device=call.keys.device)).clamp(max=q_len).clamp(min=1)
    glob = _accumulated(call) / seen_by
    local = _window_votes(call, window).mean(dim=2)
    glob = glob / glob.sum(-1, keepdim=True).clamp_min(1e-12)
    local = local / local.sum(-1, keepdim=True).clamp_min(1e-12)
    scores = float(p["alpha"]) * glob + (1 - float(p["alpha"])) * local
    in_window = torch.arange(k_len, device=scores.device) >= k_len - window
    return _pin(scores, in_window)


def _recent_keep(scores: torch.Tensor, n_recent: int) -> torch.Tensor:
    k_len = scores.shape[-1]
    return _pin(scores, torch.arange(k_len, device=scores.device) >= k_len - n_recent) if n_recent > 0 else scores


def _important_counts(call: _Call, last: int) -> torch.Tensor:
    """Scissorhands: for each of the last ``last`` queries, how many query heads of each KV group gave each
    cached position more than the uniform attention ``1 / (positions the query sees)``: ``(b, n_kv, last, k)``."""
    att = call.attention(last)  # (b, n_kv, group, last, k_len); future positions have weight 0
    k_len = att.shape[-1]
    visible = torch.arange(k_len - last + 1, k_len + 1, device=att.device, dtype=att.dtype)
    return (att > (1.0 / visible)[:, None]).sum(dim=2, dtype=torch.int16)


def _score_scissorhands(call: _Call, p: dict[str, Any], n_keep: int, state: _LayerState) -> torch.Tensor:
    """Counts of "important" occurrences over the history window, ties broken towards recent positions;
    the ``recent_window`` most recent positions are kept."""
    hist = state.hist
    k_len = hist.shape[-1]
    counts = hist.sum(dim=2, dtype=torch.float32)
    scores = counts + torch.arange(k_len, device=hist.device, dtype=torch.float32) / (2 * k_len)
    return _recent_keep(scores, min(int(p["recent_window"]), n_keep))


def _score_heavy_hitter(call: _Call, p: dict[str, Any], budget: int, state: _LayerState) -> torch.Tensor:
    acc = state.acc if state.acc is not None else _accumulated(call)
    return _recent_keep(acc, int(budget * float(p["recent_ratio"])))


def _start_heavy_hitter(state: _LayerState, call: _Call, p: dict[str, Any]) -> None:
    state.acc = _accumulated(call)


def _decode_heavy_hitter(state: _LayerState, call: _Call, p: dict[str, Any], q_len: int) -> None:
    state.acc = F.pad(state.acc, (0, q_len)) + _accumulated(call)


def _start_scissorhands(state: _LayerState, call: _Call, p: dict[str, Any]) -> None:
    state.hist = _important_counts(call, _window(p["history_window"], call.keys.shape[2] + 1))


def _decode_scissorhands(state: _LayerState, call: _Call, p: dict[str, Any], q_len: int) -> None:
    rows = torch.cat([F.pad(state.hist, (0, q_len)), _important_counts(call, q_len)], dim=2)
    state.hist = rows[:, :, -int(p["history_window"]) :]


def _chunk_keep(budget: int, p: dict[str, Any]) -> int:
    """Scissorhands: entries kept when the cache exceeds its budget (``chunk_ratio`` of it dropped at once)."""
    return max(1, budget - max(1, int(budget * float(p["chunk_ratio"]))))


def _policy_name(policy: Any) -> str:
    """The canonical policy name (aliases resolved); an unknown name lists the KV methods."""
    return KV_POLICIES.get(policy).name


def _validate(policy: str, params: dict[str, Any]) -> dict[str, Any]:
    policy = _policy_name(policy)
    allowed = KV_POLICIES.get(policy).defaults
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise MethodError(
            f"policy {policy!r} has no parameter(s) {', '.join(unknown)}; "
            f"its parameters are {', '.join(allowed) or 'none'}"
        )
    p = {**allowed, **params}
    for key in ("window_size", "kernel_size"):
        if key in p and (isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1):
            raise InputError(f"{key} must be a positive integer, got {p[key]!r}")
    if "kernel_size" in p and p["kernel_size"] % 2 == 0:
        raise InputError(f"kernel_size must be odd (centred pooling), got {p['kernel_size']}")
    if "pooling" in p and p["pooling"] not in ("avg", "max"):
        raise InputError(f"pooling must be 'avg' or 'max', got {p['pooling']!r}")
    if "n_sink" in p and (isinstance(p["n_sink"], bool) or not isinstance(p["n_sink"], int) or p["n_sink"] < 0):
        raise InputError(f"n_sink must be a non-negative integer, got {p['n_sink']!r}")
    for key in ("history_window", "recent_window"):
        if key in p and (isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < (key == "history_window")):
            raise InputError(
                f"{key} must be a {'positive' if key == 'history_window' else 'non-negative'} integer, got {p[key]!r}"
            )
    for key in ("recent_ratio", "alpha", "chunk_ratio"):
        if key in p and not (isinstance(p[key], (int, float)) and 0 <= p[key] <= 1):
            raise InputError(f"{key} must be a number in [0, 1], got {p[key]!r}")
    return p


def _check_ratio(compression_ratio: Any) -> float:
    return removed_share(compression_ratio, "compression_ratio", of="cached positions", example="0.5")


def _keep_budget(budget: int, p: dict[str, Any]) -> int:
    return budget


@dataclass(frozen=True)
class Policy:
    """A KV eviction policy: its registered scorer (parameters, documentation) and its behaviour.

    ``score(call, params, n_keep, state)`` scores the cached positions of one layer, ``(b, n_kv, k_len)``;
    ``start`` / ``decode`` keep per-layer state at the prefill / while decoding; ``n_keep(budget, params)``
    is how many entries an eviction while decoding keeps; ``merge``: evicted values may be merged.
    """

    name: str
    fn: Callable[..., Any]
    score: Callable[..., torch.Tensor]
    aliases: tuple[str, ...] = ()
    start: Callable[..., None] | None = None
    decode: Callable[..., None] | None = None
    n_keep: Callable[[int, dict[str, Any]], int] = _keep_budget
    merge: bool = False
    units: tuple[str, ...] = ("kv",)

    @property
    def defaults(self) -> dict[str, Any]:
        return keyword_defaults(self.fn, skip=("compression_ratio",))

    @property
    def header(self) -> str:
        return f"{self.name} (KV eviction policy)"


KV_POLICIES = Registry(
    "KV eviction policy",
    listing="whatmatters.methods(unit='kv') lists them; whatmatters.describe(name) shows their parameters",
    show_names=True,
)


def _policy(name: str, score: Callable[..., torch.Tensor], aliases: tuple[str, ...] = (), **behaviour: Any):
    """Register a KV policy as a compress scorer of unit ``kv`` and as a policy entry with its behaviour."""
    from whatmatters.core.registry import scorer

    def register(fn):
        KV_POLICIES.add(Policy(name, fn, score, aliases, **behaviour))
        return scorer(
            name, verb="compress", units="kv", family="kv_cache", needs="module", per_sample=True, aliases=aliases
        )(fn)

    return register
