"""The layers a tuner switches on and off: trainable parameters grouped by their layer index.

A peft LoRA model's parameters are named like ``base_model.model.encoder.layer.3.attention.self.query.lora_A.default
.weight``; the default pattern groups them by ``layer.3`` / ``layers.3`` / ``h.3`` / ``blocks.3``. Plain torch models
pass their own regex (``layers=r"blocks\\.\\d+"``). Trainable parameters outside every layer (embeddings, the head,
a peft ``modules_to_save`` classifier) stay trainable all the time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from whatmatters.core.errors import ModelError

DEFAULT_LAYERS = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+(?=\.|$)"


@dataclass
class LayerGroup:
    """One layer: its name (the matched text, e.g. ``encoder.layer.3``) and its trainable parameters."""

    name: str
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def _order(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def group_layers(model: nn.Module, pattern: str | None = None) -> tuple[list[LayerGroup], list[nn.Parameter]]:
    """``(layers, always)``: trainable parameters grouped by the layer ``pattern`` matches in their name.

    Layers come in the order of their indices; ``always`` are the trainable parameters no layer holds.
    ``ModelError`` when nothing is trainable or the pattern matches no trainable parameter.
    """
    regex = re.compile(pattern or DEFAULT_LAYERS)
    groups: dict[str, LayerGroup] = {}
    always: list[nn.Parameter] = []
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ModelError(
            "the model has no trainable parameters; wrap it with peft (get_peft_model) or leave requires_grad=True "
            "on the parameters to tune"
        )
    for name, param in trainable:
        match = regex.search(name)
        if match is None:
            always.append(param)
            continue
        key = name[: match.end()].lstrip(".")
        groups.setdefault(key, LayerGroup(key)).params.append(param)
    if not groups:
        raise ModelError(
            f"the layer pattern {regex.pattern!r} matches none of the {len(trainable)} trainable parameters "
            f"(e.g. {trainable[0][0]!r}); pass layers= a regex that matches the layer part of their names, "
            r"e.g. layers=r'blocks\.\d+'"
        )
    if len(groups) < 2:
        raise ModelError(
            f"the layer pattern found one layer ({next(iter(groups))!r}); choosing layers needs two or more"
        )
    return [groups[k] for k in sorted(groups, key=_order)], always


def _adapter_modules(layer: nn.Module) -> list[nn.Module]:
    """peft tuner layers inside ``layer``: modules whose ``scaling`` is a dict adapter name -> factor."""
    return [m for m in layer.modules() if isinstance(getattr(m, "scaling", None), dict)]


def _blend_hook(factor: float):
    def hook(_m: nn.Module, args: tuple, out):
        inp = args[0] if args else None
        tensor = out[0] if isinstance(out, tuple) else out
        if isinstance(inp, torch.Tensor) and isinstance(tensor, torch.Tensor) and inp.shape == tensor.shape:
            new = inp + factor * (tensor - inp)  # keep the input, shrink what the layer adds
        else:
            new = tensor * factor
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return hook


@contextmanager
def suppressed(model: nn.Module, names: list[str], factor: float) -> Iterator[None]:
    """Scale down what the named layers add, for one probe: peft adapters get ``scaling * factor``;
    layers without adapters have their output moved toward their input (``x + factor * (f(x) - x)``)."""
    saved: list[tuple[dict, dict]] = []
    handles = []
    try:
        for name in names:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise ModelError(
                    f"the layer {name!r} is not a submodule, so it cannot be suppressed in a probe; pass layers= a "
                    "regex whose matches are module names"
                ) from None
            adapters = _adapter_modules(layer)
            for m in adapters:
                saved.append((m.scaling, dict(m.scaling)))
                for key in m.scaling:
                    m.scaling[key] = m.scaling[key] * factor
            if not adapters:
                handles.append(layer.register_forward_hook(_blend_hook(factor)))
        yield
    finally:
        for scaling, before in saved:
            scaling.update(before)
        for h in handles:
            h.remove()
