"""``whatmatters.compress.merge``: one model from several fine-tunes of the same base, by task vectors.

A fine-tune's task vector is ``τ_i = θ_i - θ_0``. Methods (all over the flattened floating-point parameters
that every model shares; ``exclude`` keeps some, e.g. task heads, at the base's values):

* ``"task_arithmetic"`` (Ilharco et al. 2023): ``θ_0 + λ Σ τ_i`` (default ``λ = 1/n``: weight averaging).
* ``"ties"`` (Yadav et al. 2023): keep each ``τ_i``'s ``keep`` share of largest magnitudes, elect a sign per
  parameter by the sum of the kept values, average the kept values that agree with it (disjoint mean).
* ``"pcb"`` (PCB-Merging, Du et al. 2024): per parameter, intra-balancing ``exp(n · minmax(|τ_i|)²)``
  (its importance within the task) times inter-balancing ``tanh(τ_i · Σ_j τ_j)`` (its agreement with the
  other tasks); each task keeps its ``keep`` share of highest scores, the kept scores rescaled to ``[0, 1]``
  weight a per-parameter average ``Σ β_i τ_i / Σ β_i``. Magnitudes are first clamped at the 0.01 % /
  99.99 % percentiles. This is the authors' ``pcb-merging.py`` (github duguodong7/pcb-merging): min-max
  per task over the whole flattened vector, the paper's softmax replaced by ``exp`` (the per-task softmax
  constant cancels in the min-max after the drop) and its ``Σ_j Softmax(Norm(τ_i τ_j))`` by
  ``tanh(τ_i Σ_j τ_j)``. Not done: their per-task ``λ_i`` searched by an evolution strategy, and the 1 %
  clamp and min-max-normalised inter term of their vision / NLP scripts.
* ``"random"``: the same weighted average with random masks at the same ``keep`` share (the baseline that
  shows whether the scores matter).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from whatmatters.core.actions import Compressed
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.fractions import kept_share

METHODS = ("pcb", "ties", "task_arithmetic", "random")
_CLAMP = 1e-4  # PCB's outlier clamp: the 0.01 % and 99.99 % percentiles of |τ|


@dataclass
class MergeReport:
    """What ``merge`` did: method, ``keep`` share, ``scaling`` λ, merged / excluded parameter names."""

    method: str
    n_models: int
    keep: float
    scaling: float
    merged: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    n_merged: int = 0
    kept_per_model: list[float] = field(default_factory=list)


def _kth(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per row of ``x`` ``(n, d)``, the value at quantile ``q`` (``kthvalue``: no size limit, unlike quantile)."""
    k = min(max(int(x.shape[1] * q), 1), x.shape[1])
    return x.kthvalue(k, dim=1, keepdim=True).values


def _nth_largest(x: torch.Tensor, n: int) -> torch.Tensor:
    """Per row of ``x`` ``(k, d)``, its ``n``-th largest value (``n`` clipped to ``[1, d]``)."""
    n = min(max(n, 1), x.shape[1])
    return x.kthvalue(x.shape[1] - n + 1, dim=1, keepdim=True).values


