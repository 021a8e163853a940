"""CF-CAM: Cluster Filter Class Activation Mapping (He, Pan & Yao 2025, arXiv 2504.00060)."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core.errors import MethodError
from whatmatters.core.layers import Reshape
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task
from whatmatters.explain.cam import CamBatch, class_activation_map, weighted_sum


def cluster_channels(
    features: torch.Tensor, important: torch.Tensor, eps_quantile: float, min_samples_frac: float
) -> torch.Tensor:
    """DBSCAN labels ``(b, C)`` of each image's channels: ``-2`` important, ``-1`` noise, ``0..`` clusters.

    ``features`` ``(b, C, d)`` are the flattened activation maps. Per image, the channels that are
    not ``important`` are clustered with ``eps`` = the ``eps_quantile`` quantile of their pairwise
    Euclidean distances (off-diagonal, numpy's linear interpolation, at least 1e-5) and
    ``min_samples = max(2, int(min_samples_frac * count))``. DBSCAN has no batched form, so this
    loops over images; the distances are computed once, in torch, and passed precomputed.
    """
    from sklearn.cluster import DBSCAN

    b, channels = important.shape
    labels = torch.full((b, channels), -2, dtype=torch.long, device=features.device)
    for i in range(b):
        rest = (~important[i]).nonzero().squeeze(1)
        count = len(rest)
        if count < 2:
            labels[i, rest] = -1
            continue
        f = features[i, rest].unsqueeze(0)
        dist = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")[0].cpu().double().numpy()
        off = dist[~np.eye(count, dtype=bool)]
        eps = max(float(np.quantile(off, eps_quantile)), 1e-5)
        min_samples = max(2, int(count * min_samples_frac))
        found = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dist)
        labels[i, rest] = torch.from_numpy(found).to(labels.device)
    return labels


def filtered_means(maps: torch.Tensor, sigma: float, range_sigma: float) -> torch.Tensor:
    """Mean of each map ``(b, k, h, w)`` after the authors' "bilateral" filter: ``(b, k)``.

    Every map gets its own ``h x w`` kernel: a Gaussian of ``sigma`` around ``(h/2, w/2)`` times
    ``exp(-(g - mean g)^2 / (2 range_sigma^2))`` of the map's values against its global mean,
    normalised to sum 1 (+1e-6), applied as a zero-padded 'same' cross-correlation (as
    ``F.conv2d(padding='same')``). All maps are
    filtered at once by one grouped convolution.
    """
    b, k, h, w = maps.shape
    ys = torch.arange(h, device=maps.device, dtype=maps.dtype) - h / 2
    xs = torch.arange(w, device=maps.device, dtype=maps.dtype) - w / 2
    spatial = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))
    diff = maps - maps.mean((2, 3), keepdim=True)
    kernel = spatial * torch.exp(-(diff**2) / (2 * range_sigma**2))
    kernel = kernel / (kernel.sum((2, 3), keepdim=True) + 1e-6)
    top, left = (h - 1) // 2, (w - 1) // 2  # torch's 'same' padding, explicit for even sizes
    padded = F.pad(maps.reshape(1, b * k, h, w), (left, w - 1 - left, top, h - 1 - top))
    out = F.conv2d(padded, kernel.reshape(b * k, 1, h, w), groups=b * k)
    return out.view(b, k, h, w).mean((2, 3))


def _cf_cam_map(
    batch: CamBatch,
    *,
    keep_quantile: float,
    eps_quantile: float,
    min_samples_frac: float,
    sigma: float,
    range_sigma: float,
) -> tuple[torch.Tensor, dict[str, list[Any]]]:
    acts, grads = batch.activations, batch.gradients
    features = acts.flatten(2)
    norms = features.norm(dim=2)
    threshold = torch.quantile(norms, keep_quantile, dim=1, keepdim=True)
    important = norms >= threshold
    labels = cluster_channels(features, important, eps_quantile, min_samples_frac)
    weights = grads.mean((2, 3))  # plain Grad-CAM weights for the important channels
    n_clusters = int(labels.max()) + 1
    if n_clusters > 0:
        member = (labels.unsqueeze(-1) == torch.arange(n_clusters, device=labels.device)).to(acts.dtype)  # (b, C, K)
        counts = member.sum(1).clamp_min(1)
        mean_grads = torch.einsum("bck,bchw->bkhw", member, grads) / counts[:, :, None, None]
        cluster_weight = torch.einsum("bck,bk->bc", member, filtered_means(mean_grads, sigma, range_sigma))
        weights = torch.where(labels >= 0, cluster_weight, weights)
    kept = labels != -1
    weights = torch.softmax(weights.masked_fill(~kept, float("-inf")), dim=1)
    extra = {
        "clusters": [int(n) for n in (labels.max(1).values + 1).clamp_min(0).tolist()],
        "important_channels": important.sum(1).tolist(),
        "kept_channels": kept.sum(1).tolist(),
    }
    return weighted_sum(weights, acts), extra


@scorer("cf_cam", family="cam", units="pixel", needs="module", aliases=("cfcam",))
def cf_cam(
    task: Task,
    *,
    layer: str | nn.Module | None = None,
    reshape: Reshape | None = None,
    normalize: bool | str = "max",
    keep_quantile: float = 0.75,
    eps_quantile: float = 0.25,
    min_samples_frac: float = 0.05,
    sigma: float = 5.0,
    range_sigma: float = 0.1,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """CF-CAM (He, Pan & Yao 2025): Grad-CAM with channels clustered by DBSCAN and cluster gradients filtered.

    Steps (per image, batched over images except DBSCAN):

    1. channels are points given by their flattened activation maps; those whose L2 norm is at or
       above the ``keep_quantile`` quantile are *important* and keep the Grad-CAM weight (spatial mean
       of their gradient), unfiltered;
    2. the others are clustered with DBSCAN (``eps`` = ``eps_quantile`` quantile of their pairwise
       distances, ``min_samples = max(2, int(min_samples_frac * count))``); noise channels are dropped;
    3. each cluster's mean gradient map is filtered (see :func:`filtered_means`) and every member gets
       the filtered map's mean as its weight;
    4. ``CAM = ReLU(sum softmax(w)_c A_c)`` over the kept channels, upsampled, divided by its maximum.

    Whose choices: the paper gives the three ideas (hierarchical weighting of important channels,
    DBSCAN clustering that discards noise channels, cluster-conditioned *Gaussian* filtering of
    gradients) and evaluates at ResNet-50 ``layer4[-1]``. The authors' code (jerryp-hfut/CF-CAM,
    ``cfcam.py``) fixes everything else and is followed here: activation maps (not gradients) as
    features, the 75th-percentile norm cut, ``eps`` = 25th percentile, 5 % ``min_samples``, its
    "bilateral" filter (a Gaussian of ``sigma=5`` centred at ``(h/2, w/2)`` times a range term against
    the map's *global* mean with ``range_sigma=0.1``, so not a true bilateral filter), a softmax over
    the weights (so all weights are positive, unlike Grad-CAM) and max normalisation
    (``normalize="max"``). Ours: any layer and ViTs (through the CAM base), batching and devices, the
    pairwise distances computed once and given to DBSCAN precomputed, and the parameters exposed.
    Note (the code's behaviour, kept): gradient means are usually far below 1, so the softmax
    weights are close to uniform and the map is close to the mean of the kept activation maps.

    Args:
        keep_quantile: norm quantile at or above which a channel is important.
        eps_quantile: quantile of pairwise distances used as DBSCAN's ``eps``.
        min_samples_frac: DBSCAN ``min_samples`` as a fraction of the clustered channels (at least 2).
        sigma: spatial standard deviation of the filter, in feature-map cells.
        range_sigma: standard deviation of the filter's range term, in gradient units.
        layer, reshape, normalize: as for every CAM (see ``grad_cam``); ``normalize`` defaults to
            ``"max"`` here, as the authors' code.
    """
    for label, q in (("keep_quantile", keep_quantile), ("eps_quantile", eps_quantile)):
        if not 0.0 <= q <= 1.0:
            raise MethodError(f"{label} must lie in [0, 1], got {q}")
    if not 0.0 <= min_samples_frac <= 1.0:
        raise MethodError(f"min_samples_frac must lie in [0, 1], got {min_samples_frac}")
    if sigma <= 0 or range_sigma <= 0:
        raise MethodError(f"sigma and range_sigma must be positive, got {sigma} and {range_sigma}")
    method = partial(
        _cf_cam_map,
        keep_quantile=keep_quantile,
        eps_quantile=eps_quantile,
        min_samples_frac=min_samples_frac,
        sigma=sigma,
        range_sigma=range_sigma,
    )
    return class_activation_map(
        task, method, layer=layer, reshape=reshape, normalize=normalize, gradients=True, description="CF-CAM"
    )
