"""KV-cache eviction during ``generate`` for decoder-only Hugging Face models, driven by importance scores.

``with kv_eviction(model, policy="snapkv", compression_ratio=0.5): model.generate(...)`` installs a
forward hook on every self-attention module. When an attention layer has just filled an empty cache layer
(the prefill), the hook scores every cached position per KV head and keeps the ``int(L * (1 -
compression_ratio))`` best ones (the same budget rule as kvpress); policies that evict while decoding
(``heavy_hitter``, ``sink_recent``) keep the cache at that budget after every generated token. Hooks are
removed on exit, even on error; weights are never touched. :func:`evict_scores` returns the scores
themselves as an :class:`~whatmatters.core.importance.Importance` with ``unit="kv"``.

Every policy is a registered ``compress`` scorer of unit ``kv`` (``whatmatters.methods(unit="kv")``;
``whatmatters.describe("snapkv")`` shows its parameters): ``whatmatters.compress.score(model, "snapkv",
data=input_ids)`` returns the prefill scores, values ``(n, n_layers, n_kv_heads, seq_len)``, the same as
:func:`evict_scores`. The registered signatures are the one source of the policies' parameters and
defaults (``POLICY_PARAMS`` is derived from them); aliases ``h2o`` and ``streaming_llm``.

Attention weights: the default sdpa attention does not return them, so the hook recomputes the queries
it needs from the attention module's input (``q_proj`` or GPT-2's ``c_attn``, Qwen3's ``q_norm``, RoPE
from the ``position_embeddings`` the model passes to the layer) and multiplies them with the cached
keys (already rotated). Grouped-query attention is handled by scoring with every query head and
aggregating the query heads of each KV group (the cache is stored per KV head, never expanded).

Policies (``compression_ratio`` = fraction of the prompt's positions removed):

* ``knorm`` — keep the keys with the smallest L2 norm (kvpress's KnormPress).
* ``sink_recent`` — StreamingLLM: the first ``n_sink`` positions and the most recent ones; evicts while
  decoding too (a rolling window).
* ``snapkv`` — SnapKV: the last ``window_size`` queries vote (mean attention), 1-D ``pooling`` over
  ``kernel_size`` positions, mean over the query heads of each KV group; the window is always kept.
* ``heavy_hitter`` — H2O: accumulated attention (sum over every query so far) plus a recent window of
  ``recent_ratio`` of the budget; the scores keep accumulating while decoding and one position is evicted
  per new token, so the cache stays at the budget.
* ``ems`` — after EMS (evict-then-merge): importance = ``alpha`` x global importance (attention a position
  receives, averaged over all queries that can see it) + ``(1 - alpha)`` x local importance (SnapKV-style
  window attention), each normalised per head; evicted positions are merged into the kept position of the
  same head whose key is most similar (values averaged with the importance as weights). Simplifications:
  every KV head of a layer keeps the same number of positions (a transformers cache is rectangular, so
  EMS's head-wise budgets are not reproduced: the head-wise part is the per-head choice of positions and
  of merge targets), and merging uses one nearest kept centre per evicted position.

* ``scissorhands`` — Scissorhands (persistence of importance): per head, how often a position received
  more than the uniform attention ``1/t`` over the last ``history_window`` queries, plus a
  ``recent_window``; while decoding the cache grows past the budget and is then cut in one chunk
  (``chunk_ratio`` of the budget dropped at once). See :func:`scissorhands` for what is simplified.

A cache that already holds entries when the block starts is compressed at its first call inside the
block, as if that were the prefill. Forward calls on an evicted cache without ``position_ids`` get the
true positions (tokens seen so far), not the cache length transformers would use.

Not supported: padded batches (an ``attention_mask`` with zeros — the padding mask would no longer line
up with the evicted cache), caches other than ``DynamicCache`` layers, sliding-window layers.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core import hf
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.fractions import removed_share
from whatmatters.core.importance import Importance
from whatmatters.core.registry import Registry, keyword_defaults
from whatmatters.core.state import hooks, preserved

if TYPE_CHECKING:
    from whatmatters.compress.api import WeightTask


# --------------------------------------------------------------------------------------------- model
@dataclass
class AttentionLayout:
    """Where the attention modules are and how to recompute their queries."""

    kind: str  # "rope" (Llama, Qwen2, Mistral, Qwen3, ...) or "gpt2"
    modules: list[nn.Module]
    n_heads: int
    n_kv_heads: int
    head_dim: int


def attention_layout(model: nn.Module) -> AttentionLayout:
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError("kv_eviction needs a Hugging Face transformers model (it has no .config)")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"kv_eviction supports decoder-only LMs; {type(model).__name__} is an encoder-decoder")
    base = getattr(model, "model", None)
    if base is not None and hasattr(base, "language_model"):
        base = base.language_model
    layers = getattr(base, "layers", None)
    if layers is not None and all(hasattr(getattr(lay, "self_attn", None), "q_proj") for lay in layers):
        attn = [lay.self_attn for lay in layers]
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        return AttentionLayout("rope", attn, n_heads, n_kv, attn[0].head_dim)
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is not None and all(hasattr(getattr(b, "attn", None), "c_attn") for b in blocks):
        attn = [b.attn for b in blocks]
        return AttentionLayout("gpt2", attn, attn[0].num_heads, attn[0].num_heads, attn[0].head_dim)
    raise ModelError(
        f"kv_eviction does not support {type(model).__name__}: it needs a decoder-only transformers LM whose "
        "layers are model.model.layers[i].self_attn with q_proj (Llama, Qwen2, Qwen3, Mistral, ...) or "
        "model.transformer.h[i].attn with c_attn (GPT-2)"
    )


def rotated_queries(
    arch: AttentionLayout, module: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    """The queries the module used, ``(batch, n_heads, q_len, head_dim)``, rotated as the model rotates them."""
    b, q_len, _ = hidden.shape
    if arch.kind == "gpt2":
        q = module.c_attn(hidden)[..., : module.embed_dim]
        return q.view(b, q_len, -1, arch.head_dim).transpose(1, 2)
    q = module.q_proj(hidden).view(b, q_len, -1, arch.head_dim)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    q = q.transpose(1, 2)
    position_embeddings = kwargs.get("position_embeddings")
    if position_embeddings is None:
        raise ModelError(
            f"{type(module).__name__} got no position_embeddings; kv_eviction needs the RoPE cos/sin the model "
            "passes to its attention layers (transformers >= 4.48)"
        )
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = q.shape[-1] // 2
    rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return q * cos + rotated * sin


def _attention(q: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal softmax attention of the last ``q_len`` positions over ``keys``: ``(b, n_kv, group, q_len, k_len)``.

    The queries are the last ``q_len`` positions of the cache; the KV heads are never repeated (GQA).
    """
    b, n_heads, q_len, d = q.shape
    n_kv, k_len = keys.shape[1], keys.shape[2]
    qg = q.reshape(b, n_kv, n_heads // n_kv, q_len, d).float()
    logits = torch.matmul(qg, keys.float().unsqueeze(2).transpose(-1, -2)) * scaling
    q_pos = torch.arange(k_len - q_len, k_len, device=q.device)
    future = torch.arange(k_len, device=q.device)[None, :] > q_pos[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


# ------------------------------------------------------------------------------------------ policies
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
        att = _attention(self.queries(last), self.keys, float(self.module.scaling))
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


# --------------------------------------------------------------------------------------------- state
@dataclass
class _LayerState:
    cache: Any  # weakref to the cache object
    budget: int
    positions: torch.Tensor  # (b, n_kv, cache_len) original position of every cached entry
    seen: int  # tokens seen by this cache layer
    acc: torch.Tensor | None = None  # heavy_hitter: accumulated attention (b, n_kv, cache_len)
    hist: torch.Tensor | None = None  # scissorhands: important counts of the last queries (b, n_kv, w, cache_len)
    scores: torch.Tensor | None = None  # prefill scores (b, n_kv, prompt_len) when recording


@dataclass
class KVEviction:
    """Handle yielded by :func:`kv_eviction`: the policy and the state of the current sequence.

    ``kept_positions()`` gives, per layer, the original positions ``(batch, n_kv_heads, cache_len)`` of
    the entries now in the cache; ``budgets`` the per-layer budget fixed at the prefill.
    """

    policy: str
    compression_ratio: float
    params: dict[str, Any]
    n_layers: int
    record: bool = False
    _layers: dict[int, _LayerState] = field(default_factory=dict)

    @property
    def budgets(self) -> dict[int, int]:
        return {i: s.budget for i, s in sorted(self._layers.items())}

    def kept_positions(self) -> dict[int, torch.Tensor]:
        return {i: s.positions for i, s in sorted(self._layers.items())}

    def prefill_scores(self) -> dict[int, torch.Tensor]:
        return {i: s.scores for i, s in sorted(self._layers.items()) if s.scores is not None}


def _merge(
    keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, order: torch.Tensor, n_keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """EMS merge: each evicted value joins the kept entry of its head with the most similar key."""
    keep, drop = order[..., :n_keep], order[..., n_keep:]
    d = keys.shape[-1]
    k_keep = keys.gather(2, keep[..., None].expand(-1, -1, -1, d))
    k_drop = keys.gather(2, drop[..., None].expand(-1, -1, -1, d))
    v_keep = values.gather(2, keep[..., None].expand(-1, -1, -1, d))
    v_drop = values.gather(2, drop[..., None].expand(-1, -1, -1, d))
    w_keep = scores.gather(2, keep).clamp_min(0).float()
    w_drop = scores.gather(2, drop).clamp_min(0).float()
    sim = F.normalize(k_drop.float(), dim=-1) @ F.normalize(k_keep.float(), dim=-1).transpose(-1, -2)
    target = sim.argmax(-1)  # (b, n_kv, n_drop)
    num = v_keep.float() * w_keep[..., None]
    num = num.scatter_add(2, target[..., None].expand(-1, -1, -1, d), v_drop.float() * w_drop[..., None])
    den = w_keep.scatter_add(2, target, w_drop)
    merged = torch.where(den[..., None] > 0, num / den.clamp_min(1e-12)[..., None], v_keep.float())
    return k_keep, merged.to(values.dtype)


class _Hook:
    """The forward hook of one attention layer."""

    def __init__(self, handle: KVEviction, arch: AttentionLayout, layer_idx: int) -> None:
        self.h, self.arch, self.idx = handle, arch, layer_idx

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        cache = hf.find_cache(kwargs)
        if cache is None:
            return output
        hidden = args[0] if args else kwargs["hidden_states"]
        q_len = hidden.shape[1]
        layer = hf.cache_layer(cache, self.idx, "kv_eviction")
        keys, values = layer.keys, layer.values
        h, p = self.h, self.h.params
        pol = KV_POLICIES.get(h.policy)
        state = h._layers.get(self.idx)
        prefill = keys.shape[2] == q_len
        if prefill or state is None or state.cache() is not cache:
            seen = keys.shape[2]  # a cache filled before the block is compressed as if this were its prefill
            budget = max(1, int(keys.shape[2] * (1 - h.compression_ratio)))
            pos = torch.arange(keys.shape[2], device=keys.device).expand(*keys.shape[:2], -1)
            state = _LayerState(weakref.ref(cache), budget, pos, seen)
            h._layers[self.idx] = state
            call = _Call(self.arch, module, hidden, kwargs, keys, values)
            if pol.start is not None:
                pol.start(state, call, p)
            if h.record:
                state.scores = pol.score(call, p, budget, state)
                return output
            if budget < keys.shape[2]:
                self._evict(layer, state, pol.score(call, p, budget, state), budget)
            return output
        # a later call on the same cache (decoding or a continuation chunk)
        new_pos = torch.arange(state.seen, state.seen + q_len, device=keys.device).expand(*keys.shape[:2], -1)
        state.positions = torch.cat([state.positions, new_pos], dim=-1)
        state.seen += q_len
        if h.record or not p.get("decoding", False):
            return output
        call = _Call(self.arch, module, hidden, kwargs, keys, values)
        if pol.decode is not None:
            pol.decode(state, call, p, q_len)
        if keys.shape[2] > state.budget:
            n_keep = pol.n_keep(state.budget, p)
            self._evict(layer, state, pol.score(call, p, n_keep, state), n_keep)
        return output

    def _evict(self, layer: Any, state: _LayerState, scores: torch.Tensor, n_keep: int) -> None:
        keys, values = layer.keys, layer.values
        if KV_POLICIES.get(self.h.policy).merge and self.h.params["merge"]:
            order = scores.argsort(dim=-1, descending=True, stable=True)
            order = torch.cat([order[..., :n_keep].sort(-1).values, order[..., n_keep:]], dim=-1)
            new_k, new_v = _merge(keys, values, scores, order, n_keep)
            keep = order[..., :n_keep]
        else:
            keep = scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values
            idx = keep[..., None].expand(-1, -1, -1, keys.shape[-1])
            new_k, new_v = keys.gather(2, idx), values.gather(2, idx)
        layer.keys, layer.values = new_k.contiguous(), new_v.contiguous()
        state.positions = state.positions.gather(2, keep)
        if state.acc is not None:
            state.acc = state.acc.gather(2, keep)
        if state.hist is not None:
            state.hist = state.hist.gather(3, keep[:, :, None].expand(-1, -1, state.hist.shape[2], -1))


def _model_pre_hook(handle: KVEviction, first_layer: int):
    """Refuse padded batches; give direct calls on an evicted cache their true positions."""

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and not bool(mask.bool().all()):
            raise InputError(
                "kv_eviction does not support padded batches (the attention_mask has zeros): evicted caches no "
                "longer line up with the padding mask. Generate the sequences one at a time or without padding"
            )
        cache = hf.find_cache(kwargs)
        state = handle._layers.get(first_layer)
        if kwargs.get("position_ids") is None and cache is not None and state is not None and state.cache() is cache:
            ids = kwargs.get("input_ids", args[0] if args else None)
            emb = kwargs.get("inputs_embeds")
            ref = ids if ids is not None else emb
            if ref is not None and cache.get_seq_length() > 0:
                q_len = ref.shape[1]
                kwargs = {
                    **kwargs,
                    "position_ids": torch.arange(state.seen, state.seen + q_len, device=ref.device)[None],
                }
                return args, kwargs
        return None

    return pre_hook


def _model_post_hook(handle: KVEviction, layers: list[int]):
    """After every forward pass: the hooks saw the cache and it holds what the eviction left in each layer.

    A transformers release that passes the cache under a name or path the hooks do not know, or changes the
    cache after the attention layer, would otherwise leave the cache silently unevicted.
    """

    def post_hook(_module: nn.Module, _args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        cache = hf.find_cache(kwargs) or hf.find_cache(output)
        if cache is None:
            if kwargs.get("use_cache"):
                raise hf.incompatible("kv_eviction", "the forward pass ran with use_cache=True but no Cache was found")
            return
        for idx in layers:
            state = handle._layers.get(idx)
            if state is None or state.cache() is not cache:
                raise hf.incompatible("kv_eviction", f"the hook on attention layer {idx} never saw the model's cache")
            length, expected = hf.cache_length(cache, idx), state.positions.shape[-1]
            evicts = not handle.record and (handle.params.get("decoding", False) or state.seen == expected)
            if length != expected or (evicts and length > state.budget):
                raise hf.incompatible(
                    "kv_eviction",
                    f"attention layer {idx} holds {length} cached positions after the forward pass; the eviction "
                    f"left {expected} (budget {state.budget})",
                )

    return post_hook


@contextmanager
def _attached(model: nn.Module, arch: AttentionLayout, handle: KVEviction) -> Iterator[None]:
    """Install the attention hooks and the model's pre / post hooks; remove them on exit."""
    layers = [int(getattr(m, "layer_idx", i)) for i, m in enumerate(arch.modules)]
    handles = [
        m.register_forward_hook(_Hook(handle, arch, idx), with_kwargs=True) for idx, m in zip(layers, arch.modules)
    ]
    handles.append(model.register_forward_pre_hook(_model_pre_hook(handle, layers[0]), with_kwargs=True))
    handles.append(model.register_forward_hook(_model_post_hook(handle, layers), with_kwargs=True))
    with hooks(*handles):
        yield


@contextmanager
def kv_eviction(
    model: nn.Module, policy: str = "snapkv", compression_ratio: float = 0.5, **params: Any
) -> Iterator[KVEviction]:
    """Evict KV-cache entries by importance while the block runs ``model.generate`` (or forward calls).

    ``policy`` is a KV method name (``whatmatters.methods(unit="kv")``). ``compression_ratio`` is the
    fraction of the prompt's cached positions removed at the prefill (``0.75`` keeps 25 %); ``0`` changes
    nothing. ``params`` are the policy's parameters (``whatmatters.describe(policy)`` lists them with their
    defaults). Yields a :class:`KVEviction` handle. Hooks are removed and the model is left exactly as it
    was on exit, even on error. After every forward pass the cache is checked against the eviction (every
    attention hook saw it; each layer holds the kept entries, at most the budget): a transformers release
    the hooks cannot follow raises :class:`~whatmatters.core.errors.ModelError` instead of an unevicted cache.
    """
    ratio = _check_ratio(compression_ratio)
    policy = _policy_name(policy)
    p = _validate(policy, params)
    arch = attention_layout(model)
    handle = KVEviction(policy, ratio, p, len(arch.modules))
    with preserved(model):
        if ratio == 0:
            yield handle
            return
        with _attached(model, arch, handle):
            yield handle


def _check_ids(input_ids: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise InputError("input_ids must be a 2-D integer tensor (batch, seq_len), e.g. tokenizer(...).input_ids")
    if input_ids.shape[1] < 2:
        raise InputError(f"need at least 2 tokens to score a KV cache, got {input_ids.shape[1]}")
    return input_ids


def _record(
    model: nn.Module, arch: AttentionLayout, input_ids: torch.Tensor, policy: str, ratio: float, p: dict[str, Any]
):
    """Prefill scores of every layer, ``(batch, n_layers, n_kv_heads, seq_len)`` float32, and the layer indices."""
    handle = KVEviction(policy, ratio, p, len(arch.modules), record=True)
    device = next(model.parameters()).device
    with preserved(model), torch.no_grad(), _attached(model, arch, handle):
        model(input_ids=input_ids.to(device), **hf.cache_kwargs(model, hf.new_cache(model)), use_cache=True)
    scores = handle.prefill_scores()
    return torch.stack([scores[i] for i in sorted(scores)], dim=1).float(), sorted(scores)


def evict_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    policy: str = "snapkv",
    *,
    compression_ratio: float = 0.5,
    **params: Any,
) -> Importance:
    """Importance of every cached position: ``unit="kv"``, values ``(batch, n_layers, n_kv_heads, seq_len)``.

    One forward pass over ``input_ids`` scores the prompt's positions as ``policy`` would at the prefill;
    higher means kept first. Positions a policy always keeps (sinks, observation or recent window) score
    above every other position of their head. ``compression_ratio`` matters only to the policies whose
    scores depend on the budget (``sink_recent``, the recent windows of ``heavy_hitter`` and
    ``scissorhands``); ``extra["budget"]`` is the number of positions :func:`kv_eviction` would keep per
    head. ``whatmatters.compress.score(model, policy, data=input_ids)`` returns the same values.
    """
    input_ids = _check_ids(input_ids)
    ratio = _check_ratio(compression_ratio)
    policy = _policy_name(policy)
    p = _validate(policy, params)
    arch = attention_layout(model)
    start = time.perf_counter()
    values, layers = _record(model, arch, input_ids, policy, ratio, p)
    budget = max(1, int(input_ids.shape[1] * (1 - ratio)))
    return Importance(
        values=values,
        unit="kv",
        per_sample=True,
        method=f"kv_{policy}",
        params={"policy": policy, "compression_ratio": ratio, **p},
        seconds=time.perf_counter() - start,
        extra={"budget": budget, "layers": layers, "axes": ["batch", "layer", "kv_head", "position"]},
    )


# ------------------------------------------------------------------------------- registered scorers
def _token_batches(task: WeightTask, method: str) -> list[torch.Tensor]:
    """The token id tensors of a compress task's calibration data (unpadded)."""
    if task.calibration is None:
        raise InputError(
            f"{method} scores the positions of a prompt: pass token ids, "
            f"e.g. whatmatters.compress.score(model, {method!r}, data=tokenizer(text, return_tensors='pt').input_ids)"
        )
    out = []
    for batch in task.calibration.batches:
        ids = batch.kwargs.get("input_ids", batch.args[0] if batch.args else None)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            raise InputError(f"{method} needs token ids (an integer tensor (n, seq_len)), not float inputs")
        mask = batch.mask
        if mask is not None and not bool(mask.all()):
            raise InputError(
                f"{method} does not score padded batches (the attention_mask has zeros): give sequences of one "
                "length, e.g. calibrate.lm_windows(...) or one text at a time"
            )
        out.append(ids)
    if len({ids.shape[1] for ids in out}) > 1:
        raise InputError(f"{method} needs sequences of one length, got lengths {sorted({i.shape[1] for i in out})}")
    return out


def _kv_scorer(task: WeightTask, policy: str, compression_ratio: float, params: dict[str, Any]):
    ratio = _check_ratio(compression_ratio)
    p = _validate(policy, params)
    arch = attention_layout(task.model)
    values, layers = [], []
    for ids in _token_batches(task, policy):
        v, layers = _record(task.model, arch, _check_ids(ids), policy, ratio, p)
        values.append(v)
    seq = values[0].shape[-1]
    return torch.cat(values), {
        "budget": max(1, int(seq * (1 - ratio))),
        "layers": layers,
        "axes": ["sample", "layer", "kv_head", "position"],
    }


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


@_policy("heavy_hitter", _score_heavy_hitter, ("h2o",), start=_start_heavy_hitter, decode=_decode_heavy_hitter)
def heavy_hitter(task: WeightTask, *, recent_ratio: float = 0.5, decoding: bool = True, compression_ratio: float = 0.5):
    """H2O (Zhang et al., 2023): accumulated attention (sum over every query so far) plus a recent window.

    The recent window is ``recent_ratio`` of the budget. With ``decoding`` the scores keep accumulating
    while generating and one position is evicted per new token (the cache stays at the budget).
    Scores: ``(n, n_layers, n_kv_heads, seq_len)``, the prefill scores (query heads of a KV group summed).
    """
    return _kv_scorer(task, "heavy_hitter", compression_ratio, {"recent_ratio": recent_ratio, "decoding": decoding})


@_policy("snapkv", _score_snapkv)
def snapkv(
    task: WeightTask,
    *,
    window_size: int = 32,
    kernel_size: int = 5,
    pooling: str = "avg",
    compression_ratio: float = 0.5,
):
    """SnapKV (Li et al., 2024): the last ``window_size`` queries vote (mean attention), then 1-D pooling.

    Pooling (``avg`` or ``max``) over ``kernel_size`` positions, mean over the query heads of each KV group;
    the observation window is always kept. Evicts at the prefill only. Same positions as kvpress's
    SnapKVPress. Scores: ``(n, n_layers, n_kv_heads, seq_len)``.
    """
    params = {"window_size": window_size, "kernel_size": kernel_size, "pooling": pooling}
    return _kv_scorer(task, "snapkv", compression_ratio, params)


@_policy("sink_recent", _score_sink_recent, ("streaming_llm",))
def sink_recent(task: WeightTask, *, n_sink: int = 4, decoding: bool = True, compression_ratio: float = 0.5):
    """StreamingLLM (Xiao et al., 2024): the first ``n_sink`` positions and the most recent ones.

    With ``decoding`` the window rolls while generating. Scores are 1 for kept, 0 for evicted positions
    (they depend on the budget, i.e. on ``compression_ratio``).
    """
    return _kv_scorer(task, "sink_recent", compression_ratio, {"n_sink": n_sink, "decoding": decoding})


@_policy("ems", _score_ems, merge=True)
def ems(
    task: WeightTask, *, window_size: int = 32, alpha: float = 0.5, merge: bool = True, compression_ratio: float = 0.5
):
    """After EMS (evict-then-merge): ``alpha`` x global + ``(1 - alpha)`` x local (window) importance.

    Global: attention a position receives averaged over the queries that can see it; local: SnapKV-style
    window votes; each normalised per head. With ``merge`` evicted values are merged into the kept entry
    of the same head with the most similar key. Every KV head of a layer keeps the same count (the cache
    is rectangular), so EMS's head-wise budgets are not reproduced.
    """
    return _kv_scorer(task, "ems", compression_ratio, {"window_size": window_size, "alpha": alpha, "merge": merge})


@_policy("knorm", _score_knorm)
def knorm(task: WeightTask, *, compression_ratio: float = 0.5):
    """Key norm (kvpress's KnormPress): keys with the smallest L2 norm are kept (score = -||k||)."""
    return _kv_scorer(task, "knorm", compression_ratio, {})


@_policy(
    "scissorhands",
    _score_scissorhands,
    start=_start_scissorhands,
    decode=_decode_scissorhands,
    n_keep=_chunk_keep,
)
def scissorhands(
    task: WeightTask,
    *,
    history_window: int = 32,
    recent_window: int = 16,
    chunk_ratio: float = 0.1,
    decoding: bool = True,
    compression_ratio: float = 0.5,
):
    """Scissorhands (Liu et al., 2023), persistence of importance: keep the tokens most often important.

    A position is *important* to a query when it receives more than the uniform attention ``1 / t``
    (``t`` = positions the query sees). Per KV head, its score is how many times it was important over the
    last ``history_window`` queries (summed over the query heads of the group; ties towards recent
    positions); the ``recent_window`` most recent positions are always kept. At the prefill the cache is
    cut to the budget; while decoding (``decoding``) it grows until it exceeds the budget and is then cut
    in one chunk to ``budget - chunk_ratio * budget`` positions (the paper compresses when its buffer is
    full, dropping ``m`` tokens at once). Follows the paper: the ``1/t`` threshold, the history window of
    counts, the recent window, chunked eviction. Simplified: the paper counts the times a token was
    *un*important and drops the most often unimportant; counting important occurrences gives the same
    order for positions all window queries saw (the others are in the recent window by default); every
    KV head keeps the same number of positions (a rectangular cache); no sampling-based budget schedule.
    Scores: ``(n, n_layers, n_kv_heads, seq_len)`` at the prefill.
    """
    params = {
        "history_window": history_window,
        "recent_window": recent_window,
        "chunk_ratio": chunk_ratio,
        "decoding": decoding,
    }
    return _kv_scorer(task, "scissorhands", compression_ratio, params)


POLICY_PARAMS: dict[str, dict[str, Any]] = {name: entry.defaults for name, entry in KV_POLICIES.entries.items()}
POLICIES = tuple(POLICY_PARAMS)

__all__ = ["POLICIES", "POLICY_PARAMS", "KVEviction", "evict_scores", "kv_eviction"]
