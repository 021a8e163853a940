"""DeepLIFT (rescale rule) and DeepLiftShap: contributions of ``x - baseline`` with multipliers, not gradients.

The samples and their baselines go through the model in one batch (rows ``[x; b]``; a baseline shared by all
samples, such as the zero one, is one row of that batch). In the backward pass each
nonlinearity's gradient is replaced by its multiplier ``(f(x) - f(b)) / (x - b)`` (the rescale rule of
Shrikumar et al. 2017; where ``|x - b| < eps`` the ordinary gradient), max pooling by captum's rule (the
change of each window's maximum sent to the sample's argmax, as captum does). Linear layers keep their
gradients, so the attributions ``(x - b) * multiplier`` add up to ``f(x) - f(b)`` (completeness; reported as
``extra["delta"]``). Nonlinearities must be modules (``nn.ReLU``, not ``F.relu``), as in captum; a module
used several times is fine here (captum refuses it).

Softmax uses the elementwise rescale multiplier like the other activations. captum then subtracts the mean
multiplier of the whole batch tensor, which makes its result depend on the batch and breaks completeness;
we do not, so DeepLIFT through a softmax differs from captum's (parity is tested without softmax layers).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core.adapters import row_slices
from whatmatters.core.errors import MethodError
from whatmatters.core.registry import scorer
from whatmatters.core.state import autograd_on
from whatmatters.core.task import Task, progress_bar
from whatmatters.explain.gradient import GRADIENT_UNITS, input_baselines, rows_per_call
from whatmatters.explain.modified_backward import local_vjp, modified_backward
from whatmatters.explain.shapley import background_rows

ELEMENTWISE = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softmax, nn.GELU, nn.SiLU)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _floor(eps: float, x: torch.Tensor) -> float:
    """``eps``, at least the dtype's smallest normal number: ``|dx| < eps`` then also holds where dx == 0
    (an eps below the dtype's range must not divide by 0)."""
    return max(eps, torch.finfo(x.dtype).tiny)


def _rescale(eps: float, samples: int | None):
    def rule(module: nn.Module, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        k = len(x) // 2 if samples is None else samples  # rows [samples; their baselines, or one for all]
        dx = x[:k] - x[k:]
        small = dx.abs() < _floor(eps, dx)
        out = torch.empty_like(grad)
        new = torch.mul(grad[:k], y[:k] - y[k:], out=out[:k]).div_(dx.masked_fill_(small, 1.0))
        if bool(small.any()):
            new.copy_(torch.where(small, local_vjp(module, x[:k], grad[:k]), new))
        out[k:].zero_()
        return out

    return rule


def _pool_indices(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Flat input index (within each channel's plane) of every output's maximum, ``(n, c, outputs)``."""
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[x.ndim - 2]
    args = (module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    return pool(x.detach(), *args, return_indices=True)[1].flatten(2)


def _max_pool(eps: float, samples: int | None):
    def rule(module: nn.Module, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        k = len(x) // 2 if samples is None else samples
        out, ref = y[:k], y[k:]
        top = torch.maximum(out, ref)
        g = grad[:k]
        idx = _pool_indices(module, x)  # one pooling pass for the samples and the baselines
        # the rise to the common maximum goes to the sample's argmax, the rest to the baseline's (one scatter)
        both = torch.cat([g * (top - ref), g * (out - top)], dim=1).flatten(2)
        where = torch.cat([idx[:k], idx[k:].expand(k, -1, -1)], dim=1)
        plane = x[:k].flatten(2)
        spread = plane.new_zeros(k, 2 * plane.shape[1], plane.shape[2]).scatter_add_(2, where, both)
        spread = (spread[:, : plane.shape[1]] + spread[:, plane.shape[1] :]).view_as(x[:k])
        dx = x[:k] - x[k:]
        small = dx.abs() < _floor(eps, dx)
        new = spread.div_(dx.masked_fill(small, 1.0))
        if bool(small.any()):
            plain = plane.new_zeros(plane.shape).scatter_add_(2, idx[:k], g.flatten(2)).view_as(x[:k])
            new = torch.where(small, plain, new)
        return torch.cat([new, torch.zeros_like(x[k:])])

    return rule


def deeplift_rules(eps: float, samples: int | None = None) -> dict[type, Any]:
    """The rules for rows ``[samples; baselines]``: ``samples`` rows (None: half of them), then one baseline
    per sample or one for all of them."""
    rescale, pool = _rescale(eps, samples), _max_pool(eps, samples)
    return {**{t: rescale for t in ELEMENTWISE}, **{t: pool for t in POOLS}}


def _check_eps(eps: float) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise MethodError(f"eps must be a positive number, got {eps!r}")


def deeplift_pairs(
    task: Task,
    x: torch.Tensor,
    base: torch.Tensor,
    sample_of: torch.Tensor,
    eps: float,
    description: str,
    samples: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepLIFT of rows ``x`` against rows ``base`` (same shape, or one row for all): ``(attributions, f(x) -
    f(base))``. A shared baseline goes through the model once per call (rows ``[x; b]``, not ``[x; b x n]``).

    Row ``j`` explains the target of sample ``sample_of[j]``. ``samples``: ``x`` is ``task.inputs`` itself, so
    the forward may choose the targets (``Task.outputs_at_targets``).
    """
    model = task.torch_model
    shared = len(base) == 1
    rows = max(1, rows_per_call(task, int(np.prod(x.shape[1:]))) // 2)
    attributions = torch.empty(x.shape, dtype=model.dtype, device=model.device)
    differences = torch.empty(len(x), dtype=model.dtype, device=model.device)
    replaced = 0
    chunks = row_slices(len(x), rows)
    for s in progress_bar(chunks, len(chunks), description, task.progress):
        xs, bs = model.to_model(x[s]), model.to_model(base if shared else base[s])
        k = len(xs)
        rules = modified_backward(model.module, deeplift_rules(eps, k))
        with autograd_on(), rules as m:
            leaf = torch.cat([xs, bs]).detach().requires_grad_(True)
            raw = model.forward(leaf)
            if shared:  # the one baseline row, read at every sample's target
                raw = torch.cat([raw[:k], raw[k:].expand(k, -1)])
            out = task.outputs_at_targets(raw, sample_of[s].repeat(2), s if samples else None)
            (grad,) = torch.autograd.grad(out[:k].sum(), leaf)
        replaced += m.calls
        attributions[s] = (xs - bs) * grad[:k]
        differences[s] = (out[:k] - out[k:]).detach()
    if replaced == 0:
        warnings.warn(
            f"{description}: the model has none of the nonlinear modules DeepLIFT knows "
            f"({', '.join(t.__name__ for t in ELEMENTWISE)}, MaxPool); if it uses functional activations "
            "(F.relu), write them as modules. The result equals gradient x (input - baseline).",
            stacklevel=4,
        )
    return attributions, differences


def _completeness(attributions: torch.Tensor, differences: torch.Tensor) -> dict[str, Any]:
    delta = attributions.flatten(1).sum(1) - differences
    return {"delta": delta.detach().cpu().double().numpy(), "max_abs_delta": float(delta.abs().max())}


# the first forward runs [samples; baselines]: it checks a given target (no probe row) and, for deeplift, chooses
# the predicted one
DEEPLIFT: dict[str, Any] = {"family": "gradient", "units": GRADIENT_UNITS, "needs": "module", "checks_target": True}


@scorer("deeplift", aliases=("deep_lift",), predicts_target=True, **DEEPLIFT)
def deeplift(task: Task, *, baseline: Any = "zero", eps: float = 1e-10) -> tuple[torch.Tensor, dict[str, Any]]:
    """DeepLIFT (rescale rule): ``(x - baseline)`` times multipliers that replace the nonlinearities' gradients.

    Args:
        baseline: ``"zero"`` (captum's default), ``"mean"`` / ``"median"`` of the background (or the data),
            a number, one sample-shaped array, or one baseline per sample.
        eps: below this ``|x - baseline|`` at a nonlinearity's input, its ordinary gradient is used.

    ``extra["delta"]``: ``sum(attributions) - (f(x) - f(baseline))`` per sample (0 up to rounding).
    """
    _check_eps(eps)
    base = input_baselines(task, baseline).to(task.inputs.dtype)  # (1, ...) when shared: one row per model call
    samples = torch.arange(task.n)
    attributions, differences = deeplift_pairs(task, task.inputs, base, samples, float(eps), "deeplift", True)
    return attributions, _completeness(attributions, differences)


@scorer("deeplift_shap", aliases=("deep_lift_shap",), **DEEPLIFT)
def deeplift_shap(task: Task, *, max_background: int = 100, eps: float = 1e-10) -> tuple[torch.Tensor, dict[str, Any]]:
    """DeepLiftShap: DeepLIFT averaged over the background rows as baselines (captum's ``DeepLiftShap``).

    Args:
        max_background: at most this many background rows (the data when no background is given), a seeded
            subsample of larger ones.
        eps: as for ``deeplift``.

    ``extra["delta"]``: ``sum(attributions) - (f(x) - mean f(background))`` per sample.
    """
    _check_eps(eps)
    if not isinstance(max_background, int) or isinstance(max_background, bool):
        raise MethodError(f"max_background must be a positive integer, got {max_background!r}")
    bg = background_rows(task, max_background)
    n, nb = task.n, len(bg)
    x = task.inputs.repeat_interleave(nb, dim=0)
    base = bg.repeat(n, *(1,) * (bg.ndim - 1))
    attributions, differences = deeplift_pairs(
        task, x, base, torch.arange(n).repeat_interleave(nb), float(eps), "deeplift_shap"
    )
    attributions = attributions.view(n, nb, *task.unit_shape).mean(1)
    return attributions, _completeness(attributions, differences.view(n, nb).mean(1))
