"""Gradient attributions: saliency, gradient x input, integrated gradients and SmoothGrad.

All of them are gradients of the target output with respect to the input, taken in batches of
rows on the model's device and in its dtype. Rows per forward/backward call are bounded: by
``internal_batch_size`` (integrated gradients), else the ``batch_size`` given to ``explain``, else
about ``ROW_ELEMENTS`` input values per call (on a CPU, at most as many rows as keep the Linear layers'
outputs of a call in cache: ``TorchModel.cache_rows``). The user's inputs are never modified.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from whatmatters.core.adapters import row_slices
from whatmatters.core.errors import MethodError, ModelError
from whatmatters.core.registry import scorer
from whatmatters.core.state import autograd_on
from whatmatters.core.task import Task, progress_bar
from whatmatters.explain.baselines import baseline_row, baseline_values
from whatmatters.explain.layer_sites import (
    LayerSite,
    NeuronIndex,
    layer_activations,
    layer_gradients,
    layer_site,
    neuron_gradients,
    replaced_outputs,
)

# Input values per forward/backward call when no batch size is given (1 M values: 4 MB in float32).
ROW_ELEMENTS = 2**20

NO_GRADIENT = (
    "the model's output has no gradient with respect to its input (its forward pass detaches the input, "
    "goes through NumPy, or runs under torch.no_grad), so gradient methods cannot explain it. Keep the "
    "forward pass differentiable in torch, or use a perturbation method such as 'ablation' or 'permutation'."
)

GRADIENT_UNITS = ("feature", "pixel")
# every one reads model outputs through Task.forward_target: a given target is checked there (no probe row)
GRADIENT_METHOD: dict[str, Any] = {
    "family": "gradient",
    "units": GRADIENT_UNITS,
    "needs": "gradients",
    "checks_target": True,
}


def rows_per_call(task: Task, row_numel: int, limit: int | None = None) -> int:
    """Rows per forward/backward call: ``limit`` (checked), else ``batch_size``, else about ``ROW_ELEMENTS`` values
    (on a CPU at most :meth:`TorchModel.cache_rows`)."""
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise MethodError(f"internal_batch_size must be a positive integer, got {limit!r}")
        return limit
    if task.batch_size:
        return int(task.batch_size)
    rows = max(1, ROW_ELEMENTS // max(1, row_numel))
    cap = task.torch_model.cache_rows()
    return rows if cap is None else min(rows, cap)


def input_gradients(task: Task, x: torch.Tensor, target: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """Gradient of each row's target output with respect to that row, in one forward/backward call.

    ``x`` is on the model's device and in its dtype; it is not modified (a fresh leaf is used). ``rows``:
    ``x`` is ``task.inputs[rows]`` itself, so the forward may choose their target (``Task.targets_for``).
    Raises :class:`ModelError` when the output does not depend differentiably on the input.
    """
    with autograd_on():
        leaf = x.detach().clone().requires_grad_(True)  # a copy: also a normal tensor under inference_mode
        out = task.forward_target(leaf, target, rows)
        if not out.requires_grad:
            raise ModelError(NO_GRADIENT)
        (grad,) = torch.autograd.grad(out.sum(), leaf, allow_unused=True)
    if grad is None:
        raise ModelError(NO_GRADIENT)
    return grad


def _where(task: Task, layer: Any, neuron: Any) -> tuple[LayerSite | None, int | None]:
    """The layer attributed to (None: the inputs) and the neuron explained (None: the target output)."""
    if layer is None:
        if neuron is not None:
            raise MethodError("neuron= needs layer=, the name of the layer the neuron is in")
        return None, None
    site = layer_site(task, layer)
    return site, None if neuron is None else site.neuron(neuron)


def _where_extra(site: LayerSite | None, neuron: int | None) -> dict[str, Any]:
    """``extra`` of a layer (``unit="neuron"``) or neuron attribution; nothing for input attributions."""
    if site is None:
        return {}
    if neuron is None:
        return {"unit": "neuron", "layer": site.name, "activation_shape": list(site.shape)}
    return {"layer": site.name, "neuron": neuron}


def gradient_map(
    task: Task,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    description: str,
    layer: Any = None,
    neuron: Any = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``fn(values, grad)`` for every sample, in batches of rows: the inputs and the target's gradient there, or
    a layer's activations and the gradient there (``layer``), or the inputs and a neuron's gradient (``neuron``)."""
    model = task.torch_model
    site, index = _where(task, layer, neuron)
    rows = rows_per_call(task, math.prod(task.unit_shape))
    if index is not None:
        task.choose_targets()  # a neuron's gradient reads no target: the predicted class is only reported
    out = None
    chunks = row_slices(task.n, rows)
    for s in progress_bar(chunks, len(chunks), description, task.progress):
        x = model.to_model(task.inputs[s])
        if site is None:
            values = fn(x, input_gradients(task, x, task.target[s], s))
        elif index is None:
            values = fn(*layer_gradients(task, site, x, task.target[s], rows=s))
        else:
            values = fn(x, neuron_gradients(task, site, index, x))
        if len(chunks) == 1:  # (contiguous: a gradient straight from the output's backward may be an expanded view)
            return values.contiguous(), _where_extra(site, index)
        if out is None:
            out = torch.empty((task.n, *values.shape[1:]), dtype=values.dtype, device=values.device)
        out[s] = values
    return out, _where_extra(site, index)


