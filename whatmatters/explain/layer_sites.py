"""A named layer inside a torch model as a place to attribute to: its activations, gradients there, one neuron.

Layer attributions (``layer=`` on the gradient family, conductance, internal influence) score the elements of a
layer's output, ``unit="neuron"`` with values of shape ``(n, *activation_shape)``; ``neuron=`` picks one element
of that output (a flat index, or one index per activation dimension) whose value is explained instead of the
model's target output. One forward hook per pass, removed on exit; the layer's output is handed on as a copy,
so in-place operations after it (``ReLU(inplace=True)``) never touch the tensor gradients are taken at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from whatmatters.core.adapters import row_slices
from whatmatters.core.errors import MethodError, ModelError
from whatmatters.core.layers import first_tensor, resolve_layer
from whatmatters.core.state import autograd_on, hooks
from whatmatters.core.task import Task

NeuronIndex = int | tuple[int, ...] | list[int]


@dataclass(frozen=True)
class LayerSite:
    """A layer of the task's model: its name, module and the shape of its output per sample."""

    name: str
    module: nn.Module
    shape: tuple[int, ...]

    def neuron(self, index: Any) -> int:
        """``index`` (flat, or one int per activation dimension) as a flat index into the activation."""
        size = int(np.prod(self.shape))
        if isinstance(index, (list, tuple)):
            if len(index) != len(self.shape) or not all(
                isinstance(i, int) and 0 <= i < s for i, s in zip(index, self.shape)
            ):
                raise MethodError(
                    f"neuron {tuple(index)!r} is not inside layer {self.name!r}, whose output per sample has shape "
                    f"{self.shape}: give one index per dimension, each below its size, or a flat index below {size}"
                )
            return int(np.ravel_multi_index(tuple(index), self.shape))
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
            raise MethodError(
                f"neuron {index!r} is out of range: layer {self.name!r} has {size} neurons per sample "
                f"(output shape {self.shape}); give a flat index 0..{size - 1} or a tuple of {len(self.shape)} indices"
            )
        return int(index)


def layer_site(task: Task, layer: Any) -> LayerSite:
    """The layer named ``layer`` (a name from ``model.named_modules()`` or a submodule), its output shape probed."""
    model = task.torch_model
    if layer is None or layer == "":
        raise MethodError("layer= must name a layer of the model (a name from model.named_modules())")
    name, module = resolve_layer(model.module, layer)
    with passing(module, name, lambda t: t) as seen, torch.no_grad():
        model.forward(model.to_model(task.inputs[:1]))
    return LayerSite(name, module, tuple(seen[0].shape[1:]))


@contextmanager
def passing(module: nn.Module, name: str, keep: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """A forward hook on ``module`` for the block: its output ``t`` becomes ``keep(t)`` (recorded in the
    yielded list) and the rest of the model reads a copy of that. Refuses layers that run other than once."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
        tensor = first_tensor(out)
        if tensor is None:
            raise ModelError(f"layer {name!r} returned a {type(out).__name__}, not a tensor; choose one that does")
        kept = keep(tensor)
        seen.append(kept)
        new = kept.clone()
        if isinstance(out, torch.Tensor):
            return new
        return type(out)([new, *out[1:]]) if isinstance(out, list) else (new, *out[1:])

    with hooks(module.register_forward_hook(hook)):
        yield seen
    if len(seen) != 1:
        raise ModelError(
            f"layer {name!r} ran {len(seen)} times in one forward pass (unused or shared module); "
            "choose a layer that runs exactly once, e.g. the block that contains it"
        )


def layer_activations(task: Task, site: LayerSite, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The layer's outputs for the rows of ``x`` (no gradients), in batches of ``rows``."""
    model = task.torch_model
    parts = []
    for s in row_slices(len(x), rows):
        with passing(site.module, site.name, lambda t: t) as seen, torch.no_grad():
            model.forward(model.to_model(x[s]))
        parts.append(seen[0])
    return torch.cat(parts)


def _no_gradient(site: LayerSite) -> ModelError:
    return ModelError(
        f"the explained output does not depend differentiably on layer {site.name!r}; "
        "choose a layer between the input and the output that the prediction is computed from"
    )


def layer_gradients(
    task: Task,
    site: LayerSite,
    x: torch.Tensor,
    target: torch.Tensor,
    values: torch.Tensor | None = None,
    rows: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(activations, d target / d activations)`` for model inputs ``x`` (on the model's device).

    With ``values`` the layer's output is replaced by them (rows like ``x``'s): the gradient is taken there.
    ``rows``: ``x`` is ``task.inputs[rows]`` itself, so the forward may choose their target.
    """
    with autograd_on():
        with passing(
            site.module, site.name, lambda t: (t if values is None else values).detach().requires_grad_(True)
        ) as seen:
            out = task.forward_target(x, target, rows)
        if not out.requires_grad:
            raise _no_gradient(site)
        (grad,) = torch.autograd.grad(out.sum(), seen[0], allow_unused=True)
    if grad is None:
        raise _no_gradient(site)
    return seen[0].detach(), grad


def neuron_gradients(
    task: Task, site: LayerSite, neuron: int, x: torch.Tensor, target: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient of the neuron's activation with respect to the inputs ``x``; with ``target`` times the gradient
    of the target output with respect to the neuron (one pass: the chain rule through that one neuron)."""
    from whatmatters.explain.gradient import NO_GRADIENT

    with autograd_on():
        inputs = x.detach().clone().requires_grad_(True)
        with passing(site.module, site.name, lambda t: t) as seen:
            out = task.forward_target(inputs, target) if target is not None else task.torch_model.forward(inputs)
        value = seen[0].flatten(1)[:, neuron]
        if not value.requires_grad:
            raise ModelError(NO_GRADIENT)
        if target is not None:
            (upstream,) = torch.autograd.grad(out.sum(), seen[0], retain_graph=True, allow_unused=True)
            if upstream is None:
                raise _no_gradient(site)
            value = value * upstream.flatten(1)[:, neuron]
        (grad,) = torch.autograd.grad(value.sum(), inputs, allow_unused=True)
    if grad is None:
        raise ModelError(NO_GRADIENT)
    return grad


def replaced_outputs(
    task: Task, site: LayerSite, x: torch.Tensor, target: torch.Tensor, values: torch.Tensor, rows: int
) -> torch.Tensor:
    """Target outputs for inputs ``x`` with the layer's output replaced by ``values`` (no gradients)."""
    model = task.torch_model
    outs = []
    for s in row_slices(len(x), rows):
        with passing(site.module, site.name, lambda t, v=values[s]: v) as _, torch.no_grad():
            outs.append(task.forward_target(model.to_model(x[s]), target[s]))
    return torch.cat(outs)
