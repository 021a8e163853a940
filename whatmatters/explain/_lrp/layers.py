"""Relevance arriving at each layer (for mixed-precision bit allocation as in LRP-QViT)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import InputError
from whatmatters.core.importance import Importance
from whatmatters.core.task import as_indices
from whatmatters.explain._lrp import lm
from whatmatters.explain._lrp.composites import CONV, LINEAR, Composite
from whatmatters.explain._lrp.core import lrp


def layer_relevance(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Any = None,
    layers: Sequence[str] | None = None,
    *,
    composite: str | Composite = "epsilon",
    reduce: str = "abs",
    batch_size: int = 64,
    canonize: bool = True,
    **params: Any,
) -> Importance:
    """Relevance reaching the output of each named layer, per sample: an ``Importance`` of unit ``layer``.

    ``layers`` defaults to every Linear and Conv layer (the layers a quantizer acts on). ``reduce``:
    ``"abs"`` sums ``|R|`` over the layer's output (how much of the decision passes through it),
    ``"sum"`` sums ``R`` (signed; close to the target logit for every layer a conservative
    composite crosses in full). ``target`` is a class index, one per sample, or None (predicted
    class). Values have shape ``(n, len(layers))``; the model is not changed.

    Hugging Face causal LMs (Llama, Mistral, Qwen2, Qwen3) with integer token-id ``inputs`` go to
    :func:`whatmatters.explain._lrp.lm.layer_relevance` (AttnLRP; ``target`` is the next-token id at the last
    position; ``composite`` and ``canonize`` do not apply there, ``variant`` and ``epsilon`` do).
    """
    if isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() and lm.is_language_model(model):
        return lm.layer_relevance(model, inputs, target, layers, reduce=reduce, batch_size=batch_size, **params)
    if reduce not in ("abs", "sum"):
        raise InputError(f"reduce must be 'abs' or 'sum', got {reduce!r}")
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2 or len(inputs) == 0:
        raise InputError("inputs must be a non-empty tensor of shape (n, ...)")
    if layers is None:
        layers = [name for name, m in model.named_modules() if isinstance(m, CONV + LINEAR)]
    layers = list(layers)
    if not layers:
        raise InputError("no layers to score: the model has no Linear/Conv layer; name the layers with layers=[...]")
    start = time.perf_counter()
    tgt = None if target is None else as_indices(target, InputError).reshape(-1)
    rows = []
    for s in range(0, len(inputs), batch_size):
        t = None if tgt is None else (tgt if tgt.numel() == 1 else tgt[s : s + batch_size])
        _, per_layer = lrp(model, inputs[s : s + batch_size], t, composite, canonize=canonize, layers=layers, **params)
        cols = []
        for name in layers:
            r = per_layer.get(name)
            if r is None:  # the layer does not reach the target output
                cols.append(torch.zeros(len(inputs[s : s + batch_size])))
                continue
            r = r.flatten(1)
            cols.append((r.abs() if reduce == "abs" else r).sum(1).float().cpu())
        rows.append(torch.stack(cols, 1))
    values = torch.cat(rows)
    return Importance(
        values=values,
        unit="layer",
        names=tuple(layers),
        per_sample=True,
        method="lrp_layer_relevance",
        params={"composite": composite if isinstance(composite, str) else "custom", "reduce": reduce, **params},
        target=None if target is None else torch.as_tensor(target).reshape(-1).tolist(),
        seconds=time.perf_counter() - start,
    )
