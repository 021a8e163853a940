"""Canonizers: rewrite a copy of a model into an equivalent one that LRP rules explain better.

BatchNorm (eval mode) is an affine map per channel, so it folds exactly into the Conv/Linear whose output
it normalises. Which layer that is comes from the traced graph (``torch.fx``: works for ResNet blocks
written with ``forward``), or, where the model cannot be traced, from adjacency inside an ``nn.Sequential``.
A BatchNorm that cannot be folded is refused with its name and the reason, never silently left in place.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections import Counter

import torch
from torch import fx, nn

from whatmatters.core.errors import MethodError
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


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(layer, CONV + LINEAR)
        and bn.running_mean is not None  # type: ignore[union-attr]
        and bn.num_features == layer.weight.shape[0]  # type: ignore[union-attr]
    )


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer name, batchnorm name)`` of every BatchNorm right after a Conv/Linear in an ``nn.Sequential``."""
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            prefix = f"{names[id(seq)]}." if names[id(seq)] else ""
            for a, b in itertools.pairwise(list(seq._modules)):
                layer, bn = seq._modules[a], seq._modules[b]
                if isinstance(bn, BATCHNORM) and _foldable(layer, bn):  # type: ignore[arg-type]
                    found.append((prefix + a, prefix + b))
    return found


def _traced_pairs(model: nn.Module, graph: fx.Graph) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Foldable ``(layer, batchnorm)`` pairs of the traced graph, and why each other BatchNorm is not."""
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs, why = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], BATCHNORM):
            continue
        bn, src = modules[node.target], node.args[0] if node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and _foldable(modules[src.target], bn)):
            why[node.target] = "its input is not the output of a Conv/Linear layer with as many channels"
        elif len(src.users) > 1:
            why[node.target] = f"the output of {src.target!r} is also used elsewhere"
        elif calls[node.target] > 1 or calls[src.target] > 1:
            why[node.target] = f"it or {src.target!r} is called more than once per forward"
        else:
            pairs.append((src.target, node.target))
    return pairs, why


def _pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Every BatchNorm of ``model`` paired with the layer it folds into; :class:`MethodError` if one cannot fold."""
    batchnorms = [n for n, m in model.named_modules() if isinstance(m, BATCHNORM)]
    if not batchnorms:
        return []
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # data-dependent control flow, non-tensor glue: fall back to Sequential adjacency
        pairs = _sequential_pairs(model)
        reason = (
            f"the model cannot be traced ({type(err).__name__}) and it does not follow a Conv/Linear in a Sequential"
        )
        why = dict.fromkeys(batchnorms, reason)
    else:
        pairs, why = _traced_pairs(model, graph)  # a BatchNorm the forward never calls does not matter
    folded = {b for _, b in pairs}
    refused = {n: r for n, r in why.items() if n not in folded}
    if refused:
        listed = "; ".join(f"{n!r}: {r}" for n, r in refused.items())
        raise MethodError(
            f"LRP cannot fold these BatchNorm layers into a preceding Conv/Linear ({listed}). Pass canonize=False "
            "to give every BatchNorm the pass rule (relevance then differs from the folded network's), or give "
            "them a rule by name with rules={name: 'pass'} and canonize=False"
        )
    return pairs


def merge_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``model`` with every BatchNorm folded into the Conv/Linear layer whose output it takes
    (and replaced by ``nn.Identity``). The model is not changed.

    Returns the copy and the names of the merged BatchNorm layers. The layer before each BatchNorm comes from
    the traced graph (``torch.fx``), or from ``nn.Sequential`` adjacency when the model cannot be traced;
    a BatchNorm that does not directly follow a Conv/Linear (or follows one whose output is used elsewhere,
    or has no running statistics) raises :class:`MethodError` naming it: folding it would change the function.
    """
    pairs = _pairs(model)
    out = copy.deepcopy(model)
    for layer, bn in pairs:
        _merge(out.get_submodule(layer), out.get_submodule(bn))
        parent, _, attr = bn.rpartition(".")
        setattr(out.get_submodule(parent), attr, nn.Identity())
    return out, [bn for _, bn in pairs]


def canonized(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no BatchNorm, else its merged copy (:func:`merge_batchnorm`), made once and
    reused while the model's parameters and buffers are unchanged (version counters)."""
    if not any(isinstance(m, BATCHNORM) for m in model.modules()):
        return model
    stamp = fingerprint(model)
    hit = _CANONIZED.get(model)
    if hit is None or hit[0] != stamp:
        hit = (stamp, merge_batchnorm(model)[0])
        _CANONIZED[model] = hit
    return hit[1]
