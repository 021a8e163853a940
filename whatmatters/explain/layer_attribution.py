"""Layer conductance, internal influence and neuron conductance: how the target output flows through a layer.

All three walk the straight path from the baseline to the input (in input space), as integrated gradients
does, with the same baselines, steps and quadrature rules, and follow captum 0.9's definitions:

* ``layer_conductance``: ``sum_k dF/dA(x_k) * (A(x_{k+1}) - A(x_k))`` over ``steps + 1`` path points
  (``unit="neuron"``); it adds up to ``F(x) - F(baseline)`` as steps grow (``extra["delta"]``);
* ``internal_influence``: the path integral of ``dF/dA`` (``unit="neuron"``);
* ``neuron_conductance``: the share of the target output that flows through one neuron, attributed to the
  inputs: ``(x - b) * sum_k w_k dF/dn(x_k) dn/dx(x_k)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from whatmatters.core.adapters import row_slices
from whatmatters.core.errors import MethodError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task, progress_bar
from whatmatters.explain.gradient import (
    GRADIENT_UNITS,
    _end_outputs,
    _where_extra,
    input_baselines,
    path_points,
    path_sum,
    rows_per_call,
)
from whatmatters.explain.layer_sites import NeuronIndex, layer_gradients, layer_site, neuron_gradients

PATH_DOC = """

    Args:
        layer: name of the layer (from ``model.named_modules()``).
        baseline: as for ``integrated_gradients`` (``"zero"``, ``"mean"``, ``"median"``, a number, an array).
        steps: points on the path.
        rule: quadrature rule, as for ``integrated_gradients`` (captum's ``method``).
        internal_batch_size: at most this many path points per forward/backward call.
"""


def _path_doc(fn: Any) -> Any:
    fn.__doc__ = (fn.__doc__ or "") + PATH_DOC
    return fn


def _setup(task: Task, layer: str, baseline: Any, internal_batch_size: int | None):
    model = task.torch_model
    site = layer_site(task, layer)
    rows = rows_per_call(task, int(np.prod(task.unit_shape)), internal_batch_size)
    return site, rows, model.to_model(task.inputs), model.to_model(input_baselines(task, baseline))


@scorer("layer_conductance", family="gradient", units=GRADIENT_UNITS, needs="gradients")
@_path_doc
def layer_conductance(
    task: Task,
    *,
    layer: str | None = None,
    baseline: Any = "zero",
    steps: int = 50,
    rule: str = "gausslegendre",
    internal_batch_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Layer conductance: the target output's change along the path, split over the layer's neurons."""
    site, rows, x_all, b_all = _setup(task, layer, baseline, internal_batch_size)
    alphas = torch.as_tensor(path_points(steps + 1, rule)[0], dtype=x_all.dtype, device=x_all.device)
    k, ones = steps + 1, (1,) * (x_all.ndim - 1)
    total = torch.zeros((task.n, *site.shape), dtype=x_all.dtype, device=x_all.device)
    # calls hold whole paths of several samples, or pieces of one path overlapping by one point
    pieces = (
        [(s, slice(0, k)) for s in row_slices(task.n, rows // k)]
        if rows >= k
        else [
            (slice(i, i + 1), slice(a, min(a + max(1, rows - 1), k - 1) + 1))
            for i in range(task.n)
            for a in range(0, k - 1, max(1, rows - 1))
        ]
    )
    for s, p in progress_bar(pieces, len(pieces), "layer conductance", task.progress):
        x, b = x_all[s], b_all[s] if b_all.shape[0] == task.n else b_all
        m, a = len(x), alphas[p]
        path = (b.unsqueeze(1) + a.view(1, -1, *ones) * (x - b).unsqueeze(1)).flatten(0, 1)
        acts, grads = layer_gradients(task, site, path, task.target[s].repeat_interleave(len(a)))
        acts, grads = acts.view(m, len(a), *site.shape), grads.view(m, len(a), *site.shape)
        total[s] += (grads[:, :-1] * (acts[:, 1:] - acts[:, :-1])).sum(1)
    f_x, f_b = _end_outputs(task, torch.cat([x_all, b_all]), rows).chunk(2)  # both ends in one batch
    delta = total.flatten(1).sum(1) - (f_x - f_b)
    extra = {"delta": delta.detach().cpu().double().numpy(), "max_abs_delta": float(delta.abs().max())}
    return total, {**extra, **_where_extra(site, None)}


@scorer("internal_influence", family="gradient", units=GRADIENT_UNITS, needs="gradients")
@_path_doc
def internal_influence(
    task: Task,
    *,
    layer: str | None = None,
    baseline: Any = "zero",
    steps: int = 50,
    rule: str = "gausslegendre",
    internal_batch_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Internal influence: the gradient of the target output at the layer, integrated along the input path."""
    site, rows, x_all, b_all = _setup(task, layer, baseline, internal_batch_size)

    def grad_at(path: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return layer_gradients(task, site, path, task.target[i])[1]

    total = path_sum(task, x_all, b_all, path_points(steps, rule), rows, grad_at, "internal influence")
    return total, _where_extra(site, None)


@scorer("neuron_conductance", family="gradient", units=GRADIENT_UNITS, needs="gradients")
@_path_doc
def neuron_conductance(
    task: Task,
    *,
    layer: str | None = None,
    neuron: NeuronIndex | None = None,
    baseline: Any = "zero",
    steps: int = 50,
    rule: str = "gausslegendre",
    internal_batch_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Neuron conductance: the part of the target output that flows through one neuron, attributed to the inputs.

    ``neuron``: the element of the layer's output, a flat index or one index per activation dimension.
    """
    site, rows, x_all, b_all = _setup(task, layer, baseline, internal_batch_size)
    if neuron is None:
        raise MethodError(f"neuron_conductance needs neuron=, an element of layer {site.name!r}'s output {site.shape}")
    index = site.neuron(neuron)

    def grad_at(path: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return neuron_gradients(task, site, index, path, task.target[i])

    total = path_sum(task, x_all, b_all, path_points(steps, rule), rows, grad_at, "neuron conductance")
    return (x_all - b_all) * total, _where_extra(site, index)