LAYER_DOC = """

    ``layer``: a layer name from ``model.named_modules()``: attribute to that layer's output instead of the
    inputs (``unit="neuron"``, values ``(n, *activation_shape)``, ``extra["layer"]``). ``neuron`` (with
    ``layer``): explain that element of the layer's output (a flat index, or one index per activation
    dimension) instead of the target output, attributed to the inputs.
"""


def _layer_doc(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn.__doc__ = (fn.__doc__ or "") + LAYER_DOC
    return fn


@scorer("saliency", predicts_target=True, **GRADIENT_METHOD)
@_layer_doc
def saliency(
    task: Task, *, abs: bool = True, layer: str | None = None, neuron: NeuronIndex | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Saliency: the gradient of the target output with respect to each input (absolute value by default)."""
    return gradient_map(task, lambda x, g: g.abs() if abs else g, "saliency", layer, neuron)


@scorer("gradient_x_input", aliases=("input_x_gradient",), predicts_target=True, **GRADIENT_METHOD)
@_layer_doc
def gradient_x_input(
    task: Task, *, layer: str | None = None, neuron: NeuronIndex | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Gradient x input: each input times the gradient of the target output with respect to it.

    With ``layer``: activation x gradient (captum's ``LayerGradientXActivation``).
    """
    return gradient_map(task, lambda x, g: x * g, "gradient x input", layer, neuron)


def path_points(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``alpha`` in [0, 1] along the path and their quadrature weights (summing to 1).

    ``gausslegendre`` (Gauss-Legendre nodes on [0, 1]), ``riemann_left`` / ``_right`` /
    ``_middle`` and ``riemann_trapezoid`` (``steps`` points from 0 to 1, spacing ``1/(steps-1)``;
    captum's trapezoid weights sum to ``(steps-1)/steps`` instead of 1).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise MethodError(f"steps must be a positive integer, got {steps!r}")
    alphas, weights = _path_points(steps, rule)
    return alphas.copy(), weights.copy()  # (the cached arrays stay as they are whatever a caller does)


@functools.lru_cache(maxsize=64)
def _path_points(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`path_points` once per ``(steps, rule)`` (Gauss-Legendre nodes cost ~0.25 ms to compute)."""
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1.0), 0.5 * weights
    k = np.arange(steps, dtype=np.float64)
    if rule == "riemann_trapezoid":
        if steps < 2:
            raise MethodError("riemann_trapezoid needs steps >= 2")
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
        return k / (steps - 1), weights
    offsets = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}
    if rule not in offsets:
        raise MethodError(
            f"unknown rule {rule!r}; use 'gausslegendre', 'riemann_trapezoid', 'riemann_middle', "
            "'riemann_left' or 'riemann_right'"
        )
    return (k + offsets[rule]) / steps, np.full(steps, 1.0 / steps)


def input_baselines(task: Task, baseline: Any) -> torch.Tensor:
    """Baselines as ``(n, *unit_shape)`` or ``(1, *unit_shape)`` on the CPU in the inputs' dtype."""
    if isinstance(baseline, (str, int, float)):
        return baseline_row(task, baseline).unsqueeze(0)
    value = baseline_values(baseline)
    if tuple(value.shape) == tuple(task.inputs.shape):
        return value.to(task.inputs.dtype)
    return baseline_row(task, value).unsqueeze(0)


def _end_outputs(task: Task, ends: torch.Tensor, rows: int) -> torch.Tensor:
    """Target outputs (no gradients) of ``ends``: the samples, then any number of baseline rows for them
    (row ``j`` is for sample ``j % n``) or one baseline row for all (read at every sample's target), in batches
    of ``rows``. The samples' own outputs choose an undecided target (``Task.targets_for``) before a baseline
    row reads it, so no separate prediction runs."""
    model, n = task.torch_model, task.n
    shared = len(ends) == n + 1
    outs = []
    with torch.no_grad():
        for s in row_slices(len(ends), rows):
            out = model.forward(model.to_model(ends[s]))
            own = slice(s.start, min(s.stop, n))  # rows of the samples themselves (empty past them)
            sample_of = torch.arange(s.start, s.stop) % n
            if shared and s.stop > n:  # the last row is every sample's baseline
                out, sample_of = (
                    torch.cat([out[:-1], out[-1:].expand(n, -1)]),
                    torch.cat([sample_of[:-1], torch.arange(n)]),
                )
            outs.append(task.outputs_at_targets(out, sample_of, own))
    return torch.cat(outs)


def path_sum(
    task: Task,
    ends: torch.Tensor,
    starts: torch.Tensor,
    points: tuple[np.ndarray, np.ndarray],
    rows: int,
    grad_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    description: str,
) -> torch.Tensor:
    """``sum_k w_k grad_at(start + a_k (end - start))`` per sample, in calls of at most ``rows`` path points.

    ``ends`` is ``(n, *shape)``, ``starts`` ``(n, *shape)`` or ``(1, *shape)`` (on the model's device);
    ``points`` the positions ``a_k`` and weights ``w_k``; ``grad_at(path_rows, sample_index)`` returns one
    gradient per path row (of any per-row shape), ``sample_index`` the sample each row belongs to.
    """
    model = task.torch_model
    alphas = torch.as_tensor(points[0], dtype=model.dtype, device=model.device)
    weights = torch.as_tensor(points[1], dtype=model.dtype, device=model.device)
    n, steps, shape = len(ends), len(alphas), tuple(ends.shape[1:])
    ones = (1,) * len(shape)
    per_sample = starts.shape[0] == n and n > 1
    total = None

    def start_of(s: slice) -> torch.Tensor:
        return starts[s] if per_sample else starts

    def add(i: slice | int, part: torch.Tensor, first: bool) -> None:
        nonlocal total
        if total is None:
            unit_shape = part.shape[1:] if isinstance(i, slice) else part.shape
            total = torch.zeros((n, *unit_shape), dtype=part.dtype, device=part.device)
        total[i] = part if first else total[i] + part

    if rows >= steps:  # whole paths of several samples per call
        chunks = row_slices(n, rows // steps)
        for s in progress_bar(chunks, len(chunks), description, task.progress):
            x, b = ends[s], start_of(s)
            m = x.shape[0]
            path = b.unsqueeze(1) + alphas.view(1, steps, *ones) * (x - b).unsqueeze(1)  # (m, steps, *shape)
            index = torch.arange(s.start, s.start + m).repeat_interleave(steps)
            grads = grad_at(path.flatten(0, 1), index)
            add(s, _step_sum(grads, weights, m), True)
    else:  # one sample's path spans several calls
        pieces = [(i, k) for i in range(n) for k in row_slices(steps, rows)]
        for i, k in progress_bar(pieces, len(pieces), description, task.progress):
            x, b = ends[i : i + 1], start_of(slice(i, i + 1))
            path = b + alphas[k].view(-1, *ones) * (x - b)
            grads = grad_at(path, torch.full((len(path),), i))
            add(i, _step_sum(grads, weights[k], 1)[0], k.start == 0)
    return total


def _step_sum(grads: torch.Tensor, weights: torch.Tensor, m: int) -> torch.Tensor:
    """``(m, *shape)``: the ``weights``-weighted sum over each sample's ``len(weights)`` consecutive rows of
    ``grads`` (one matrix product)."""
    return (weights.to(grads.dtype) @ grads.reshape(m, len(weights), -1)).view(m, *grads.shape[1:])


@scorer("integrated_gradients", aliases=("ig",), predicts_target=True, **GRADIENT_METHOD)
@_layer_doc
def integrated_gradients(
    task: Task,
    *,
    baseline: Any = "zero",
    steps: int = 50,
    rule: str = "gausslegendre",
    internal_batch_size: int | None = None,
    layer: str | None = None,
    neuron: NeuronIndex | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Integrated gradients: (input - baseline) times the mean gradient along the straight path between them.

    Args:
        baseline: ``"zero"`` (captum's default), ``"mean"`` / ``"median"`` of the background (or the
            data), a number, one sample-shaped array, or one baseline per sample (the data's shape).
        steps: points on the path.
        rule: quadrature rule (captum's ``method``; ``method`` here is explain's own argument),
            ``"gausslegendre"`` (captum's default), ``"riemann_trapezoid"``,
            ``"riemann_middle"``, ``"riemann_left"`` or ``"riemann_right"``.
        internal_batch_size: at most this many (sample x step) rows per forward/backward call
            (default: the ``batch_size`` given to explain, else about ``ROW_ELEMENTS`` input values, on a
            CPU at most ``TorchModel.cache_rows()`` rows).
            The path points are built one call at a time, so memory stays bounded for any ``steps``.

    ``extra["delta"]`` is the completeness error per sample, ``sum(attributions) - (f(x) - f(baseline))``
    (``extra["max_abs_delta"]`` its largest magnitude): it shrinks as ``steps`` grows.

    With ``layer``, the path runs between the layer's activations for the baseline and for the input while
    the model reads the input elsewhere (captum's ``LayerIntegratedGradients``); ``f(baseline)`` in the delta
    is the output with the layer's activations set to the baseline's. With ``neuron``, captum's
    ``NeuronIntegratedGradients``.
    """
    model = task.torch_model
    site, index = _where(task, layer, neuron)
    points = path_points(steps, rule)
    rows = rows_per_call(task, int(np.prod(task.unit_shape)), internal_batch_size)
    x_all = model.to_model(task.inputs)
    b_all = model.to_model(input_baselines(task, baseline))
    if site is not None and index is None:  # the path runs in the layer's activations
        x_path, b_path = layer_activations(task, site, x_all, rows), layer_activations(task, site, b_all, rows)

        def grad_at(path: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return layer_gradients(task, site, x_all[i], task.target[i], values=path)[1]

        f_x = _end_outputs(task, x_all, rows)  # first: it chooses an undecided target
        f_b = replaced_outputs(task, site, x_all, task.target, b_path.expand_as(x_path), rows)
    else:
        x_path, b_path = x_all, b_all
        if index is None:

            def grad_at(path: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
                return input_gradients(task, path, task.target[i])

            ends = torch.cat([x_all, b_all])  # both ends in one forward call (a shared baseline: one row)
            f_x, f_b = _end_outputs(task, ends, rows).chunk(2)
        else:
            task.choose_targets()  # a neuron's gradient reads no target: the predicted class is only reported

            def grad_at(path: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
                return neuron_gradients(task, site, index, path)

            f_x = layer_activations(task, site, x_all, rows).flatten(1)[:, index]
            f_b = layer_activations(task, site, b_all, rows).flatten(1)[:, index]  # a shared baseline: one row
    total = path_sum(task, x_path, b_path, points, rows, grad_at, "integrated gradients")
    attributions = (x_path - b_path) * total
    delta = attributions.flatten(1).sum(1) - (f_x - f_b)
    extra = {"delta": delta.detach().cpu().double().numpy(), "max_abs_delta": float(delta.abs().max())}
    return attributions, {**extra, **_where_extra(site, index)}


# older names, kept for code that imports them
def _gradient_map(
    task: Task, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], description: str
) -> torch.Tensor:
    """``fn(x, grad)`` of the inputs, the values of :func:`gradient_map` alone."""
    return gradient_map(task, fn, description)[0]


_rows_per_call = rows_per_call
_baselines = input_baselines


def _noise_sigma(task: Task, noise: float) -> torch.Tensor:
    """Noise standard deviation: ``noise`` times the range of each sample (images) or feature (tables)."""
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
        raise MethodError(f"noise must be a non-negative fraction of the input range, got {noise!r}")
    x = task.inputs
    if x.ndim == 2:  # features have their own scales: each feature's range over the background (or data)
        ref = task.background if task.background is not None else x
        ref = ref.to(torch.float64)
        return noise * (ref.amax(0) - ref.amin(0)).unsqueeze(0)
    flat = x.flatten(1).to(torch.float64)
    return (noise * (flat.amax(1) - flat.amin(1))).view(-1, *(1,) * (x.ndim - 1))


SMOOTHGRAD_BASES = ("saliency", "gradient", "gradient_x_input")


@scorer("smoothgrad", aliases=("smooth_grad",), **GRADIENT_METHOD)
def smoothgrad(
    task: Task, *, base: str = "saliency", n_samples: int = 50, noise: float = 0.15
) -> tuple[torch.Tensor, dict[str, Any]]:
    """SmoothGrad: the average of a gradient attribution over noisy copies of each input.

    Args:
        base: ``"saliency"`` (absolute gradient, as captum's NoiseTunnel over Saliency),
            ``"gradient"`` (signed gradient, as in the SmoothGrad paper) or ``"gradient_x_input"``
            (noisy input times its gradient).
        n_samples: noisy copies per input.
        noise: Gaussian noise standard deviation as a fraction of the input range: of each sample's
            (max - min) for images (the paper's noise level), of each feature's range over the
            background (or the data) for tables. ``extra["sigma"]`` holds the standard deviations used.

    Noise draw ``j`` is ``torch.randn(inputs.shape, generator)`` in the model's dtype, on its device,
    with a generator seeded by ``seed``, times the standard deviation; draws are made in order, so
    results depend on the seed only, not on batch sizes.
    """
    if base not in SMOOTHGRAD_BASES:
        raise MethodError(f"unknown base {base!r}; use one of {list(SMOOTHGRAD_BASES)}")
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise MethodError(f"n_samples must be a positive integer, got {n_samples!r}")
    model = task.torch_model
    sigma64 = _noise_sigma(task, noise)
    sigma = sigma64.to(model.device, model.dtype)
    combine = {
        "saliency": lambda x, g: g.abs(),
        "gradient": lambda x, g: g,
        "gradient_x_input": lambda x, g: x * g,
    }[base]
    n, shape = task.n, task.unit_shape
    rows = rows_per_call(task, int(np.prod(shape)))
    generator = task.generator(model.device)
    x_all = model.to_model(task.inputs)
    total = torch.zeros_like(x_all)

    def draw() -> torch.Tensor:
        return torch.randn(x_all.shape, generator=generator, dtype=model.dtype, device=model.device) * sigma

    if rows >= n:  # several noise draws of every sample per call
        per = rows // n
        groups = row_slices(n_samples, per)
        for g in progress_bar(groups, len(groups), "smoothgrad", task.progress):
            noisy = (x_all.unsqueeze(0) + torch.stack([draw() for _ in range(g.stop - g.start)])).flatten(0, 1)
            grads = input_gradients(task, noisy, task.target.repeat(g.stop - g.start))
            total += combine(noisy, grads).view(-1, n, *shape).sum(0)
    else:  # one draw spans several calls
        for _ in progress_bar(range(n_samples), n_samples, "smoothgrad", task.progress):
            noisy_all = x_all + draw()
            for s in row_slices(n, rows):
                total[s] += combine(noisy_all[s], input_gradients(task, noisy_all[s], task.target[s]))
    extra = {"sigma": sigma64.squeeze(0).flatten().numpy() if task.inputs.ndim == 2 else sigma64.flatten().numpy()}
    return total / n_samples, extra
