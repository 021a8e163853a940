"""The linear layers that compress scores and acts on: which ones (by default all but output heads) and
their weight as ``(out_features, in_features)`` (``nn.Linear`` and transformers' transposed ``Conv1D``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import InputError, ModelError

# Output heads, left out of the default layer selection (as Wanda/SparseGPT leave out ``lm_head``).
HEAD_PATTERN = re.compile(r"(^|\.)(lm_head|classifier|score|qa_outputs|cls|head|heads)(\.|$)")


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` when transformers is already imported (it never is imported for this)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_prunable(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_transposed(module: nn.Module) -> bool:
    """True for ``Conv1D``, whose weight is stored ``(in_features, out_features)``."""
    return not isinstance(module, nn.Linear)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(out_features, in_features)`` (a view; transposed for ``Conv1D``)."""
    w = module.weight
    return w.t() if is_transposed(module) else w


def match_layers(found: dict[str, nn.Module], layers: str | Sequence[str], what: str) -> dict[str, nn.Module]:
    """The layers of ``found`` whose names match the regular expression(s) ``layers`` (each must match one)."""
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise InputError("layers is an empty list; give a regular expression such as r'mlp' or None for all layers")
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as err:
            raise InputError(f"layer pattern {pattern!r} is not a valid regular expression: {err}") from None
        hits = {n for n in found if regex.search(n)}
        if not hits:
            raise InputError(
                f"unknown layer pattern {pattern!r}: it matches none of the model's {len(found)} {what} "
                f"(e.g. {', '.join(list(found)[:4])}); give a regular expression searched in these names"
            )
        chosen |= hits
    return {n: m for n, m in found.items() if n in chosen}


def select_layers(model: Any, layers: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The ``nn.Linear`` / ``Conv1D`` layers to score, by name, in model order.

    ``layers=None``: all of them except output heads (``lm_head``, ``classifier``, ``score``, ...).
    A string or a list of strings: regular expressions searched in the full module names
    (``model.named_modules()``); every pattern must match at least one layer.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"weight scores and pruning need a PyTorch nn.Module (a transformers model or plain torch), "
            f"got {type(model).__name__}"
        )
    found = {name: m for name, m in model.named_modules() if name and is_prunable(m)}
    if not found:
        raise ModelError(
            f"{type(model).__name__} has no nn.Linear or transformers Conv1D layer, so it has no weights "
            "whatmatters can score or prune; convolutional layers (nn.Conv2d) are not supported yet"
        )
    if layers is None:
        chosen = {n: m for n, m in found.items() if not HEAD_PATTERN.search(n)}
        if not chosen:
            raise ModelError("every linear layer of the model is an output head; select layers with layers='regex'")
        return chosen
    return match_layers(found, layers, "linear layers")
