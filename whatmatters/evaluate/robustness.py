"""Robustness and sanity checks: does the explanation react to the input and to the model as it should?

* ``max_sensitivity`` (Yeh et al. 2019, "On the (In)fidelity and Sensitivity of Explanations"):
  the largest relative change of the explanation under small uniform input noise; lower is better.
* ``randomization`` (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): cascading
  model-parameter randomization; an explanation that still looks the same once the model's
  weights are random does not explain the model. Lower correlation is better.

Both re-run the importance's own method (``importance.method`` with its ``params``) through
:func:`whatmatters.explain`, batched: all perturbations of all samples in one call. The benchmark's
random reference has no method to re-run: its scores are NaN. Both are registered for pixel units
(so image benchmarks run them by default) and work on tabular features when called directly.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any

import torch
from scipy.stats import rankdata
from torch import nn

from whatmatters.core.adapters import TorchModel
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.importance import Importance
from whatmatters.core.registry import get_method
from whatmatters.evaluate.metrics import flat_scores, metric, metric_task


def _is_reference(importance: Importance) -> bool:
    """Whether ``importance`` is the benchmark's random reference (no method to re-run)."""
    from whatmatters.evaluate.benchmark import REFERENCE

    return importance.method == REFERENCE


def _method_params(importance: Importance) -> tuple[str, dict[str, Any]]:
    """The importance's method and the parameters of it that the method accepts."""
    if not importance.method:
        raise InputError(
            "this importance has no method recorded, so it cannot be re-computed; "
            "evaluate an Importance returned by whatmatters.explain"
        )
    try:
        info = get_method(importance.method)
    except (KeyError, ValueError) as err:
        raise MethodError(f"the importance's method {importance.method!r} is not a registered method: {err}") from None
    if info.verb != "explain":
        raise MethodError(f"{importance.method!r} is a {info.verb} method; only explain methods can be re-run here")
    params = {k: v for k, v in (importance.params or {}).items() if k in info.defaults}
    return info.name, params


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@metric("max_sensitivity", category="robustness", higher_is_better=False, units="pixel")
def max_sensitivity(
    model: Any,
    data: Any,
    importance: Importance,
    *,
    target: Any = None,
    background: Any = None,
    seed: int = 0,
    batch_size: int | None = None,
    n_samples: int = 10,
    radius: float = 0.02,
) -> torch.Tensor:
    """Max-sensitivity: largest relative change of the explanation under small input noise (lower is better).

    Each sample gets ``n_samples`` perturbations ``x + u`` with ``u`` drawn uniformly from
    ``[-r, r]`` per input element (an L-infinity ball), ``r = radius * (max(data) - min(data))``.
    The importance's method is re-run (same parameters, same target) on all perturbations in one
    call, and the score is ``max_j ||e(x_j) - e(x)||_2 / ||e(x)||_2`` with Frobenius (L2 over all
    units) norms in numerator and denominator, as in Quantus' ``MaxSensitivity`` defaults
    (without its ``normalise`` step). ``e(x)`` is the importance given; a zero explanation gives NaN.
    """
    n_samples = _positive_int("n_samples", n_samples)
    if not isinstance(radius, numbers.Real) or isinstance(radius, bool) or not radius > 0:
        raise InputError(f"radius must be a positive number (fraction of the data range), got {radius!r}")
    if not importance.per_sample:
        raise InputError("max_sensitivity needs per-sample explanations; this importance is aggregated")
    if _is_reference(importance):
        return torch.full((flat_scores(importance).shape[0],), float("nan"), dtype=torch.float64)
    method, params = _method_params(importance)
    with metric_task(model, data, importance, target=target, background=background, seed=seed) as task:
        x = task.inputs
        if not x.is_floating_point():
            raise InputError(f"max_sensitivity perturbs the inputs, so they must be real-valued, not {x.dtype}")
        n = x.shape[0]
        scale = float(radius) * float(x.max() - x.min())
        gen = task.generator()
        noise = (torch.rand((n * n_samples, *x.shape[1:]), generator=gen, dtype=torch.float64) * 2 - 1) * scale
        perturbed = x.repeat_interleave(n_samples, dim=0) + noise.to(x.device, x.dtype)
        tgt = task.target.repeat_interleave(n_samples)
        background = task.background if task.background is not None else x
        from whatmatters.explain import explain

        again = explain(
            model,
            perturbed,
            method=method,
            target=tgt,
            background=background,
            seed=seed,
            batch_size=batch_size,
            progress=False,
            **params,
        )
    e = flat_scores(importance, n)  # (n, d)
    e2 = flat_scores(again, n * n_samples).reshape(n, n_samples, -1)
    num = torch.linalg.vector_norm(e2 - e.unsqueeze(1), dim=-1)  # (n, n_samples)
    den = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    ratio = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))
    return ratio.amax(dim=1)


