"""Token importance from attention: how much attention each token receives from the queries that see it.

``whatmatters.compress.score(model, "accumulated_attention", data=input_ids)`` returns an
:class:`~whatmatters.core.importance.Importance` with ``unit="token"``, values ``(n, seq_len)``: for token
``j`` of a sequence, the sum over layers, query heads and queries ``i >= j`` of the attention weight
``A[i, j]`` -- the accumulated attention H2O uses to find heavy hitters and RSQ uses to weight its
calibration tokens. The token attends to itself (``i = j`` is included), as in H2O.

It is a ``compress`` scorer, not an ``explain`` method: it scores the tokens of a causal LM's input
without a prediction target, and ``explain`` resolves a target class from the model's output.

Attention weights are rebuilt in float32 from the queries and the cached keys inside a forward hook on each
attention module (as :mod:`whatmatters.compress.kvcache` does): no ``output_attentions=True`` needed, so it
works with sdpa / flash attention and with grouped-query attention (KV heads never repeated). Queries are
processed in blocks of ``query_block`` rows (memory ``O(batch x heads x query_block x seq_len)`` per layer).
Padded batches are supported: padding queries are ignored and padding keys receive no attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from whatmatters.compress.kvcache.layout import AttentionLayout, attention_layout, rotated_queries
from whatmatters.compress.vit_tokens import is_vit, vit_layout, vit_score
from whatmatters.core import hf
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.fractions import whole
from whatmatters.core.registry import scorer
from whatmatters.core.state import preserved

if TYPE_CHECKING:
    from whatmatters.compress.api import WeightTask


FEATURE = "accumulated_attention"


class _Stop(Exception):
    """Raised after the last selected layer: the rest of the forward pass is not needed."""


def received_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    *,
    query_block: int = 256,
) -> torch.Tensor:
    """Causal attention each key position receives, summed over queries and query heads: ``(b, k_len)``.

    ``q``: ``(b, n_heads, q_len, d)``, the last ``q_len`` positions; ``keys``: ``(b, n_kv, k_len, d)``
    (grouped-query attention: ``n_heads`` a multiple of ``n_kv``). ``mask``: ``(b, k_len)`` bool, False
    for padding (ignored as queries, never attended to).
    """
    b, n_heads, q_len, d = q.shape
    n_kv, k_len = keys.shape[1], keys.shape[2]
    qg = q.reshape(b, n_kv, n_heads // n_kv, q_len, d).float()
    kt = keys.float().unsqueeze(2).transpose(-1, -2)  # (b, n_kv, 1, d, k_len)
    key_pos = torch.arange(k_len, device=q.device)
    out = torch.zeros(b, k_len, device=q.device, dtype=torch.float32)
    for start in range(0, q_len, query_block):  # blocks of queries bound the memory; each block is one matmul
        stop = min(start + query_block, q_len)
        q_pos = torch.arange(start, stop, device=q.device) + (k_len - q_len)
        allowed = key_pos[None, :] <= q_pos[:, None]  # (block, k_len)
        if mask is not None:
            allowed = allowed & mask[:, None, None, None, :]  # padding keys
        att = (torch.matmul(qg[..., start:stop, :], kt) * scaling).masked_fill(~allowed, float("-inf"))
        att = att.softmax(dim=-1).nan_to_num(0.0)  # a row with no visible key (left padding) is all zero
        if mask is not None:
            att = att * mask[:, None, None, q_pos, None]  # padding queries
        out += att.sum(dim=(1, 2, 3))
    return out


def _layer_indices(arch: AttentionLayout, layers: Sequence[int] | None) -> list[int]:
    n = len(arch.modules)
    if layers is None:
        return list(range(n))
    if isinstance(layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise InputError(f"attn_layers must be a sequence of layer indices (ints), got {layers!r}")
    bad = [i for i in layers if not -n <= i < n]
    if bad or not layers:
        raise InputError(f"attn_layers {list(layers)!r} out of range: the model has {n} attention layers (0..{n - 1})")
    return sorted({i % n for i in layers})


def _check_sliding(model: nn.Module) -> None:
    types = getattr(model.config, "layer_types", None) or ()
    if "sliding_attention" in types:
        raise ModelError(
            f"{type(model).__name__} uses sliding-window attention in some layers; accumulated_attention "
            "rebuilds full causal attention and would not match it. Use a model without sliding windows"
        )


def attention_received(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: Sequence[int] | None = None,
    query_block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulated attention per token ``(b, seq_len)`` and the number of (non-padding) queries that see it."""
    arch = attention_layout(model)
    _check_sliding(model)
    chosen = _layer_indices(arch, layers)
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = attention_mask.to(device).bool() if attention_mask is not None else None
    total = torch.zeros(ids.shape, device=device, dtype=torch.float32)
    cache = hf.new_cache(model)
    index = {m: int(getattr(m, "layer_idx", i)) for i, m in enumerate(arch.modules)}
    last = arch.modules[chosen[-1]]
    seen: list[int] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], _output: Any) -> None:
        nonlocal total
        hidden = args[0] if args else kwargs["hidden_states"]
        if hf.find_cache(kwargs) is not cache:
            raise hf.incompatible(FEATURE, f"attention layer {index[module]} was not given the cache")
        keys = hf.cache_layer(cache, index[module], FEATURE).keys
        if keys.shape[2] != ids.shape[1]:
            what = f"layer {index[module]} cached {keys.shape[2]} keys for {ids.shape[1]} tokens"
            raise hf.incompatible(FEATURE, what)
        q = rotated_queries(arch, module, hidden, kwargs)
        total = total + received_attention(q, keys, float(module.scaling), mask, query_block=query_block)
        seen.append(index[module])
        if module is last:
            raise _Stop

    with preserved(model), torch.no_grad():
        handles = [arch.modules[i].register_forward_hook(hook, with_kwargs=True) for i in chosen]
        try:
            kwargs = {"attention_mask": attention_mask.to(device)} if attention_mask is not None else {}
            model(input_ids=ids, **hf.cache_kwargs(model, cache), use_cache=True, **kwargs)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
    if len(seen) != len(chosen):
        missed = sorted(set(chosen) - set(seen))
        raise hf.incompatible(FEATURE, f"the hooks on attention layers {missed} did not run during the forward pass")
    valid = mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    # queries i >= j that are not padding: reverse cumulative count of valid positions
    seen_by = valid.flip(-1).cumsum(-1).flip(-1) * valid
    return total, seen_by


