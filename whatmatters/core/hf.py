"""Version adapters for Hugging Face transformers: the one place that knows how its releases differ.

Features that hook into transformers' internals (KV-cache eviction, attention capture for token scores,
LRP rules on decoder blocks, structured removal) reach the cache, its layers and the forward arguments
only through these functions, and report a library change with :func:`incompatible` -- a
:class:`~whatmatters.core.errors.ModelError` that names the version found and the versions tested.

What differs between the tested releases:

* the cache an attention layer receives has been the keyword ``past_key_value``, ``past_key_values``
  and now ``cache``; model outputs carry it as ``past_key_values`` or ``cache``. It is found by type
  (a ``transformers.Cache``), not by name (:func:`find_cache`);
* a model's forward takes the cache as ``cache=`` (5.25; ``past_key_values=`` is deprecated there, to be
  removed in 5.40) or ``past_key_values=``: :func:`cache_kwargs` passes it under the name the forward
  declares.

Releases before 5.13 differ in more than this (GPT-2 attention without ``scaling``, ViT's layer list,
DeepSeek-V3 routing groups) and are not supported: ``pyproject.toml`` asks for ``transformers>=5.13``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import InputError, ModelError

# The transformers releases the test suite runs on (the oldest one pyproject.toml admits and the newest
# one checked); named in every error about a library change.
TESTED = ("5.13.0", "5.25.0")


def version() -> str:
    """The installed transformers version, or ``"not installed"``."""
    try:
        import transformers
    except ImportError:
        return "not installed"
    return str(transformers.__version__)


def incompatible(feature: str, what: str) -> ModelError:
    """A ``ModelError`` for a transformers change that ``feature`` cannot handle (raise it)."""
    return ModelError(
        f"{feature}: {what}. This transformers release is not one whatmatters can hook: found transformers "
        f"{version()}, tested with {TESTED[0]} to {TESTED[1]}. Install a tested release "
        f"(pip install 'transformers>={TESTED[0]},<={TESTED[1]}') or report the version"
    )


@functools.cache
def _cache_type() -> type:
    from transformers.cache_utils import Cache

    return Cache


_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")  # looked up first (once per layer and token)


def find_cache(values: Mapping[str, Any] | Any) -> Any | None:
    """The ``transformers.Cache`` among a call's keyword arguments or a model output (dict or tuple), else None."""
    cache_type = _cache_type()
    if isinstance(values, Mapping):
        for name in _CACHE_NAMES:
            if isinstance(found := values.get(name), cache_type):
                return found
        items = values.values()
    else:
        items = values if isinstance(values, (tuple, list)) else ()
    return next((v for v in items if isinstance(v, cache_type)), None)


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for calling ``model`` with a cache, under the name its forward declares."""
    name = _cache_argument(getattr(model.forward, "__func__", model.forward))
    if name is None:
        raise incompatible(type(model).__name__, "its forward takes neither cache= nor past_key_values=")
    return {name: cache}


@functools.lru_cache(maxsize=64)
def _cache_argument(forward: Callable[..., Any]) -> str | None:
    """The keyword under which ``forward`` takes the cache (read once per forward function, not per token)."""
    params = inspect.signature(forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def new_cache(model: nn.Module) -> Any:
    """An empty ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_layer(cache: Any, layer_idx: int, feature: str) -> Any:
    """Layer ``layer_idx`` of a ``DynamicCache`` (its ``keys`` / ``values`` are ``(b, n_kv, len, d)``)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        raise incompatible(feature, f"the {type(cache).__name__} has no per-layer .layers")
    if layer_idx >= len(layers):
        raise ModelError(f"{feature}: the cache has {len(layers)} layers, attention layer {layer_idx} has none")
    layer = layers[layer_idx]
    if type(layer) is not DynamicLayer:
        raise ModelError(
            f"{feature} supports DynamicCache layers only; layer {layer_idx} is a {type(layer).__name__} "
            "(static, quantized, offloaded and sliding-window caches keep their own position bookkeeping). "
            "Use the default cache: model.generate(...) without cache_implementation"
        )
    return layer


def cache_length(cache: Any, layer_idx: int) -> int:
    """Number of cached positions in one layer (0 when empty)."""
    keys = getattr(cache.layers[layer_idx], "keys", None)
    return 0 if keys is None or keys.numel() == 0 else int(keys.shape[-2])


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (``get_input_embeddings()``), or None for models without one."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None


def token_ids(input_ids: Any, model: nn.Module | None = None, *, min_length: int = 1) -> torch.Tensor:
    """``input_ids`` checked as a ``(batch, seq_len)`` integer tensor of ids the model's vocabulary holds.

    ``InputError`` names what is wrong (not a tensor, wrong rank, float or bool ids, fewer than
    ``min_length`` tokens, ids outside ``[0, vocab_size)``) and the fix; one min/max read per call.
    """
    fix = "tokenize the text first, e.g. tokenizer(texts, return_tensors='pt').input_ids"
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InputError(f"input_ids must be a 2-D integer tensor of shape (n, seq_len), got {shape}; {fix}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; {fix}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] < min_length:
        raise InputError(
            f"need at least 1 sequence of at least {min_length} tokens, got input_ids of shape {tuple(input_ids.shape)}"
        )
    vocab = vocab_size(model) if model is not None else None
    lo, hi = (int(v) for v in torch.aminmax(input_ids))
    if lo < 0 or (vocab is not None and hi >= vocab):
        bound = f"[0, {vocab})" if vocab is not None else "non-negative"
        raise InputError(
            f"input_ids must be token ids in {bound} (the model's vocabulary), got ids from {lo} to {hi}; "
            "tokenize with the model's own tokenizer"
        )
    return input_ids


@contextmanager
def attention_weights(model: nn.Module) -> Iterator[None]:
    """While open, the Hugging Face model inside ``model`` runs eager attention, so ``output_attentions=True``
    returns the weights; on exit its attention implementation is set back and the output-capturing hooks
    transformers installed on first use are forgotten (``preserved`` removes hooks added inside it, so
    transformers must install them again next time, or ``output_attentions`` would silently return nothing)."""
    inner = next((m for m in model.modules() if callable(getattr(m, "set_attn_implementation", None))), None)
    if inner is None:
        yield
        return
    flag = "_output_capturing_hooks_installed"
    had = {id(m) for m in model.modules() if getattr(m, flag, False)}
    before = getattr(inner.config, "_attn_implementation", None)
    if before != "eager":
        inner.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before not in (None, "eager"):
            inner.set_attn_implementation(before)
        for m in model.modules():
            if getattr(m, flag, False) and id(m) not in had:
                delattr(m, flag) if flag in vars(m) else setattr(m, flag, False)


def tiny_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """A one-sample input for a smoke forward pass: 4 token ids, or a zero image of the configured size."""
    config = model.config
    device = next(model.parameters()).device
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.zeros(1, channels, *size, device=device, dtype=next(model.parameters()).dtype)}
    vocab = int(getattr(config, "vocab_size", 8) or 8)
    return {"input_ids": (torch.arange(4, device=device) % vocab)[None]}


def output_shape(model: nn.Module, feature: str) -> tuple[int, ...]:
    """Shape of the first output tensor of a smoke forward pass; a failing pass is reported as incompatible."""
    try:
        with torch.no_grad():
            out = model(**tiny_inputs(model))
    except Exception as e:  # the library changed what the model's modules read
        raise incompatible(feature, f"the forward pass fails ({type(e).__name__}: {e})") from e
    first = next(v for v in (out.values() if isinstance(out, Mapping) else out) if isinstance(v, torch.Tensor))
    return tuple(first.shape)


__all__ = [
    "TESTED",
    "attention_weights",
    "cache_kwargs",
    "cache_layer",
    "cache_length",
    "find_cache",
    "incompatible",
    "new_cache",
    "output_shape",
    "tiny_inputs",
    "version",
]