def _n_kept(x: torch.Tensor, keep: float) -> int:
    return max(1, round(keep * x.shape[1]))


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def _weighted_mean(tvs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (tvs * weights).sum(0) / weights.sum(0).clamp_min(1e-12)


def pcb_weights(tvs: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PCB's clamped task vectors and per-parameter weights ``β`` ``(n, d)`` (0 for dropped entries)."""
    n = tvs.shape[0]
    magnitude = tvs.abs()
    magnitude = torch.minimum(torch.maximum(magnitude, _kth(magnitude, _CLAMP)), _kth(magnitude, 1 - _CLAMP))
    clamped = torch.sign(tvs) * magnitude
    intra = torch.exp(n * _minmax(magnitude) ** 2)
    inter = torch.tanh(tvs * tvs.sum(0, keepdim=True))
    score = intra * inter
    floor = _nth_largest(score, _n_kept(score, keep) + 1)  # raised to the floor, then min-max: weight 0
    return clamped, _minmax(torch.maximum(score, floor))


def ties_merge(tvs: torch.Tensor, keep: float) -> torch.Tensor:
    """TIES: trim to the ``keep`` largest magnitudes per task, elect signs by mass, disjoint mean."""
    magnitude = tvs.abs()
    trimmed = tvs * (magnitude >= _nth_largest(magnitude, _n_kept(tvs, keep)))
    sign = torch.sign(trimmed.sum(0, keepdim=True))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return _weighted_mean(trimmed, agree.to(tvs.dtype))


def merge_vectors(tvs: torch.Tensor, method: str, keep: float, generator: torch.Generator) -> tuple[torch.Tensor, list]:
    """The merged task vector ``(d,)`` of ``tvs`` ``(n, d)`` and each task's share of entries kept."""
    if method == "task_arithmetic":
        return tvs.sum(0), [1.0] * len(tvs)
    if method == "ties":
        kept = tvs.abs() >= _nth_largest(tvs.abs(), _n_kept(tvs, keep))
        return ties_merge(tvs, keep), kept.double().mean(1).tolist()
    if method == "pcb":
        clamped, weights = pcb_weights(tvs, keep)
        return _weighted_mean(clamped, weights), (weights > 0).double().mean(1).tolist()
    mask = (torch.rand(tvs.shape, generator=generator) < keep).to(tvs.dtype)
    return _weighted_mean(tvs, mask.to(tvs.device)), mask.double().mean(1).tolist()


def _shared_parameters(
    base: nn.Module, models: Sequence[nn.Module], excluded: list[re.Pattern]
) -> dict[str, torch.Tensor]:
    """The base's floating-point tensors, checked against every fine-tune (excluded names: presence only)."""
    ref = base.state_dict()
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ModelError(f"finetuned[{i}] is a {type(m).__name__}, not a PyTorch nn.Module")
        state = m.state_dict()
        missing = sorted(set(ref) ^ set(state))
        if missing:
            raise ModelError(
                f"finetuned[{i}] and the base have different parameters (e.g. {missing[0]!r}); merge fine-tunes "
                "of the same architecture (give each task's own head via exclude=)"
            )
        bad = next(
            (k for k, v in ref.items() if v.shape != state[k].shape and not any(r.search(k) for r in excluded)), None
        )
        if bad is not None:
            raise ModelError(
                f"parameter {bad!r} has shape {tuple(ref[bad].shape)} in the base but "
                f"{tuple(state[bad].shape)} in finetuned[{i}]; merging needs models of the same shapes "
                "(leave differing heads out with exclude=)"
            )
    return {k: v for k, v in ref.items() if v.is_floating_point()}


def merge(
    base: nn.Module,
    finetuned: Sequence[nn.Module],
    method: str = "pcb",
    *,
    keep: float = 0.2,
    scaling: float | None = None,
    exclude: str | Sequence[str] | None = None,
    seed: int = 0,
) -> Compressed:
    """A new model ``θ_0 + λ · merge(τ_1..τ_n)`` (module docstring); ``base`` and ``finetuned`` are untouched.

    Args:
        base: the pre-trained model every fine-tune started from.
        finetuned: two or more fine-tunes (same parameter names and shapes as ``base``).
        method: ``"pcb"``, ``"ties"``, ``"task_arithmetic"`` or ``"random"``.
        keep: share of each task vector's entries kept (``pcb``, ``ties``, ``random``), in ``(0, 1]``.
        scaling: ``λ`` (default ``1/n`` for task arithmetic, 1 otherwise).
        exclude: regular expression(s) of parameter names left at the base's values (e.g. ``r"classifier"``).
        seed: the random masks of ``method="random"``.

    Returns:
        ``Compressed(model, MergeReport)``.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(base, nn.Module):
        raise ModelError(f"base must be a PyTorch nn.Module, got {type(base).__name__}")
    if isinstance(finetuned, nn.Module) or not isinstance(finetuned, Sequence) or len(finetuned) < 1:
        raise InputError("finetuned must be a list of one or more fine-tuned models of the base")
    keep = kept_share(keep, name="keep") if method != "task_arithmetic" else 1.0
    if keep == 0:
        raise InputError("keep=0 would drop every task-vector entry; give a share in (0, 1]")
    n = len(finetuned)
    lam = (1.0 / n if method == "task_arithmetic" else 1.0) if scaling is None else scaling
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not torch.isfinite(torch.tensor(float(lam))):
        raise InputError(f"scaling must be a finite number, got {scaling!r}")
    patterns = [exclude] if isinstance(exclude, str) else list(exclude or [])
    try:
        regexes = [re.compile(p) for p in patterns]
    except re.error as err:
        raise InputError(f"exclude is not a valid regular expression: {err}") from None
    shared = _shared_parameters(base, finetuned, regexes)
    names = [k for k in shared if not any(r.search(k) for r in regexes)]
    if not names:
        raise InputError("exclude leaves no parameter to merge")
    states = [m.state_dict() for m in finetuned]
    ref = shared[names[0]]
    tvs = torch.stack(
        [
            torch.cat([(s[k].to(ref.device, torch.float32) - shared[k].float()).reshape(-1) for k in names])
            for s in states
        ]
    )
    merged, kept = merge_vectors(tvs, method, keep, torch.Generator().manual_seed(seed))
    new = copy.deepcopy(base)
    params = dict(new.state_dict(keep_vars=True))
    offset = 0
    with torch.no_grad():
        for k in names:
            target = params[k]
            part = merged[offset : offset + target.numel()].reshape(target.shape)
            target.copy_((shared[k].float() + lam * part).to(target.dtype))
            offset += target.numel()
    report = MergeReport(method, n, keep, float(lam), names, [k for k in shared if k not in names], offset, kept)
    return Compressed(new, report)


def _describe(report: MergeReport) -> dict[str, Any]:
    return {"method": report.method, "keep": report.keep, "scaling": report.scaling, "n_merged": report.n_merged}
