"""Choosing a layer inside a model and turning its output into a spatial map ``(n, C, h, w)``.

Used by every method that reads a layer's activations (the CAM family and others):

* :func:`resolve_layer` finds a layer by name (or takes a module) and, when none is given,
  chooses one automatically from one probe forward pass (:func:`choose_layer`);
* :func:`to_spatial` turns a layer's output into ``(n, C, h, w)``: convolutional maps pass through,
  ViT token sequences ``(n, tokens, dim)`` are laid out on their patch grid (:func:`tokens_to_map`),
  and anything else needs a user ``reshape`` callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import ModelError
from whatmatters.core.state import find_module, hooks

Reshape = Callable[[torch.Tensor], torch.Tensor]

# Leading tokens that are not patches (CLS, distillation and register tokens) tried when a token
# sequence is laid out on the patch grid.
MAX_EXTRA_TOKENS = 8


def first_tensor(out: Any) -> torch.Tensor | None:
    """The tensor a layer returns (the first element when it returns a tuple or list)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


@dataclass
class LayerRecord:
    """One submodule seen during a probe forward pass."""

    name: str
    module: nn.Module
    output: torch.Tensor | None
    calls: int
    order: int  # when it finished (inner modules finish before the modules that contain them)


def layer_outputs(model: nn.Module, forward: Callable[[torch.Tensor], Any], example: torch.Tensor) -> list[LayerRecord]:
    """Run ``forward(example)`` once and record every submodule's output.

    Returns the submodules that ran, in the order in which they finished. Modules run several
    times per pass (shared activations, dropouts) keep their last output and their call count.
    """
    records: dict[str, LayerRecord] = {}
    counter = [0]

    def make_hook(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            rec = records.get(name)
            counter[0] += 1
            if rec is None:
                records[name] = LayerRecord(name, module, first_tensor(out), 1, counter[0])
            else:
                rec.output, rec.calls, rec.order = first_tensor(out), rec.calls + 1, counter[0]

        return hook

    handles = [m.register_forward_hook(make_hook(n, m)) for n, m in model.named_modules() if n]
    # With autograd on and an input that requires grad, modules with fused inference fast paths
    # (nn.TransformerEncoderLayer) run their submodules, as they do when gradients are taken.
    x = example.detach().requires_grad_(True) if example.is_floating_point() else example
    with hooks(*handles), torch.enable_grad():
        forward(x)
    return sorted(records.values(), key=lambda r: r.order)


def token_grid(n_tokens: int, size: tuple[int, int]) -> tuple[int, int, int] | None:
    """``(extra, h, w)``: how ``n_tokens`` split into leading extra tokens and an ``h x w`` patch grid.

    The grid must be what square patches of one size make of an image of ``size = (H, W)``
    (``h = H // p``, ``w = W // p``); the fewest extra tokens win. ``None`` when nothing fits.
    """
    height, width = size
    for extra in range(0, min(MAX_EXTRA_TOKENS, n_tokens - 2) + 1):
        patches = n_tokens - extra  # at least two: one token is a pooled summary, not a map
        for p in range(1, min(height, width) + 1):
            h, w = height // p, width // p
            if h * w == patches:
                return extra, h, w
            if h * w < patches:
                break
    return None


def tokens_to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ViT tokens ``(n, tokens, dim)`` as a map ``(n, dim, h, w)`` on the patch grid of an image of ``size``.

    Leading non-patch tokens (CLS, distillation, registers) are dropped.
    """
    grid = token_grid(x.shape[1], size)
    if grid is None:
        raise ModelError(
            f"cannot lay out {x.shape[1]} tokens on the patch grid of a {size[0]}x{size[1]} image; "
            "pass reshape= a callable turning the layer's output into (n, channels, height, width)"
        )
    extra, h, w = grid
    return x[:, extra:].reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)


def to_spatial(
    x: torch.Tensor, size: tuple[int, int], reshape: Reshape | None = None, name: str = "the layer"
) -> torch.Tensor:
    """A layer's output as a map ``(n, C, h, w)``.

    ``reshape`` (a callable) is applied when given; otherwise 4-D outputs pass through and 3-D token
    sequences are laid out on the patch grid (:func:`tokens_to_map`).
    """
    if reshape is not None:
        out = reshape(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(
                f"reshape turned {name}'s output of shape {tuple(x.shape)} into {got}; "
                "it must return a tensor of shape (n, channels, height, width)"
            )
        return out
    if x.ndim == 4:
        return x
    if x.ndim == 3:
        return tokens_to_map(x, size)
    raise ModelError(
        f"{name} outputs shape {tuple(x.shape)}, not a spatial map (n, channels, height, width); choose a "
        "convolutional layer (or a ViT block's norm) with layer=..., or pass reshape= a callable that turns "
        "this output into (n, channels, height, width)"
    )


def _is_spatial(t: torch.Tensor | None) -> bool:
    return t is not None and t.is_floating_point() and t.ndim == 4 and t.shape[-1] * t.shape[-2] > 1


def _is_tokens(t: torch.Tensor | None, size: tuple[int, int]) -> bool:
    return t is not None and t.is_floating_point() and t.ndim == 3 and token_grid(t.shape[1], size) is not None


def _norm_like(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _transformer_layer(model: nn.Module, records: list[LayerRecord], size: tuple[int, int]) -> LayerRecord | None:
    """The first norm of the last transformer block (pytorch-grad-cam's advice for ViTs).

    A block is a child of a ModuleList / Sequential of at least two modules of one class that each
    contain a norm layer. The last block's output reaches the classifier only through the CLS
    token, so gradients on its patch tokens vanish; its first norm still feeds attention.
    """
    seen = {r.name: r for r in records}
    last: LayerRecord | None = None
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        if not isinstance(parent, (nn.ModuleList, nn.Sequential)) or len(children) < 2:
            continue
        if len({type(c) for _, c in children}) != 1 or not all(any(map(_norm_like, c.modules())) for _, c in children):
            continue
        for child_name, _ in children:
            rec = seen.get(f"{parent_name}.{child_name}" if parent_name else child_name)
            if rec is not None and _is_tokens(rec.output, size) and (last is None or rec.order > last.order):
                last = rec
    if last is None:
        return None
    inside = [
        r
        for r in records
        if r.name.startswith(last.name + ".") and r.calls == 1 and _norm_like(r.module) and _is_tokens(r.output, size)
    ]
    return inside[0] if inside else last


def choose_layer(
    model: nn.Module, forward: Callable[[torch.Tensor], Any], example: torch.Tensor
) -> tuple[str, nn.Module]:
    """Choose the layer a CAM reads, from one probe forward pass on ``example`` (one sample).

    CNNs: the last spatial feature map the model computes (the output of the last convolutional
    stage: ``layer4[-1]`` of a ResNet, the last pooling layer of a VGG), named after the innermost
    module producing it. ViTs (token sequences after the last spatial map): the first norm of the
    last transformer block. Modules that run more than once per pass are never chosen.
    """
    size = (int(example.shape[-2]), int(example.shape[-1]))
    records = [r for r in layer_outputs(model, forward, example) if r.calls == 1]
    spatial = [r for r in records if _is_spatial(r.output)]
    tokens = [r for r in records if _is_tokens(r.output, size)]
    if tokens and (not spatial or tokens[-1].order > spatial[-1].order):
        rec = _transformer_layer(model, records, size)
        if rec is not None:
            return rec.name, rec.module
    if spatial:
        last = spatial[-1].output
        rec = next(r for r in spatial if r.output is last)
        return rec.name, rec.module
    names = [r.name for r in records][-8:]
    raise ModelError(
        "could not find a layer with spatial outputs (n, channels, height, width) or ViT tokens in this model; "
        f"pass layer='name' (and reshape= if its output needs it). The last layers that ran: {names}"
    )


def resolve_layer(
    model: nn.Module,
    layer: str | nn.Module | None,
    forward: Callable[[torch.Tensor], Any] | None = None,
    example: torch.Tensor | None = None,
) -> tuple[str, nn.Module]:
    """``(name, module)`` of the layer given by name or module, or chosen automatically when ``None``.

    Automatic choice needs ``forward`` and one ``example`` sample (see :func:`choose_layer`).
    """
    if layer is None:
        if forward is None or example is None:
            raise ModelError("choosing a layer automatically needs a forward function and an example input")
        return choose_layer(model, forward, example)
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ModelError(
            f"the given {type(layer).__name__} is not a submodule of the model; pass one of its layers "
            "(e.g. model.layer4[-1]) or its name from model.named_modules()"
        )
    if not isinstance(layer, str):
        raise ModelError(f"layer must be a layer name (str), an nn.Module or None, not {type(layer).__name__}")
    return layer, find_module(model, layer)
