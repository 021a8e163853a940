"""CRAFT (Fel et al. 2023): which concepts a model uses for a class, how much each matters, and where it is.

1. Crops: every image of the class is cut into ``crop_size`` squares every ``stride`` pixels (one ``unfold``).
2. Concept bank: the layer's activations of the crops, averaged over space (``(crops, channels)``, non-negative:
   a layer after a ReLU), are factorized by NMF (:mod:`whatmatters.explain.nmf`, torch, on the model's device)
   into ``U`` (crop x concept) and the bank ``H`` (concept x channel).
3. Concept maps: the layer's activations of the whole images, at every position of the layer's map, are
   projected on ``H`` (non-negative least squares): ``(n, concepts, h, w)`` coefficients, at the layer's own
   resolution (not upsampled crops).
4. Importance: random concept masks (scrambled Sobol sequence, scipy) scale the coefficients, the layer's output
   is replaced by the masked reconstruction ``(mask * U) @ H`` and the model runs on from there (batched);
   the total-order Sobol index of each concept (Jansen estimator) is averaged over the images.

Crops go through the model at their own size by default (``resize_crops=False``: the scale at which the maps of
whole images see them; the model is stopped at the layer, so fixed-size heads do not matter); the paper and
xplique resize them to the image size (``resize_crops=True``). Concepts come sorted by importance, ``c0`` first.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from whatmatters.core.adapters import row_slices
from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.importance import Importance
from whatmatters.core.registry import scorer
from whatmatters.core.state import hooks
from whatmatters.core.task import Task, guarded, make_task, progress_bar
from whatmatters.explain.layer_sites import LayerSite, layer_activations, layer_site, replaced_outputs
from whatmatters.explain.nmf import nmf, project

NEGATIVE = ("error", "clamp")


class _Stop(Exception):
    """Raised by the hook once the layer's output is seen: the rest of the model is not run."""


