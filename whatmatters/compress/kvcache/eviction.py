"""``evicting_kv`` and ``evict_scores``: the hooks that score and evict cache entries while the model runs."""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core import hf
from whatmatters.core.errors import InputError
from whatmatters.core.importance import Importance
from whatmatters.core.state import hooks, preserved

if TYPE_CHECKING:
    pass


from whatmatters.compress.kvcache.layout import AttentionLayout, attention_layout
from whatmatters.compress.kvcache.policies import KV_POLICIES, _Call, _check_ratio, _LayerState, _policy_name, _validate


@dataclass
class KVEviction:
    """Handle yielded by :func:`evicting_kv`: the policy and the state of the current sequence.

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
        self.policy = KV_POLICIES.get(handle.policy)  # resolved once, not on every attention call

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        cache = hf.find_cache(kwargs)
        if cache is None:
            return output
        hidden = args[0] if args else kwargs["hidden_states"]
        q_len = hidden.shape[1]
        state = self.h._layers.get(self.idx)
        if state is not None and state.cache() is cache and cache.layers[self.idx].keys.shape[2] != q_len:
            self._later_call(module, cache, state, hidden, kwargs, q_len)
        else:
            self._prefill(module, cache, hidden, kwargs, q_len)
        return output

    def _prefill(self, module: nn.Module, cache: Any, hidden: torch.Tensor, kwargs: dict[str, Any], q_len: int) -> None:
        """The first call on a cache (a cache filled before the block is compressed as if this were its prefill)."""
        h, p, pol = self.h, self.h.params, self.policy
        layer = hf.cache_layer(cache, self.idx, "evicting_kv")
        keys, values = layer.keys, layer.values
        budget = max(1, int(keys.shape[2] * (1 - h.compression_ratio)))
        pos = torch.arange(keys.shape[2], device=keys.device).expand(*keys.shape[:2], -1)
        state = _LayerState(weakref.ref(cache), budget, pos, keys.shape[2])
        h._layers[self.idx] = state
        call = _Call(self.arch, module, hidden, kwargs, keys, values)
        if pol.start is not None:
            pol.start(state, call, p)
        if h.record:
            state.scores = pol.score(call, p, budget, state)
        elif budget < keys.shape[2]:
            self._evict(layer, state, pol.score(call, p, budget, state), budget)

    def _later_call(
        self,
        module: nn.Module,
        cache: Any,
        state: _LayerState,
        hidden: torch.Tensor,
        kwargs: dict[str, Any],
        q_len: int,
    ) -> None:
        """A later call on the same cache (decoding or a continuation chunk): its entries follow in order.

        Policies that evict at the prefill only cost an integer update here (no tensor work per token).
        """
        state.seen += q_len
        h, p, pol = self.h, self.h.params, self.policy
        if h.record or not p.get("decoding", False):
            return
        layer = cache.layers[self.idx]
        call = _Call(self.arch, module, hidden, kwargs, layer.keys, layer.values)
        if pol.decode is not None:
            pol.decode(state, call, p, q_len)
        if layer.keys.shape[2] > state.budget:
            n_keep = pol.n_keep(state.budget, p)
            self._evict(layer, state, pol.score(call, p, n_keep, state), n_keep)

    def _evict(self, layer: Any, state: _LayerState, scores: torch.Tensor, n_keep: int) -> None:
        keys, values = layer.keys, layer.values
        if self.policy.merge and self.h.params["merge"]:
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

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        cache = hf.find_cache(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        state = handle._layers.get(first_layer)
        evicted = cache is not None and state is not None and state.cache() is cache
        mask = kwargs.get("attention_mask")
        # a decoding step's mask holds the checked prompt's and the generated tokens' columns: checked once
        new_columns = not evicted or not isinstance(ids, torch.Tensor) or ids.shape[-1] != 1
        if new_columns and isinstance(mask, torch.Tensor) and mask.ndim == 2 and not bool(mask.bool().all()):
            raise InputError(
                "evicting_kv does not support padded batches (the attention_mask has zeros): evicted caches no "
                "longer line up with the padding mask. Generate the sequences one at a time or without padding"
            )
        if isinstance(ids, torch.Tensor) and (cache is None or cache.get_seq_length() == 0):
            hf.token_ids(ids, module)  # the prompt, once: bad ids get an error here, not from the embedding
        if kwargs.get("position_ids") is None and evicted:
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
        cache = hf.find_cache(kwargs)
        if cache is None:  # (a Cache has a length, so never ``or``: an empty one would be falsy)
            cache = hf.find_cache(output)
        if cache is None:
            if kwargs.get("use_cache"):
                raise hf.incompatible("evicting_kv", "the forward pass ran with use_cache=True but no Cache was found")
            return
        for idx in layers:
            state = handle._layers.get(idx)
            if state is None or state.cache() is not cache:
                raise hf.incompatible("evicting_kv", f"the hook on attention layer {idx} never saw the model's cache")
            length, expected = hf.cache_length(cache, idx), state.length
            evicts = not handle.record and (handle.params.get("decoding", False) or state.seen == expected)
            if length != expected or (evicts and length > state.budget):
                raise hf.incompatible(
                    "evicting_kv",
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
def evicting_kv(
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


def kv_eviction(model: nn.Module, *args: Any, **kwargs: Any) -> AbstractContextManager[KVEviction]:
    """Deprecated name of :func:`evicting_kv` (a context manager, so named as one); removed in the next release."""
    warnings.warn("kv_eviction was renamed evicting_kv; use `with evicting_kv(model, ...)`", DeprecationWarning, 2)
    return evicting_kv(model, *args, **kwargs)


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
    ``scissorhands``); ``extra["budget"]`` is the number of positions :func:`evicting_kv` would keep per
    head. ``whatmatters.compress.score(model, policy, data=input_ids)`` returns the same values.
    """
    input_ids = hf.token_ids(input_ids, model, min_length=2)
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