@scorer(
    "accumulated_attention",
    verb="compress",
    units="token",
    family="attention",
    needs="module",
    per_sample=True,
    aliases=("attention_tokens",),
)
def accumulated_attention(
    task: WeightTask,
    *,
    attn_layers: Sequence[int] | None = None,
    normalize: bool = False,
    query_block: int = 256,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Accumulated attention each token receives (H2O heavy hitters, RSQ token weights), unit ``token``.

    Per token ``j``: the sum over the layers ``attn_layers`` (default all; indices, negatives allowed),
    query heads and queries ``i >= j`` of the softmax attention ``A[i, j]``. The sum favours early tokens,
    which more queries see (H2O's bias); ``normalize=True`` divides by the number of queries that see the
    token (mean attention per query, still summed over heads and layers). On a vision transformer
    (``data=images``) it scores the patch tokens: per block, the attention each patch receives from all
    queries, mean over heads, summed over ``attn_layers`` (:mod:`whatmatters.compress.vit_tokens`).
    Padding tokens score 0; batches of different lengths are right-padded with 0 (``extra["lengths"]``).
    Values ``(n, seq_len)`` float32.
    """
    if is_vit(task.model):
        values, extra = vit_score(task, FEATURE, attn_layers)
        queries = values.shape[1] + vit_layout(task.model).n_special  # every query sees every token
        return (values / queries if normalize else values), extra
    if task.calibration is None:
        raise InputError(
            "accumulated_attention scores the tokens of input sequences: pass token ids, e.g. "
            "whatmatters.compress.score(model, 'accumulated_attention', data=tokenizer(text, return_tensors='pt')"
            ".input_ids)"
        )
    query_block = whole(query_block, "query_block")
    rows, lengths = [], []
    for batch in task.calibration.batches:
        ids = batch.kwargs.get("input_ids", batch.args[0] if batch.args else None)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.ndim != 2:
            raise InputError("accumulated_attention needs token ids: an integer tensor (n, seq_len) or texts")
        mask = batch.kwargs.get("attention_mask")
        total, seen_by = attention_received(task.model, ids, mask, layers=attn_layers, query_block=query_block)
        if normalize:
            total = total / seen_by.clamp_min(1)
        rows.append(total)
        lengths += (mask.sum(-1) if mask is not None else torch.full((len(ids),), ids.shape[1])).tolist()
    width = max(r.shape[1] for r in rows)
    values = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows])
    arch = attention_layout(task.model)
    return values, {
        "layers": _layer_indices(arch, attn_layers),
        "lengths": [int(n) for n in lengths],
    }