def _activations_only(task: Task, site: LayerSite, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The layer's outputs for ``x`` (any spatial size), the model stopped right after the layer."""
    model, parts = task.torch_model, []

    def hook(_m: Any, _inp: Any, out: Any) -> None:
        parts.append((out if isinstance(out, torch.Tensor) else out[0]).detach())
        raise _Stop

    with hooks(site.module.register_forward_hook(hook)), torch.no_grad():
        for s in row_slices(len(x), rows):
            try:
                model.forward(model.to_model(x[s]))
            except _Stop:
                continue
    return torch.cat(parts)


def cut_crops(images: torch.Tensor, size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Square crops ``(m, C, size, size)`` of every image on a grid, and their boxes ``(m, 3)``: image, top, left."""
    n, c = images.shape[:2]
    grid = images.unfold(2, size, stride).unfold(3, size, stride)  # (n, C, rows, cols, size, size)
    rows, cols = grid.shape[2:4]
    crops = grid.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, size, size)
    i, r, q = torch.meshgrid(torch.arange(n), torch.arange(rows) * stride, torch.arange(cols) * stride, indexing="ij")
    return crops, torch.stack([i.flatten(), r.flatten(), q.flatten()], 1)


def sobol_masks(k: int, n_designs: int, seed: int) -> torch.Tensor:
    """Masks ``(n_designs * (k + 2), k)`` in [0, 1]: designs ``A``, ``B`` and, per concept ``i``, ``A`` with
    column ``i`` taken from ``B`` (a scrambled Sobol sequence of dimension ``2k``, scipy)."""
    from scipy.stats import qmc

    draws = torch.from_numpy(qmc.Sobol(2 * k, scramble=True, seed=seed).random_base2(n_designs.bit_length() - 1))
    a, b = draws[:, :k], draws[:, k:]
    mixed = a.unsqueeze(0).repeat(k, 1, 1)
    mixed[torch.arange(k), :, torch.arange(k)] = b.T
    return torch.cat([a, b, mixed.reshape(-1, k)]).float()


def jansen_total(outputs: torch.Tensor, k: int, n_designs: int) -> torch.Tensor:
    """Total-order Sobol indices ``(n, k)`` from outputs ``(n, n_designs * (k + 2))`` ordered as :func:`sobol_masks`
    (Jansen 1999: ``E[(f(A) - f(A_B^i))^2] / (2 Var f)``); 0 where the output does not vary at all."""
    f = outputs.reshape(len(outputs), k + 2, n_designs).double()
    variance = torch.cat([f[:, 0], f[:, 1]], 1).var(1, keepdim=True)
    total = ((f[:, :1] - f[:, 2:]) ** 2).mean(2) / (2 * variance)
    return torch.where(variance > 0, total, torch.zeros_like(total))


def _checked(acts: torch.Tensor, site: LayerSite, negative: str) -> torch.Tensor:
    scale = float(acts.abs().max()) if acts.numel() else 0.0
    if bool((acts < -1e-6 * max(scale, 1e-30)).any()):
        share = float((acts < 0).double().mean())
        if negative == "error":
            raise InputError(
                f"layer {site.name!r} has negative activations ({share:.0%} of them); NMF needs non-negative ones: "
                "choose a layer right after a ReLU (or another non-negative activation), or pass negative='clamp' "
                "to set them to 0 (with a warning)"
            )
        warnings.warn(f"craft: {share:.0%} of layer {site.name!r}'s activations are negative, set to 0", stacklevel=3)
    return acts.clamp_min(0)


def _positions(acts: torch.Tensor) -> torch.Tensor:
    """``(n, C, *spatial)`` activations as rows ``(n * positions, C)``."""
    return acts.flatten(2).transpose(1, 2).reshape(-1, acts.shape[1]) if acts.ndim > 2 else acts


def coefficients(acts: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Concept coefficients ``(n, k, *spatial)`` of activations ``(n, C, *spatial)`` at every position."""
    u = project(_positions(acts), bank)
    spatial = acts.shape[2:]
    return u.reshape(len(acts), *spatial, -1).movedim(-1, 1) if spatial else u


def _masked_outputs(task: Task, site: LayerSite, u: torch.Tensor, bank: torch.Tensor, masks: torch.Tensor, rows: int):
    """Target outputs ``(n, len(masks))`` with the layer's output replaced by ``(mask * U) @ H`` per image and mask."""
    n, m = len(u), len(masks)
    masks = masks.to(u.device, u.dtype)
    chunks = row_slices(n * m, rows)
    outs = []
    for s in progress_bar(chunks, len(chunks), "craft: concept masks", task.progress):
        flat = torch.arange(s.start, s.stop, device=u.device)
        image, design = flat // m, flat % m
        scaled = masks[design].reshape(len(flat), -1, *[1] * (u.ndim - 2)) * u[image]
        values = torch.einsum("rk...,kc->rc...", scaled, bank)
        outs.append(replaced_outputs(task, site, task.inputs[image.cpu()], task.target[image.cpu()], values, rows))
    return torch.cat(outs).reshape(n, m)


def _check_crops(task: Task, site: LayerSite, crop_size: int, stride: int, n_concepts: int) -> None:
    height, width = task.unit_shape[-2:]
    if not 1 <= crop_size <= min(height, width) or stride < 1:
        raise MethodError(f"crop_size must be 1..{min(height, width)} and stride >= 1, got {crop_size}, {stride}")
    if len(site.shape) == 3:
        cell = height / site.shape[1]
        if crop_size < cell:
            raise InputError(
                f"crops of {crop_size} px are smaller than one cell of layer {site.name!r}'s {site.shape[1]}x"
                f"{site.shape[2]} map on {height}x{width} images ({cell:g} px): the layer would see less than one "
                f"position per crop; use crop_size >= {int(-(-cell // 1))} or an earlier layer"
            )
    elif len(site.shape) != 1:
        raise MethodError(
            f"craft needs a layer with (channels, h, w) or (channels,) outputs; {site.name!r} has {site.shape}"
        )
    n_crops = task.n * ((height - crop_size) // stride + 1) * ((width - crop_size) // stride + 1)
    if n_crops < n_concepts:
        raise InputError(
            f"{task.n} image(s) give {n_crops} crops of {crop_size} px (stride {stride}), fewer than n_concepts="
            f"{n_concepts}: give more images, a smaller crop_size or stride, or fewer concepts"
        )


def crop_activations(task: Task, site: LayerSite, crops: torch.Tensor, resize: bool, rows: int) -> torch.Tensor:
    if resize:
        crops = F.interpolate(crops, size=task.unit_shape[-2:], mode="bilinear", align_corners=False)
        return layer_activations(task, site, crops, rows)
    try:
        acts = _activations_only(task, site, crops, rows)
    except RuntimeError as err:
        raise InputError(
            f"the model cannot run crops of {crops.shape[-1]} px up to layer {site.name!r} ({err}); use a larger "
            "crop_size, an earlier layer, or resize_crops=True"
        ) from err
    if acts.ndim > 2 and min(acts.shape[2:]) < 1:
        raise InputError(f"layer {site.name!r}'s map of a {crops.shape[-1]} px crop is empty; use a larger crop_size")
    return acts


@scorer("craft", family="concept", units="pixel", needs="module", per_sample=False)
def craft(
    task: Task,
    *,
    layer: str | None = None,
    n_concepts: int = 10,
    crop_size: int | None = None,
    stride: int | None = None,
    resize_crops: bool = False,
    n_designs: int = 32,
    top_crops: int = 8,
    negative: str = "error",
    nmf_iters: int = 500,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """CRAFT: a concept bank by NMF of a layer's activations on crops, each concept's total Sobol importance.

    Args:
        layer: a layer name (``model.named_modules()``) with non-negative outputs ``(C, h, w)`` or ``(C,)``.
        n_concepts: concepts in the bank.
        crop_size: side of the square crops in pixels (default: a third of the image side).
        stride: pixels between crops (default: half the crop size).
        resize_crops: resize crops to the image size before the model, as the paper does (default: their own size).
        n_designs: Sobol designs per image (a power of two); ``n_designs * (n_concepts + 2)`` model runs per image.
        top_crops: the most representative crops kept per concept.
        negative: ``"error"`` on negative activations, or ``"clamp"`` them to 0 with a warning.
        nmf_iters: most multiplicative-update iterations of the NMF.

    Values: the total-order Sobol index of each concept (``unit="concept"``, names ``c0..``, sorted by it) for
    the target over the images. ``extra``: ``bank`` (``H``, concepts x channels), ``per_image`` Sobol indices,
    ``maps`` (concept coefficients at the layer's resolution, ``(n, k, h, w)``), ``crops`` (boxes image, top,
    left of each concept's ``top_crops`` most representative crops), ``crop_size``, ``layer``,
    ``reconstruction_error`` (relative NMF error on the crops). See :func:`concept_crops`, :func:`concept_maps`,
    :func:`concept_outputs`.
    """
    if task.inputs.ndim != 4:
        raise InputError(f"craft explains images (n, C, H, W), got data of shape {tuple(task.inputs.shape)}")
    if negative not in NEGATIVE:
        raise MethodError(f"negative must be one of {list(NEGATIVE)}, got {negative!r}")
    if n_designs < 2 or n_designs & (n_designs - 1):
        raise MethodError(f"n_designs must be a power of two of at least 2 (Sobol sequence), got {n_designs}")
    if n_concepts < 1 or top_crops < 1 or nmf_iters < 1:
        raise MethodError("n_concepts, top_crops and nmf_iters must be positive ints")
    site = layer_site(task, layer)
    crop_size = crop_size if crop_size is not None else max(1, min(task.unit_shape[-2:]) // 3)
    stride = stride if stride is not None else max(1, crop_size // 2)
    _check_crops(task, site, crop_size, stride, n_concepts)
    rows = task.rows_per_call()
    crops, boxes = cut_crops(task.inputs, crop_size, stride)
    crop_acts = _checked(crop_activations(task, site, crops, resize_crops, rows), site, negative)
    a = crop_acts.flatten(2).mean(2) if crop_acts.ndim > 2 else crop_acts
    u, bank = nmf(a, n_concepts, iters=nmf_iters, generator=task.generator())
    error = float(torch.linalg.matrix_norm(a - u @ bank) / torch.linalg.matrix_norm(a).clamp_min(1e-30))
    coeffs = coefficients(_checked(layer_activations(task, site, task.inputs, rows), site, negative), bank)
    masks = sobol_masks(n_concepts, n_designs, task.seed)
    per_image = jansen_total(_masked_outputs(task, site, coeffs, bank, masks, rows), n_concepts, n_designs)
    order = per_image.mean(0).argsort(descending=True)
    top = u[:, order].T.topk(min(top_crops, len(u)), dim=1).indices  # (k, top_crops) crop rows
    extra = {
        "names": [f"c{i}" for i in range(n_concepts)],
        "unit": "concept",
        "bank": bank[order],
        "per_image": per_image[:, order.cpu()],
        "maps": coeffs[:, order],
        "crops": boxes[top.cpu()],
        "crop_size": crop_size,
        "layer": site.name,
        "reconstruction_error": error,
    }
    return per_image.mean(0)[order.cpu()], extra


def _concept_task(model: Any, data: Any, importance: Importance, target: Any) -> tuple[Task, LayerSite, torch.Tensor]:
    if importance.method != "craft" or "bank" not in importance.extra:
        raise InputError("give the Importance returned by explain(..., method='craft')")
    task = make_task(model, data, importance.target if target is None else target)
    site = layer_site(task, importance.extra["layer"])
    bank = torch.as_tensor(importance.extra["bank"]).to(task.torch_model.device, task.torch_model.dtype)
    return task, site, bank


def concept_maps(model: Any, data: Any, importance: Importance) -> torch.Tensor:
    """Where each concept of a CRAFT ``importance`` is in new images: ``(n, k, h, w)`` at the layer's resolution
    (negative activations set to 0, as ``negative="clamp"`` does)."""
    with guarded(model):
        task, site, bank = _concept_task(model, data, importance, 0)
        acts = layer_activations(task, site, task.inputs, task.rows_per_call()).clamp_min(0)
        return coefficients(acts, bank)


def concept_outputs(model: Any, data: Any, importance: Importance, keep: Any, target: Any = None) -> torch.Tensor:
    """Target outputs ``(n, r)`` with the layer rebuilt from the concepts scaled by ``keep`` ``(r, k)`` (1: kept,
    0: removed): deletion curves. ``target`` defaults to the importance's."""
    with guarded(model):
        task, site, bank = _concept_task(model, data, importance, target)
        acts = layer_activations(task, site, task.inputs, task.rows_per_call()).clamp_min(0)
        masks = torch.as_tensor(keep, dtype=torch.float32)
        if masks.ndim != 2 or masks.shape[1] != len(bank) or not bool(torch.isfinite(masks).all()):
            raise InputError(f"keep must be finite, (r, {len(bank)}): one factor per concept in each of r rows")
        return _masked_outputs(task, site, coefficients(acts, bank), bank, masks, task.rows_per_call())


def concept_crops(images: torch.Tensor, importance: Importance) -> torch.Tensor:
    """The most representative crops of each concept, ``(k, top_crops, C, s, s)``, cut from the explained images."""
    boxes = torch.as_tensor(importance.extra["crops"], dtype=torch.long)
    size = int(importance.extra["crop_size"])
    rows = torch.arange(size)
    i, top, left = boxes[..., 0, None, None], boxes[..., 1, None, None], boxes[..., 2, None, None]
    ys, xs = (top + rows[:, None]), (left + rows[None, :])  # (k, m, s, s) pixel coordinates
    return torch.as_tensor(images)[i, :, ys, xs].movedim(-1, 2)
