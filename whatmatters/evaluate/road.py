"""ROAD: RemOve And Debias (Rong, Leemann et al., ICML 2022, "A Consistent and Efficient Evaluation
Strategy for Attribution Methods").

Removing pixels by replacing them with a constant leaks the removal mask to the model (the shape of
the removed region tells the class). ROAD instead *imputes* the removed pixels by noisy linear
imputation: every removed pixel takes the weighted mean of its 8 neighbours (1/6 for the 4 direct,
1/12 for the 4 diagonal ones; neighbours outside the image are left out and the weights of the
others renormalised), solved jointly for all removed pixels of an image as one sparse linear system
(removed neighbours are unknowns too), plus Gaussian noise. The model's accuracy (or target
probability / output) is then recorded as a growing fraction of pixels is removed:

* ``road_morf``: most relevant first; a good explanation makes the curve fall fast (lower is better);
* ``road_lerf``: least relevant first; a good explanation keeps the curve high (higher is better).

All images x fractions are solved as one block-diagonal sparse system (one SuperLU factorisation,
every channel a right-hand side; the system is built with NumPy index arithmetic, no loop over
pixels) and scored in batched model calls. Images are ``(n, C, H, W)`` (channels first) or
``(n, H, W)``; pixel scores ``(n, H, W)`` are used as they are, per-element scores
``(n, C, H, W)`` are summed over channels.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from whatmatters.core.adapters import row_slices
from whatmatters.core.errors import InputError
from whatmatters.core.importance import Importance
from whatmatters.core.task import Task, progress_bar
from whatmatters.evaluate.faithfulness import order_ranks
from whatmatters.evaluate.metrics import flat_scores, metric

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
OUTPUTS = ("accuracy", "probability", "output")
SYSTEM_SIZE = 20_000  # unknowns per sparse system (measured: 144 images of 64 x 64 px, 3.5 s as one, 1.9 s in 9)

# (dy, dx, weight) of the 8 neighbours in the paper's imputation (weights sum to 1).
_OFFSETS = np.array([(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)])
_WEIGHTS = np.array([1 / 6] * 4 + [1 / 12] * 4)


def check_fractions(fractions: Any) -> np.ndarray:
    """Fractions of pixels to remove as a sorted float64 array; each strictly between 0 and 1."""
    try:
        arr = np.asarray(fractions, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"fractions must be numbers strictly between 0 and 1, got {fractions!r}") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0) or np.any(arr >= 1):
        raise InputError(
            f"fractions must be a non-empty list of numbers strictly between 0 and 1 (e.g. 0.1 ... 0.9), "
            f"got {fractions!r}; removing all pixels leaves nothing to impute from"
        )
    if len(np.unique(arr)) != arr.size:
        raise InputError(f"fractions must not repeat, got {fractions!r}")
    return np.sort(arr)


def removal_counts(n_pixels: int, fractions: np.ndarray) -> np.ndarray:
    """Pixels removed at each fraction: ``floor(fraction * n_pixels)`` (as Quantus' ``int(size * p / 100)``)."""
    return np.floor(fractions * n_pixels + 1e-9).astype(np.int64)


def noisy_linear_imputation(
    images: np.ndarray | torch.Tensor,
    removed: np.ndarray | torch.Tensor,
    *,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Impute the ``removed`` pixels of every image from their neighbours, plus Gaussian noise of std ``noise``.

    ``images`` ``(k, C, H, W)`` and ``removed`` ``(k, H, W)`` (bool; one mask for all channels of an
    image). Every removed pixel ``i`` satisfies ``x_i = sum_j w_ij x_j / sum_j w_ij`` over its in-frame
    neighbours ``j`` (weights 1/6 direct, 1/12 diagonal), unknown neighbours included: one sparse
    system for all images (block-diagonal) and channels (right-hand sides), solved by SuperLU.
    ``noise`` is an absolute standard deviation added to the imputed values only. Returns float64
    ``(k, C, H, W)``; the inputs are not changed. Images are solved in groups of about
    ``SYSTEM_SIZE`` unknowns (one factorisation each).
    """
    x = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, dtype=np.float64)
    mask = np.asarray(removed.detach().cpu() if isinstance(removed, torch.Tensor) else removed, dtype=bool)
    if x.ndim != 4 or mask.shape != (x.shape[0], *x.shape[2:]):
        raise InputError(f"images must be (k, C, H, W) and removed (k, H, W); got {x.shape} and {mask.shape}")
    k, _, h, w = x.shape
    flat_mask = mask.reshape(k, h * w)
    if flat_mask.all(axis=1).any():
        raise InputError("an image has every pixel removed; there is nothing to impute from (use fractions < 1)")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    # SuperLU's cost grows faster than linearly with the system's size: solve groups of images
    per_image = np.cumsum(flat_mask.sum(1))
    starts = np.searchsorted(per_image, np.arange(SYSTEM_SIZE, per_image[-1], SYSTEM_SIZE), side="right")
    bounds = [0, *sorted(set(starts.tolist()) - {0, k}), k]
    parts = [_impute(x[a:b], flat_mask[a:b], float(noise), gen) for a, b in itertools.pairwise(bounds)]
    return np.concatenate(parts).reshape(x.shape)


def _impute(x: np.ndarray, flat_mask: np.ndarray, noise: float, gen: torch.Generator) -> np.ndarray:
    """:func:`noisy_linear_imputation` of images ``(k, C, H, W)`` as one block-diagonal system: ``(k, C, H*W)``."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    k, c, h, w = x.shape
    out = x.reshape(k, c, h * w).copy()
    img, pix = np.nonzero(flat_mask)  # unknowns, ordered by image then pixel
    n_var = len(img)
    if n_var == 0:
        return out.reshape(x.shape)
    var_id = np.full((k, h * w), -1, dtype=np.int64)
    var_id[img, pix] = np.arange(n_var)
    ny = (pix // w)[:, None] + _OFFSETS[None, :, 0]  # (N, 8)
    nx = (pix % w)[:, None] + _OFFSETS[None, :, 1]
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    npix = np.where(inside, ny * w + nx, 0)
    nvar = np.where(inside, var_id[img[:, None], npix], -1)
    weight = np.where(inside, _WEIGHTS[None, :], 0.0)
    unknown = nvar >= 0
    # row i: -(sum of in-frame weights) x_i + sum_{unknown j} w_ij x_j = -sum_{known j} w_ij v_j
    rows = np.concatenate([np.arange(n_var), np.nonzero(unknown)[0]])
    cols = np.concatenate([np.arange(n_var), nvar[unknown]])
    data = np.concatenate([-weight.sum(1), weight[unknown]])
    a = csc_matrix((data, (rows, cols)), shape=(n_var, n_var))
    known = np.where(unknown, 0.0, weight)  # (N, 8)
    values = out[img[:, None], :, npix]  # (N, 8, C)
    b = -np.einsum("nj,njc->nc", known, values)
    solution = np.asarray(spsolve(a, b)).reshape(n_var, c)
    if noise:
        solution = solution + float(noise) * torch.randn((n_var, c), generator=gen, dtype=torch.float64).numpy()
    out[img, :, pix] = solution
    return out


def _pixel_scores(importance: Importance, inputs: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Scores per pixel ``(n, H*W)`` (per-element scores summed over channels) and ``(H, W)``."""
    if inputs.ndim not in (3, 4):
        raise InputError(
            f"ROAD imputes image pixels: data must be (n, channels, height, width) or (n, height, width), "
            f"got shape {tuple(inputs.shape)}"
        )
    n = inputs.shape[0]
    h, w = int(inputs.shape[-2]), int(inputs.shape[-1])
    scores = flat_scores(importance, n)
    unit = tuple(importance.unit_shape)
    if unit == (h, w):
        return scores, (h, w)
    if unit == tuple(inputs.shape[1:]):
        return scores.reshape(n, -1, h * w).sum(1), (h, w)
    raise InputError(
        f"ROAD needs pixel scores of shape ({h}, {w}) or per-element scores {tuple(inputs.shape[1:])}; "
        f"the importance has units of shape {unit}"
    )


def road_curves(
    task: Task,
    importance: Importance,
    *,
    order: str = "morf",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    noise: float = 0.01,
    output: str = "accuracy",
    by_abs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROAD curves of every sample: ``(fractions (m,), values (n, m))``.

    ``values[i, j]`` is the model's ``output`` (see :func:`road_morf`) on image ``i`` with the
    ``floor(fractions[j] * H * W)`` most (``order="morf"``) or least (``"lerf"``) relevant pixels imputed.
    """
    if order not in ("morf", "lerf"):
        raise InputError(f"order must be 'morf' (most relevant first) or 'lerf' (least relevant first), got {order!r}")
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {OUTPUTS}, got {output!r}")
    if not isinstance(noise, numbers.Real) or isinstance(noise, bool) or not (math.isfinite(noise) and noise >= 0):
        raise InputError(f"noise must be a non-negative number (fraction of the data range), got {noise!r}")
    frac = check_fractions(fractions)
    x = task.inputs
    if not x.is_floating_point():
        raise InputError(f"ROAD imputes pixel values, so the images must be real-valued, not {x.dtype}")
    scores, (h, w) = _pixel_scores(importance, x)
    n, m = x.shape[0], len(frac)
    key = scores.abs() if by_abs else scores
    gen = task.generator()
    ranks = order_ranks(key if order == "morf" else -key, gen)  # (n, HW): 0 = removed first
    counts = torch.from_numpy(removal_counts(h * w, frac))
    removed = ranks.unsqueeze(1) < counts.view(1, m, 1)  # (n, m, HW)
    images = x.reshape(n, -1, h, w)
    std = float(noise) * float(x.max() - x.min())
    imputed = noisy_linear_imputation(
        images.repeat_interleave(m, dim=0), removed.reshape(n * m, h, w), noise=std, generator=gen
    )
    variants = torch.from_numpy(imputed).to(x.dtype).reshape(n * m, *x.shape[1:])
    labels = task.y if (output == "accuracy" and task.y is not None) else task.target
    labels = labels.reshape(-1).long().repeat_interleave(m)
    size = task.rows_per_call()
    values = torch.empty(n * m, dtype=torch.float64)
    chunks = row_slices(n * m, size)
    for rows in progress_bar(chunks, len(chunks), f"ROAD {order}", task.progress):
        out = task.model.predict(variants[rows], batch_size=size).to("cpu", torch.float64)
        lab = labels[rows].unsqueeze(1)
        if output == "accuracy":
            values[rows] = (out.argmax(1, keepdim=True) == lab).double().squeeze(1)
        elif output == "probability":
            values[rows] = out.softmax(1).gather(1, lab).squeeze(1)
        else:
            values[rows] = out.gather(1, lab).squeeze(1)
    return torch.from_numpy(frac), values.reshape(n, m)


def _area(fractions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean height of each curve: trapezoid area over the fractions divided by their span (the value if one)."""
    if len(fractions) == 1:
        return values[:, 0].clone()
    return torch.trapezoid(values, fractions.to(values), dim=-1) / float(fractions[-1] - fractions[0])


def _road_metric(order: str, summary: str) -> Any:
    """The metric function of one ROAD order (both orders share the signature and the documentation)."""

    def fn(
        task: Task,
        importance: Importance,
        *,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        noise: float = 0.01,
        output: str = "accuracy",
        by_abs: bool = False,
    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        if task.y is not None and len(task.y.reshape(-1)) != task.n:
            raise InputError(f"y has {len(task.y.reshape(-1))} labels for {task.n} images; give one per image")
        fractions_, values = road_curves(
            task, importance, order=order, fractions=fractions, noise=noise, output=output, by_abs=by_abs
        )
        return _area(fractions_, values), {order: (fractions_, values)}

    fn.__name__ = fn.__qualname__ = f"road_{order}"
    fn.__doc__ = summary + _ROAD_DOC
    return fn


_ROAD_DOC = """

    ``fractions``: the fractions of pixels imputed (each strictly between 0 and 1; default 10 %
    ... 90 %). ``noise``: standard deviation of the Gaussian noise added to the imputed pixels, as a
    fraction of the data range ``max(data) - min(data)`` (the paper's 0.01; Quantus' absolute
    ``noise=0.01`` equals it for data in [0, 1]); ``0`` gives plain linear imputation.
    ``output``: ``"accuracy"`` (the paper's: 1 where the model's top class on the imputed image is
    the label ``y``, or the explained target when no ``y`` is given), ``"probability"`` (softmax of
    the outputs at the target) or ``"output"`` (the raw target output). Pixels are ranked by score
    (``by_abs``: by absolute score; ties broken at random with ``seed``, which also seeds the noise).
    The score is the curve's mean height: the trapezoid area over the fractions divided by their
    span. Curve: the metric's order, ``x`` the fractions, ``y`` ``(n, m)``.
"""

road_morf = metric("road_morf", category="faithfulness", higher_is_better=False, units="pixel")(
    _road_metric(
        "morf",
        "ROAD MoRF: model accuracy as the most relevant pixels are imputed by noisy linear imputation "
        "(lower is better).",
    )
)
road_lerf = metric("road_lerf", category="faithfulness", higher_is_better=True, units="pixel")(
    _road_metric(
        "lerf",
        "ROAD LeRF: model accuracy as the least relevant pixels are imputed by noisy linear imputation "
        "(higher is better).",
    )
)

__all__ = ["DEFAULT_FRACTIONS", "noisy_linear_imputation", "road_curves", "road_lerf", "road_morf"]
