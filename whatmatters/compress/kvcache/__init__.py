"""KV-cache eviction during ``generate`` for decoder-only Hugging Face models, driven by importance scores.

``with evicting_kv(model, policy="snapkv", compression_ratio=0.5): model.generate(...)`` installs a
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

from typing import TYPE_CHECKING, Any

import torch

from whatmatters.compress.kvcache.eviction import (
    KVEviction,
    _record,
    evict_scores,
    evicting_kv,
    kv_eviction,
)
from whatmatters.compress.kvcache.layout import AttentionLayout, attention_layout, rotated_queries
from whatmatters.compress.kvcache.policies import (
    KV_POLICIES,
    Policy,
    _check_ratio,
    _chunk_keep,
    _decode_heavy_hitter,
    _decode_scissorhands,
    _policy,
    _score_ems,
    _score_heavy_hitter,
    _score_knorm,
    _score_scissorhands,
    _score_sink_recent,
    _score_snapkv,
    _start_heavy_hitter,
    _start_scissorhands,
    _validate,
)
from whatmatters.core import hf
from whatmatters.core.errors import InputError

if TYPE_CHECKING:
    from whatmatters.compress.api import WeightTask


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
        ids = hf.token_ids(ids, task.model, min_length=2)  # a cache needs 2 positions to score
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
        v, layers = _record(task.model, arch, ids, policy, ratio, p)
        values.append(v)
    seq = values[0].shape[-1]
    return torch.cat(values), {
        "budget": max(1, int(seq * (1 - ratio))),
        "layers": layers,
        "axes": ["sample", "layer", "kv_head", "position"],
    }


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

__all__ = [
    "KV_POLICIES",
    "POLICIES",
    "POLICY_PARAMS",
    "AttentionLayout",
    "KVEviction",
    "Policy",
    "attention_layout",
    "evict_scores",
    "evicting_kv",
    "kv_eviction",
    "rotated_queries",
]
