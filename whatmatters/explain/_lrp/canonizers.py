"""Canonizers: rewrite a copy of a model into an equivalent one that LRP rules explain better."""

from __future__ import annotations

import copy
import itertools
import weakref

import torch
from torch import nn

from whatmatters.core.state import fingerprint
from whatmatters.explain._lrp.composites import BATCHNORM, CONV, LINEAR

# model -> (its fingerprint, the BatchNorm-merged copy): reused while the model's tensors are unchanged
_CANONIZED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


def _merge(layer: nn.Module, bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm into the preceding layer (in place, on the copy)."""
    with torch.no_grad():
        var, mean = bn.running_var, bn.running_mean  # type: ignore[union-attr]
        scale = torch.rsqrt(var + bn.eps)  # type: ignore[operator]
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        w = layer.weight  # type: ignore[union-attr]
        w.mul_(scale.reshape(-1, *([1] * (w.ndim - 1))).to(w.dtype))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)  # type: ignore[union-attr]
        layer.bias = nn.Parameter((bias * scale + shift).to(w.dtype), requires_grad=w.requires_grad)


def _mergeable(model: nn.Module) -> list[tuple[nn.Sequential, str, str]]:
    """``(sequential, layer key, batchnorm key)`` of every BatchNorm that directly follows a Conv/Linear."""
    found = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for a, b in itertools.pairwise(list(seq._modules)):
            layer, bn = seq._modules[a], seq._modules[b]
            if (
                isinstance(layer, CONV + LINEAR)
                and isinstance(bn, BATCHNORM)
                and bn.running_mean is not None
                and bn.num_features == layer.weight.shape[0]
            ):
                found.append((seq, a, b))
    return found


def merge_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``model`` with every BatchNorm that directly follows a Conv/Linear inside an
    ``nn.Sequential`` folded into that layer (and replaced by ``nn.Identity``). The model is not changed.

    Returns the copy and the names of the merged BatchNorm layers. BatchNorms elsewhere (not after a
    Conv/Linear in the same Sequential, or without running statistics) stay and get the pass rule.
    """
    out = copy.deepcopy(model)
    names = {id(m): n for n, m in out.named_modules()}
    merged = []
    for seq, a, b in _mergeable(out):
        _merge(seq._modules[a], seq._modules[b])
        seq._modules[b] = nn.Identity()
        merged.append(f"{names[id(seq)]}.{b}" if names[id(seq)] else b)
    return out, merged


def canonized(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no BatchNorm to merge, else its merged copy (:func:`merge_batchnorm`),
    made once and reused while the model's parameters and buffers are unchanged (version counters)."""
    if not _mergeable(model):
        return model
    stamp = fingerprint(model)
    hit = _CANONIZED.get(model)
    if hit is None or hit[0] != stamp:
        hit = (stamp, merge_batchnorm(model)[0])
        _CANONIZED[model] = hit
    return hit[1]
