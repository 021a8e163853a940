"""Per-sample gradients of a classifier, vectorized with ``torch.func`` (``vmap`` over ``grad``), and their
random projections: what GraNd, TracIn and the TRAK-like estimator share.

Gradients are taken with respect to the model's trainable parameters (``requires_grad=True``), with the model's
buffers held fixed (score models in eval mode); the model itself is never changed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from whatmatters.core.errors import MethodError, ModelError
from whatmatters.curate.example_task import ExampleTask

OUTPUTS = ("loss", "margin")


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ModelError(
            "the model has no trainable parameters (requires_grad=False everywhere); per-sample gradients need some"
        )
    return params


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in _trainable(model).values())


def _output_fn(model: nn.Module, output: str):
    if output not in OUTPUTS:
        raise MethodError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (params, buffers), (x.unsqueeze(0),)).squeeze(0)
        if output == "loss":
            return F.cross_entropy(logits, y)
        # TRAK's margin: log p_y / (1 - p_y) = logit_y - logsumexp of the other logits
        is_label = torch.arange(logits.shape[0], device=logits.device) == y
        return (logits * is_label).sum() - torch.logsumexp(logits.masked_fill(is_label, -math.inf), 0)

    return one


def per_sample_gradients(
    task: ExampleTask, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, output: str = "loss"
) -> Iterator[torch.Tensor]:
    """Flattened gradients ``(b, n_parameters)`` of each example's loss (or margin), one batch at a time."""
    params = _trainable(model)
    per_example = vmap(grad(_output_fn(model, output)), in_dims=(None, 0, 0))
    for xb, yb in task.chunks(x, y, model, f"{task.method} gradients"):
        g = per_example(params, xb, yb)
        yield torch.cat([g[name].reshape(len(xb), -1) for name in params], 1)


def projection(
    n_params: int, dim: int, *, seed: int, kind: str, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A seeded ``(n_params, dim)`` random projection (Gaussian or Rademacher entries, scaled by 1/sqrt(dim))."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "gaussian":
        matrix = torch.randn(n_params, dim, generator=gen)
    elif kind == "rademacher":
        matrix = torch.randint(0, 2, (n_params, dim), generator=gen).mul_(2).sub_(1).float()
    else:
        raise MethodError(f"projection must be 'gaussian' or 'rademacher', got {kind!r}")
    return matrix.div_(math.sqrt(dim)).to(device, dtype)
