"""LIME: a locally weighted linear surrogate fitted on random on/off perturbations of each sample.

Interpretable features are the table's columns (or groups of them), an image's superpixels (a grid or
SLIC segmentation) or a sequence's tokens. Each of ``n_samples`` binary vectors ``z`` switches features on
(the sample's values) or off (the baseline); the model's target outputs on all perturbed copies are taken
in a few batched calls through the task; each copy is weighted by an exponential kernel of its distance
to the sample, ``exp(-d^2 / (2 kernel_width^2))`` (captum's kernel; cosine distance by default, in the
input space for features and pixels, between the binary vectors for tokens); a weighted ridge (batched
closed form, equal to scikit-learn's ``Ridge``) or lasso (scikit-learn's ``Lasso``) surrogate on ``z``
gives the scores: one coefficient per interpretable feature, spread back over its units.

Draws: ``z = torch.rand((n, n_samples, k), generator) < 0.5`` with a generator seeded by ``seed``
(``k``: the largest feature count over the samples); this is captum's ``Lime`` given the same vectors.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task, progress_bar
from whatmatters.explain.baselines import baseline_row

_VARIANT_ELEMENTS = 2**22  # input values of perturbed copies built per model call (memory bound)
SEGMENTATIONS = ("grid", "slic")
SURROGATES = ("ridge", "lasso")
DISTANCES = ("cosine", "euclidean")


def grid_segments(height: int, width: int, n_segments: int) -> torch.Tensor:
    """A ``(height, width)`` map of about ``n_segments`` rectangular cells, numbered row by row from 0."""
    rows = max(1, min(height, round((n_segments * height / width) ** 0.5)))
    cols = max(1, min(width, -(-n_segments // rows)))
    r = torch.arange(height) * rows // height
    c = torch.arange(width) * cols // width
    return r[:, None] * cols + c[None, :]


def slic_segments(images: torch.Tensor, n_segments: int, compactness: float = 10.0) -> torch.Tensor:
    """SLIC superpixels (scikit-image) of ``(n, C, H, W)`` images: ``(n, H, W)`` labels from 0, consecutive."""
    try:
        from skimage.segmentation import slic
    except ImportError:  # pragma: no cover - depends on the environment
        raise MethodError("segmentation='slic' needs scikit-image (pip install scikit-image); or use 'grid'") from None
    arrays = images.detach().cpu().double().numpy()
    labels = []
    for img in arrays:  # scikit-image segments one image at a time
        lo, hi = img.min(), img.max()
        scaled = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        seg = slic(np.moveaxis(scaled, 0, -1), n_segments=n_segments, compactness=compactness, start_label=0)
        labels.append(torch.unique(torch.from_numpy(seg.astype(np.int64)), return_inverse=True)[1])
    return torch.stack(labels)


def _feature_mask(task: Task, feature_mask: Any, segmentation: str, n_segments: int) -> torch.Tensor:
    """Interpretable feature index of every unit, ``(n, *unit_shape)``, numbered from 0 in each sample."""
    x = task.inputs
    if feature_mask is not None:
        try:
            mask = torch.as_tensor(np.asarray(feature_mask))
        except (TypeError, ValueError, OverflowError):  # e.g. 2**63 (uint64 NumPy has no torch twin), ragged lists
            raise InputError("feature_mask must hold integer feature indices (one per unit)") from None
        if mask.is_floating_point() or mask.dtype == torch.bool:
            raise InputError("feature_mask must hold integer feature indices (one per unit)")
        shape = tuple(mask.shape)
        spatial = tuple(x.shape[2:]) if x.ndim == 4 else None
        if shape in (tuple(x.shape[1:]), spatial):  # shared by every sample
            mask = mask.unsqueeze(0)
        elif shape not in (tuple(x.shape), (x.shape[0], *spatial) if spatial else None):
            raise InputError(
                f"feature_mask of shape {shape} does not fit data of shape {tuple(x.shape)}; give one index per "
                "unit, shared or per sample (images: also (H, W) or (n, H, W), shared by the channels)"
            )
        if bool((mask < 0).any()):
            raise InputError("feature_mask holds negative indices; number the features from 0")
        return mask.long().expand(x.shape[0], *mask.shape[1:])
    if x.ndim == 2:
        return torch.arange(x.shape[1]).expand(x.shape[0], -1)
    if not isinstance(n_segments, int) or isinstance(n_segments, bool) or n_segments < 1:
        raise MethodError(f"n_segments must be a positive integer, got {n_segments!r}")
    if segmentation == "grid":
        return grid_segments(x.shape[-2], x.shape[-1], n_segments).expand(x.shape[0], -1, -1)
    if segmentation == "slic":
        return slic_segments(x if x.ndim == 4 else x.unsqueeze(1), n_segments)
    raise MethodError(f"unknown segmentation {segmentation!r}; use one of {list(SEGMENTATIONS)} or give feature_mask")


def _unit_mask(z: torch.Tensor, fmask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-unit on/off ``(b, m, *shape)`` from feature switches ``z`` ``(b, m, k)`` and the feature map."""
    b, m = z.shape[:2]
    if fmask.ndim == len(shape):  # (b, H, W) segments shared by the channels of (b, C, H, W) images
        fmask = fmask.unsqueeze(1).expand(b, *shape)
    flat = fmask.reshape(b, 1, -1).expand(b, m, -1)
    return z.gather(2, flat).view(b, m, *shape)


