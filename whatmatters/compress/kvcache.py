"""KV-cache eviction during ``generate`` for decoder-only Hugging Face models, driven by importance scores.

``with kv_eviction(model, policy="snapkv", compression_ratio=0.5): model.generate(...)`` installs a
forward hook on every self-attention module. When an attention layer has just filled an empty cache layer
(the prefill), the hook scores every cached position per KV head and keeps the ``int(L * (1 -
compression_ratio))`` best ones (the same budget rule as kvpress); policies that evict while decoding
(``heavy_hitter``, ``sink_recent``) keep the cache at that budget after every generated token. Hooks are
removed on exit, even on error; weights are never touched. :func:`evict_scores` returns the scores
themselves as an :class:`~whatmatters.core.importance.Importance` with ``unit="kv"``.

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

A cache that already holds entries when the block starts is compressed at its first call inside the
block, as if that were the prefill. Forward calls on an evicted cache without ``position_ids`` get the
true positions (tokens seen so far), not the cache length transformers would use.

Not supported: padded batches (an ``attention_mask`` with zeros — the padding mask would no longer line
up with the evicted cache), caches other than ``DynamicCache`` layers, sliding-window layers.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.importance import Importance
from whatmatters.core.state import preserved

POLICY_PARAMS: dict[str, dict[str, Any]] = {
    "heavy_hitter": {"recent_ratio": 0.5, "decoding": True},
    "snapkv": {"window_size": 32, "kernel_size": 5, "pooling": "avg"},
    "sink_recent": {"n_sink": 4, "decoding": True},
    "ems": {"window_size": 32, "alpha": 0.5, "merge": True},
    "knorm": {},
}
POLICIES = tuple(POLICY_PARAMS)


# --------------------------------------------------------------------------------------------- model
@dataclass
class _Arch:
    """Where the attention modules are and how to recompute their queries."""

    kind: str  # "rope" (Llama, Qwen2, Mistral, Qwen3, ...) or "gpt2"
    modules: list[nn.Module]
    n_heads: int
    n_kv_heads: int
    head_dim: int


def _arch(model: nn.Module) -> _Arch:
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
        return _Arch("rope", attn, n_heads, n_kv, attn[0].head_dim)
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is not None and all(hasattr(getattr(b, "attn", None), "c_attn") for b in blocks):
        attn = [b.attn for b in blocks]
        return _Arch("gpt2", attn, attn[0].num_heads, attn[0].num_heads, attn[0].head_dim)
    raise ModelError(
        f"kv_eviction does not support {type(model).__name__}: it needs a decoder-only transformers LM whose "
        "layers are model.model.layers[i].self_attn with q_proj (Llama, Qwen2, Qwen3, Mistral, ...) or "
        "model.transformer.h[i].attn with c_attn (GPT-2)"
    )


def _queries(arch: _Arch, module: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
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

    arch: _Arch
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
            self._q = _queries(self.arch, self.module, self.hidden, self.kwargs)
            return self._q
        kwargs = self.kwargs
        if kwargs.get("position_embeddings") is not None:  # only the last queries: slice their cos / sin too
            kwargs = {**kwargs, "position_embeddings": tuple(t[:, -last:] for t in kwargs["position_embeddings"])}
        return _queries(self.arch, self.module, self.hidden[:, -last:].contiguous(), kwargs)

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


def _score_knorm(call: _Call, p: dict[str, Any]) -> torch.Tensor:
    return -call.keys.float().norm(dim=-1)


def _score_sink_recent(call: _Call, p: dict[str, Any], budget: int) -> torch.Tensor:
    k_len = call.keys.shape[2]
    n_sink = min(int(p["n_sink"]), budget)
    idx = torch.arange(k_len, device=call.keys.device)
    keep = (idx < n_sink) | (idx >= k_len - (budget - n_sink))
    # ties broken towards recent positions; kept positions scored 1, evicted 0
    return keep.to(torch.float32).expand(*call.keys.shape[:2], k_len).clone()


def _window_votes(call: _Call, window: int) -> torch.Tensor:
    """Mean attention of the last ``window`` queries per query head: ``(b, n_kv, group, k_len)``."""
    return call.attention(window).mean(dim=-2)


def _score_snapkv(call: _Call, p: dict[str, Any]) -> torch.Tensor:
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


def _score_ems(call: _Call, p: dict[str, Any]) -> torch.Tensor:
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


def _validate(policy: str, params: dict[str, Any]) -> dict[str, Any]:
    if policy not in POLICY_PARAMS:
        import difflib

        close = difflib.get_close_matches(str(policy), POLICIES, n=2)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise MethodError(f"unknown KV eviction policy {policy!r}.{hint} Choose one of {', '.join(POLICIES)}")
    allowed = POLICY_PARAMS[policy]
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
    for key in ("recent_ratio", "alpha"):
        if key in p and not (isinstance(p[key], (int, float)) and 0 <= p[key] <= 1):
            raise InputError(f"{key} must be a number in [0, 1], got {p[key]!r}")
    return p


def _check_ratio(compression_ratio: Any) -> float:
    if isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float)):
        raise InputError(f"compression_ratio must be a number in [0, 1), got {compression_ratio!r}")
    if not 0 <= compression_ratio < 1:
        raise InputError(
            f"compression_ratio must be in [0, 1) (the fraction of cached positions removed; 0.75 keeps 25 %), "
            f"got {compression_ratio}"
        )
    return float(compression_ratio)


# --------------------------------------------------------------------------------------------- state
@dataclass
class _LayerState:
    cache: Any  # weakref to the cache object
    budget: int
    positions: torch.Tensor  # (b, n_kv, cache_len) original position of every cached entry
    seen: int  # tokens seen by this cache layer
    acc: torch.Tensor | None = None  # heavy_hitter: accumulated attention (b, n_kv, cache_len)
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


def _cache_layer(cache: Any, layer_idx: int) -> Any:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        raise ModelError(f"kv_eviction needs a transformers DynamicCache, got {type(cache).__name__}")
    layer = layers[layer_idx]
    if type(layer) is not DynamicLayer:
        raise ModelError(
            f"kv_eviction supports DynamicCache layers only; layer {layer_idx} is a {type(layer).__name__} "
            "(static, quantized, offloaded and sliding-window caches keep their own position bookkeeping). "
            "Use the default cache: model.generate(...) without cache_implementation"
        )
    return layer


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

    def __init__(self, handle: KVEviction, arch: _Arch, layer_idx: int) -> None:
        self.h, self.arch, self.idx = handle, arch, layer_idx

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        cache = kwargs.get("past_key_values")
        if cache is None:
            return output
        hidden = args[0] if args else kwargs["hidden_states"]
        q_len = hidden.shape[1]
        layer = _cache_layer(cache, self.idx)
        keys, values = layer.keys, layer.values
        h, p = self.h, self.h.params
        state = h._layers.get(self.idx)
        prefill = keys.shape[2] == q_len
        if prefill or state is None or state.cache() is not cache:
            seen = keys.shape[2]  # a cache filled before the block is compressed as if this were its prefill
            budget = max(1, int(keys.shape[2] * (1 - h.compression_ratio)))
            pos = torch.arange(keys.shape[2], device=keys.device).expand(*keys.shape[:2], -1)
            state = _LayerState(weakref.ref(cache), budget, pos, seen)
            h._layers[self.idx] = state
            call = _Call(self.arch, module, hidden, kwargs, keys, values)
            if h.record:
                state.scores = self._scores(call, budget)
                return output
            if h.policy == "heavy_hitter":
                state.acc = _accumulated(call)
            if budget < keys.shape[2]:
                self._evict(layer, state, self._scores(call, budget))
            return output
        # a later call on the same cache (decoding or a continuation chunk)
        new_pos = torch.arange(state.seen, state.seen + q_len, device=keys.device).expand(*keys.shape[:2], -1)
        state.positions = torch.cat([state.positions, new_pos], dim=-1)
        state.seen += q_len
        if h.record or not p.get("decoding", False):
            return output
        call = _Call(self.arch, module, hidden, kwargs, keys, values)
        if h.policy == "heavy_hitter":
            state.acc = F.pad(state.acc, (0, q_len)) + _accumulated(call)
        if keys.shape[2] > state.budget:
            self._evict(layer, state, self._scores(call, state.budget))
        return output

    def _scores(self, call: _Call, budget: int) -> torch.Tensor:
        h, p = self.h, self.h.params
        if h.policy == "knorm":
            return _score_knorm(call, p)
        if h.policy == "sink_recent":
            return _score_sink_recent(call, p, budget)
        if h.policy == "snapkv":
            return _score_snapkv(call, p)
        if h.policy == "ems":
            return _score_ems(call, p)
        state = h._layers[self.idx]
        acc = state.acc if state.acc is not None else _accumulated(call)
        return _recent_keep(acc, int(budget * float(p["recent_ratio"])))

    def _evict(self, layer: Any, state: _LayerState, scores: torch.Tensor) -> None:
        keys, values = layer.keys, layer.values
        n_keep = state.budget
        if self.h.policy == "ems" and self.h.params["merge"]:
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


def _model_pre_hook(handle: KVEviction, first_layer: int):
    """Refuse padded batches; give direct calls on an evicted cache their true positions."""

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and not bool(mask.bool().all()):
            raise InputError(
                "kv_eviction does not support padded batches (the attention_mask has zeros): evicted caches no "
                "longer line up with the padding mask. Generate the sequences one at a time or without padding"
            )
        cache = kwargs.get("past_key_values")
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


@contextmanager
def kv_eviction(
    model: nn.Module, policy: str = "snapkv", compression_ratio: float = 0.5, **params: Any
) -> Iterator[KVEviction]:
    """Evict KV-cache entries by importance while the block runs ``model.generate`` (or forward calls).

    ``compression_ratio`` is the fraction of the prompt's cached positions removed at the prefill
    (``0.75`` keeps 25 %); ``0`` changes nothing. ``params`` are the policy's parameters
    (``POLICY_PARAMS[policy]`` lists them with their defaults). Yields a :class:`KVEviction` handle.
    Hooks are removed and the model is left exactly as it was on exit, even on error.
    """
    ratio = _check_ratio(compression_ratio)
    p = _validate(policy, params)
    arch = _arch(model)
    handle = KVEviction(policy, ratio, p, len(arch.modules))
    with preserved(model):
        if ratio == 0:
            yield handle
            return
        handles = [
            m.register_forward_hook(_Hook(handle, arch, int(getattr(m, "layer_idx", i))), with_kwargs=True)
            for i, m in enumerate(arch.modules)
        ]
        first = int(getattr(arch.modules[0], "layer_idx", 0))
        handles.append(model.register_forward_pre_hook(_model_pre_hook(handle, first), with_kwargs=True))
        try:
            yield handle
        finally:
            for hd in handles:
                hd.remove()


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
    scores depend on the budget (``sink_recent``, ``heavy_hitter``'s recent window); ``extra["budget"]``
    is the number of positions :func:`kv_eviction` would keep per head.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise InputError("input_ids must be a 2-D integer tensor (batch, seq_len), e.g. tokenizer(...).input_ids")
    if input_ids.shape[1] < 2:
        raise InputError(f"need at least 2 tokens to score a KV cache, got {input_ids.shape[1]}")
    ratio = _check_ratio(compression_ratio)
    p = _validate(policy, params)
    arch = _arch(model)
    from transformers import DynamicCache

    handle = KVEviction(policy, ratio, p, len(arch.modules), record=True)
    start = time.perf_counter()
    device = next(model.parameters()).device
    with preserved(model), torch.no_grad():
        handles = [
            m.register_forward_hook(_Hook(handle, arch, int(getattr(m, "layer_idx", i))), with_kwargs=True)
            for i, m in enumerate(arch.modules)
        ]
        try:
            model(input_ids=input_ids.to(device), past_key_values=DynamicCache(config=model.config), use_cache=True)
        finally:
            for hd in handles:
                hd.remove()
    scores = handle.prefill_scores()
    values = torch.stack([scores[i] for i in sorted(scores)], dim=1).float()
    budget = max(1, int(input_ids.shape[1] * (1 - ratio)))
    return Importance(
        values=values,
        unit="kv",
        per_sample=True,
        method=f"kv_{policy}",
        params={"policy": policy, "compression_ratio": ratio, **p},
        seconds=time.perf_counter() - start,
        extra={"budget": budget, "layers": sorted(scores), "axes": ["batch", "layer", "kv_head", "position"]},
    )


__all__ = ["POLICIES", "POLICY_PARAMS", "KVEviction", "evict_scores", "kv_eviction"]
