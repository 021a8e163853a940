"""``whatmatters.compress.prune``: zero the least important weights of a model (a copy, by default).

Unstructured and N:M sparsity set weights to zero in place of the copy: the architecture and the
parameter shapes are unchanged, so the pruned model saves and loads with ``save_pretrained`` /
``from_pretrained`` (or ``state_dict``) like the original. Structured removal (heads, neurons, layers),
which does shrink the parameter count, is a separate action.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from whatmatters.compress.api import ModelImportance, score
from whatmatters.compress.linear import is_prunable, select_layers, weight_matrix
from whatmatters.compress.sparsity import masks as make_masks
from whatmatters.core.actions import Compressed
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.state import find_module


@dataclass
class PruneReport:
    """What ``prune`` did: one row per layer with its target and achieved sparsity."""

    method: str
    pattern: str
    allocation: str
    group: str
    target: float
    layers: list[dict[str, Any]] = field(default_factory=list)
    n_parameters: int = 0

    @property
    def n_weights(self) -> int:
        return sum(r["n_weights"] for r in self.layers)

    @property
    def achieved(self) -> float:
        """Fraction of zero weights over the pruned layers."""
        return sum(r["zeros"] for r in self.layers) / max(self.n_weights, 1)

    @property
    def model_sparsity(self) -> float:
        """Zero weights of the pruned layers as a fraction of all the model's parameters."""
        return sum(r["zeros"] for r in self.layers) / max(self.n_parameters, 1)

    def to_frame(self):
        """A pandas DataFrame: layer, shape, n_weights, target sparsity, pruned fraction, achieved sparsity."""
        import pandas as pd

        frame = pd.DataFrame(self.layers).set_index("layer")
        frame["achieved"] = frame["zeros"] / frame["n_weights"]
        return frame

    def __repr__(self) -> str:
        return (
            f"PruneReport(method={self.method!r}, pattern={self.pattern!r}, allocation={self.allocation!r}, "
            f"{len(self.layers)} layers, target={self.target:.3g}, achieved={self.achieved:.4f}, "
            f"model_sparsity={self.model_sparsity:.4f})"
        )


Pruned = Compressed  # the result: (model, PruneReport)


def prune(
    model: nn.Module,
    importance: ModelImportance | str,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    allocation: str = "uniform",
    *,
    group: str = "row",
    spread: float = 0.1,
    inplace: bool = False,
    data: Any = None,
    tokenizer: Any = None,
    layers: str | Sequence[str] | None = None,
    **score_kwargs: Any,
) -> Pruned:
    """Set the least important weights of ``model`` to zero.

    Args:
        model: the model the importance was computed for (``nn.Module``, transformers included).
        importance: a :class:`ModelImportance` from ``whatmatters.compress.score``, or a method name
            (then scored here with ``data``, ``tokenizer``, ``layers`` and ``score_kwargs``).
        sparsity: fraction of weights to zero, in ``[0, 1)``; default 0.5 (``1 - N/M`` for N:M).
        pattern: ``"unstructured"`` or ``"N:M"`` (``N`` kept of every ``M`` consecutive inputs, e.g. ``"2:4"``).
        allocation: ``"uniform"`` (every layer at ``sparsity``), ``"global"`` (one threshold over all layers)
            or ``"proportional"`` (layers with higher mean importance pruned less, within ``± spread``).
        group: comparison group for unstructured uniform/proportional pruning: ``"row"`` (each output row,
            as Wanda) or ``"layer"``.
        inplace: prune ``model`` itself instead of a deep copy.
        layers: with a ``ModelImportance``, prune only its layers matching these regexes.

    Returns:
        ``Pruned(model, report)``: the pruned model (a new one unless ``inplace``) and a
        :class:`PruneReport` with the achieved sparsity of every layer.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"prune needs a PyTorch nn.Module, got {type(model).__name__}")
    if isinstance(importance, str):
        importance = score(model, importance, data, tokenizer=tokenizer, layers=layers, **score_kwargs)
        if not isinstance(importance, ModelImportance):
            raise InputError(f"{importance.method} does not score weights; prune needs a weight score")
    elif not isinstance(importance, ModelImportance):
        raise InputError(
            f"importance must be a ModelImportance from whatmatters.compress.score or a method name, "
            f"got {type(importance).__name__}"
        )
    elif score_kwargs or data is not None:
        raise InputError("data / score parameters are only used when importance is a method name")
    names = list(importance)
    if layers is not None:
        wanted = set(select_layers(model, layers))
        names = [n for n in names if n in wanted]
        if not names:
            raise InputError(f"layers={layers!r} selects none of the scored layers")
    for name in names:
        module = find_module(model, name)
        if not is_prunable(module):
            raise ModelError(f"{name} is a {type(module).__name__}; only nn.Linear / Conv1D weights can be pruned")
        expected = tuple(weight_matrix(module).shape)
        if tuple(importance[name].unit_shape) != expected:
            raise ModelError(
                f"the importance of {name} has shape {importance[name].unit_shape} but the layer's weight is "
                f"{expected} (out, in): the importance was computed for another model"
            )
    scores = {n: importance[n].values for n in names}
    keep, targets = make_masks(scores, sparsity, pattern, allocation, group=group, spread=spread)

    pruned = model if inplace else copy.deepcopy(model)
    rows = []
    with torch.no_grad():
        for name in names:
            w = weight_matrix(find_module(pruned, name))
            mask = keep[name].to(w.device)
            w.masked_fill_(~mask, 0)
            rows.append(
                {
                    "layer": name,
                    "shape": tuple(w.shape),
                    "n_weights": w.numel(),
                    "target": targets[name],
                    "pruned": int((~mask).sum()),
                    "zeros": int((w == 0).sum()),
                }
            )
    if sum(r["pruned"] for r in rows) == 0 and any(t > 0 for t in targets.values()):
        warnings.warn(
            f"sparsity={sparsity} rounds to 0 weights in every {group if allocation != 'global' else 'layer'} "
            "group, so nothing is pruned; raise sparsity",
            UserWarning,
            stacklevel=2,
        )
    target = sparsity if sparsity is not None else next(iter(targets.values()))
    if pattern == "unstructured" and sparsity is None:
        target = 0.5
    report = PruneReport(
        method=importance.method,
        pattern=pattern,
        allocation=allocation,
        group=group if pattern == "unstructured" and allocation != "global" else "-",
        target=float(target),
        layers=rows,
        n_parameters=sum(p.numel() for p in pruned.parameters()),
    )
    return Pruned(pruned, report)


def measure(model: nn.Module, layers: str | Sequence[str] | None = None) -> dict[str, float]:
    """Fraction of zero weights of every selected linear layer (e.g. after reloading a pruned model)."""
    chosen = select_layers(model, layers)
    return {n: float((weight_matrix(m) == 0).double().mean()) for n, m in chosen.items()}