def cascade_layers(model: nn.Module) -> list[str]:
    """Names of the layers ``randomization`` re-initializes, in its order: output layer first.

    A layer is a module with parameters of its own; the order is the reverse of registration order
    (``model.named_modules()``), which is the forward order for sequential models.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"randomization re-initializes a PyTorch model's layers; got a {type(model).__name__}. "
            "Use a torch nn.Module (scikit-learn and plain callables have no layers to randomize)"
        )
    layers = [name for name, mod in model.named_modules() if any(True for _ in mod.parameters(recurse=False))]
    return layers[::-1]


@torch.no_grad()
def _reinitialize(module: nn.Module) -> None:
    """New random parameters for one layer: its own ``reset_parameters``, else a normal draw of matching scale."""
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
        return
    for p in module.parameters(recurse=False):
        std = float(p.detach().float().std()) if p.numel() > 1 else 0.0
        p.normal_(0.0, std if std > 0 else 0.02)


def _spearman_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman correlation of ``|a|`` and ``|b|`` (average ranks for ties; NaN for constant rows)."""
    ra = torch.from_numpy(rankdata(a.abs().numpy(), axis=1))
    rb = torch.from_numpy(rankdata(b.abs().numpy(), axis=1))
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = torch.linalg.vector_norm(ra, dim=1) * torch.linalg.vector_norm(rb, dim=1)
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


@metric("randomization", category="randomization", higher_is_better=False, units="pixel")
def randomization(
    model: Any,
    data: Any,
    importance: Importance,
    *,
    target: Any = None,
    background: Any = None,
    seed: int = 0,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Cascading model-parameter randomization (Adebayo et al. 2018): similarity to the explanation of a random model.

    On a deep copy of the model (the given model is never changed), layers are re-initialized one
    at a time from the output down (cumulatively; order: ``cascade_layers(model)``), and the
    importance's method is re-run (same parameters and target) after each step. The score is, per
    sample, the Spearman rank correlation of the absolute scores of the given importance and of the
    fully randomized model's explanation: near 1 means the explanation ignores the model (fails the
    sanity check), lower is better. Curve ``"cascade"``: ``x = k`` (layers randomized, 1..L),
    ``y[:, k-1]`` the correlation after the ``k`` top layers (``cascade_layers(model)[:k]``).
    """
    if not isinstance(model, nn.Module):
        cascade_layers(model)  # raises the ModelError naming the problem
    if _is_reference(importance):
        return torch.full((flat_scores(importance).shape[0],), float("nan"), dtype=torch.float64), {}
    method, params = _method_params(importance)
    with metric_task(model, data, importance, target=target, background=background, seed=seed) as task:
        if not isinstance(task.model, TorchModel):
            raise ModelError("randomization needs a PyTorch nn.Module")
        x, tgt = task.inputs, task.target
        bg = task.background
        layers = cascade_layers(model)
        if not layers:
            raise ModelError("randomization found no layer with parameters in the model; there is nothing to randomize")
    n = x.shape[0]
    original = flat_scores(importance, n)
    twin = copy.deepcopy(model)
    twin.eval()
    named = dict(twin.named_modules())
    from whatmatters.explain import explain

    curve = torch.empty(n, len(layers), dtype=torch.float64)
    cuda = sorted({p.device.index or 0 for p in twin.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for k, name in enumerate(layers):
            _reinitialize(named[name])
            again = explain(
                twin,
                x,
                method=method,
                target=tgt,
                background=bg,
                seed=seed,
                batch_size=batch_size,
                progress=False,
                **params,
            )
            curve[:, k] = _spearman_abs(original, flat_scores(again, n))
    steps = torch.arange(1, len(layers) + 1, dtype=torch.float64)
    return curve[:, -1].clone(), {"cascade": (steps, curve)}


__all__ = ["cascade_layers", "max_sensitivity", "randomization"]