def _kernel_weights(x: torch.Tensor, variants: torch.Tensor, z: torch.Tensor, distance: str, width: float):
    """``exp(-d^2 / (2 width^2))`` per perturbed copy, ``(b, m)``, float64."""
    if x.is_floating_point():
        a = x.reshape(x.shape[0], 1, -1).double()
        v = variants.reshape(*variants.shape[:2], -1).double()
    else:  # tokens: distance between the binary vectors and the all-on vector
        v = z.double()
        a = torch.ones_like(v[:, :1])
    if distance == "cosine":
        d = 1 - F.cosine_similarity(a.expand_as(v), v, dim=-1)
    else:
        d = (a - v).norm(dim=-1)
    return torch.exp(-(d**2) / (2 * width**2))


def weighted_ridge(
    z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ``Ridge(alpha).fit(z, y, sample_weight=w)``: coefficients ``(b, k)`` and intercepts ``(b,)``.

    Minimizes ``sum_i w_i (y_i - z_i c - c0)^2 + alpha |c|^2`` (the intercept unpenalized), as scikit-learn.
    """
    wn = w / w.sum(1, keepdim=True)
    z_mean = torch.einsum("bm,bmk->bk", wn, z)
    y_mean = (wn * y).sum(1)
    zc, yc = z - z_mean[:, None], y - y_mean[:, None]
    gram = torch.einsum("bm,bmk,bml->bkl", w, zc, zc)
    rhs = torch.einsum("bm,bmk,bm->bk", w, zc, yc)
    if alpha > 0:
        eye = torch.eye(z.shape[2], dtype=z.dtype)
        coef = torch.linalg.solve(gram + alpha * eye, rhs)
    else:
        coef = (torch.linalg.pinv(gram) @ rhs.unsqueeze(-1)).squeeze(-1)
    return coef, y_mean - (z_mean * coef).sum(1)


def _lasso(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's weighted ``Lasso(alpha)``, one fit per sample (no batched solver exists)."""
    from sklearn.linear_model import Lasso

    coefs, intercepts = [], []
    for zi, yi, wi in zip(z.numpy(), y.numpy(), w.numpy()):
        fit = Lasso(alpha=alpha).fit(zi, yi, sample_weight=wi)
        coefs.append(fit.coef_)
        intercepts.append(fit.intercept_)
    return torch.as_tensor(np.array(coefs)), torch.as_tensor(np.array(intercepts, dtype=np.float64))


def fit_surrogate(
    z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, surrogate: str, alpha: float, n_features: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted linear surrogate on ``n_features`` features (LIME's highest weights selection) or all."""
    fit = weighted_ridge if surrogate == "ridge" else _lasso
    coef, intercept = fit(z, y, w, alpha)
    if n_features is None or n_features >= z.shape[2]:
        return coef, intercept
    keep = torch.zeros_like(coef, dtype=torch.bool).scatter_(1, coef.abs().topk(n_features, dim=1).indices, True)
    # features outside the selection become constant columns: centering gives them coefficient 0
    coef, intercept = fit(torch.where(keep[:, None, :], z, torch.zeros_like(z)), y, w, alpha)
    return torch.where(keep, coef, torch.zeros_like(coef)), intercept


def _check(n_samples: int, kernel_width: float, distance: str, surrogate: str, alpha: float, n_features: Any) -> None:
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 2:
        raise MethodError(f"n_samples must be an integer >= 2, got {n_samples!r}")
    if not isinstance(kernel_width, (int, float)) or isinstance(kernel_width, bool) or not kernel_width > 0:
        raise MethodError(f"kernel_width must be a positive number, got {kernel_width!r}")
    if distance not in DISTANCES:
        raise MethodError(f"unknown distance {distance!r}; use one of {list(DISTANCES)}")
    if surrogate not in SURROGATES:
        raise MethodError(f"unknown surrogate {surrogate!r}; use one of {list(SURROGATES)}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0:
        raise MethodError(f"alpha must be a non-negative number, got {alpha!r}")
    if n_features is not None and (not isinstance(n_features, int) or isinstance(n_features, bool) or n_features < 1):
        raise MethodError(f"n_features must be a positive integer or None, got {n_features!r}")


@scorer("lime", family="perturbation", units=("feature", "pixel", "token"))
def lime(
    task: Task,
    *,
    n_samples: int = 256,
    kernel_width: float = 1.0,
    distance: str = "cosine",
    surrogate: str = "ridge",
    alpha: float = 1.0,
    n_features: int | None = None,
    baseline: Any = "auto",
    segmentation: str = "grid",
    n_segments: int = 64,
    feature_mask: Any = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """LIME: coefficients of a kernel-weighted linear surrogate fitted on random on/off perturbations.

    Args:
        n_samples: perturbed copies per sample.
        kernel_width: width of the exponential kernel ``exp(-d^2 / (2 width^2))`` (captum's default 1.0).
        distance: ``"cosine"`` (captum's default) or ``"euclidean"``, between the sample and each copy in
            the input space (tokens: between the binary vectors and the all-on vector).
        surrogate: ``"ridge"`` (batched closed form, scikit-learn's ``Ridge``) or ``"lasso"`` (scikit-learn's
            ``Lasso``, captum's default surrogate with ``alpha=0.01``).
        alpha: the surrogate's regularization strength.
        n_features: keep only this many features per sample (the largest coefficients of a first fit; the
            others score 0), as LIME's ``num_features``; ``None`` keeps all.
        baseline: value of a switched-off unit: ``"auto"`` (the background mean for features, 0 for pixels
            and token id 0 for tokens), ``"mean"``, ``"median"``, ``"zero"``, a number or an array.
        segmentation: superpixels of images: ``"grid"`` (``n_segments`` rectangles) or ``"slic"``
            (scikit-image). Ignored for features and tokens (each is its own feature) or with ``feature_mask``.
        n_segments: about how many superpixels per image.
        feature_mask: integer interpretable-feature index per unit (shared or per sample; images also
            ``(H, W)``), like captum's ``feature_mask``: units with the same index switch together.

    Returns scores shaped like the inputs (each unit gets its feature's coefficient). ``extra``:
    ``intercept``, ``r2`` (weighted fit of the surrogate), ``n_features`` per sample.
    """
    _check(n_samples, kernel_width, distance, surrogate, alpha, n_features)
    x = task.inputs
    if baseline == "auto":
        baseline = "mean" if task.unit == "feature" else "zero"
    base = baseline_row(task, baseline)
    fmask = _feature_mask(task, feature_mask, segmentation, n_segments)
    counts = fmask.flatten(1).amax(1) + 1
    k = int(counts.max())
    n, shape = task.n, task.unit_shape
    z = torch.rand((n, n_samples, k), generator=task.generator()) < 0.5
    z |= torch.arange(k)[None, None, :] >= counts[:, None, None]  # absent features: always on (constant)
    per_call = max(1, _VARIANT_ELEMENTS // max(1, n_samples * int(np.prod(shape))))
    outputs = torch.empty(n, n_samples, dtype=torch.float64)
    weights = torch.empty(n, n_samples, dtype=torch.float64)
    chunks = [slice(i, min(n, i + per_call)) for i in range(0, n, per_call)]
    for s in progress_bar(chunks, len(chunks), "lime", task.progress if len(chunks) > 1 else False):
        xs = x[s]
        on = _unit_mask(z[s], fmask[s], shape)
        variants = torch.where(on, xs.unsqueeze(1), base.to(xs.dtype))
        sub = dataclasses.replace(task, inputs=xs, target=task.target[s], progress=False)
        outputs[s] = sub.score(variants, "lime").double().cpu()
        weights[s] = _kernel_weights(xs, variants, z[s], distance, float(kernel_width))
    if not bool(torch.isfinite(outputs).all()):
        raise MethodError("the model returned NaN or infinite outputs on perturbed inputs; LIME cannot fit them")
    if bool((weights.sum(1) <= 0).any()):
        raise MethodError(
            f"every perturbed copy got kernel weight 0 (kernel_width={kernel_width} is too small for these "
            "distances); use a larger kernel_width"
        )
    flat = outputs.amax(1) - outputs.amin(1) <= 1e-12 * outputs.abs().amax(1).clamp_min(1)
    if bool(flat.any()):
        warnings.warn(
            f"lime: the model's output did not change under any perturbation of {int(flat.sum())} sample(s) "
            f"(first: {int(flat.nonzero()[0])}); their scores are 0. Does the model depend on its input, or is "
            "the baseline equal to the data?",
            stacklevel=3,
        )
    zf = z.double()
    coef, intercept = fit_surrogate(zf, outputs, weights, surrogate, float(alpha), n_features)
    coef = torch.where(flat[:, None], torch.zeros_like(coef), coef)
    fitted = torch.einsum("bmk,bk->bm", zf, coef) + intercept[:, None]
    wn = weights / weights.sum(1, keepdim=True)
    mean = (wn * outputs).sum(1, keepdim=True)
    total = (wn * (outputs - mean) ** 2).sum(1)
    r2 = torch.where(total > 0, 1 - (wn * (outputs - fitted) ** 2).sum(1) / total.clamp_min(1e-300), 0.0)
    values = _unit_mask(coef.unsqueeze(1), fmask, shape).squeeze(1)
    extra = {"intercept": intercept.numpy(), "r2": r2.numpy(), "n_features": counts.numpy()}
    return values.to(x.dtype if x.is_floating_point() else torch.float64), extra
