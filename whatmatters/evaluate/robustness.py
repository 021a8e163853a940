"""Robustness and sanity checks: does the explanation react to the input and to the model as it should?

* ``max_sensitivity`` (Yeh et al. 2019, "On the (In)fidelity and Sensitivity of Explanations"):
  the largest relative change of the explanation under small uniform input noise; lower is better.
* ``randomization`` (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): cascading
  model-parameter randomization; an explanation that still looks the same once the model's
  weights are random does not explain the model. Lower correlation is better.
* ``gradient_noise``: how much the map changes when Gaussian noise is added to the gradient the
  method back-propagates (at its target layer for CAMs, at the input for pixel-gradient methods),
  the robustness CF-CAM's authors claim for their method. Lower is better.

All three re-run the importance's own method (``importance.method`` with its ``params``) through
:func:`whatmatters.explain`, batched: all perturbations of all samples in one call. The benchmark's
random reference has no method to re-run: its scores are NaN. Both are registered for pixel units
(so image benchmarks run them by default) and work on tabular features when called directly.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from whatmatters.core.adapters import TorchModel
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.importance import Importance
from whatmatters.core.registry import get_method
from whatmatters.core.state import hooks
from whatmatters.core.task import Task
from whatmatters.evaluate.agreement import spearman
from whatmatters.evaluate.metrics import flat_scores, metric


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


def _explain_again(
    task: Task,
    method: str,
    params: dict[str, Any],
    inputs: torch.Tensor | None = None,
    *,
    model: Any = None,
    target: torch.Tensor | None = None,
) -> Importance:
    """The importance's method re-run (same parameters, target, background, seed, batch size) without a progress
    bar, on ``inputs``, ``model`` and ``target`` (default: the task's)."""
    from whatmatters.explain import explain

    return explain(
        task.model if model is None else model,
        task.inputs if inputs is None else inputs,
        method=method,
        target=task.target if target is None else target,
        background=task.background,
        seed=task.seed,
        batch_size=task.batch_size,
        progress=False,
        **params,
    )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@metric("max_sensitivity", category="robustness", higher_is_better=False, units="pixel")
def max_sensitivity(
    task: Task,
    importance: Importance,
    *,
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
    x = task.inputs
    if not x.is_floating_point():
        raise InputError(f"max_sensitivity perturbs the inputs, so they must be real-valued, not {x.dtype}")
    n = x.shape[0]
    scale = float(radius) * float(x.max() - x.min())
    gen = task.generator()
    noise = (torch.rand((n * n_samples, *x.shape[1:]), generator=gen, dtype=torch.float64) * 2 - 1) * scale
    perturbed = x.repeat_interleave(n_samples, dim=0) + noise.to(x.device, x.dtype)
    background = task.background if task.background is not None else x
    again = _explain_again(
        replace(task, background=background), method, params, perturbed, target=task.target.repeat_interleave(n_samples)
    )
    e = flat_scores(importance, n)  # (n, d)
    e2 = flat_scores(again, n * n_samples).reshape(n, n_samples, -1)
    return _relative_l2(e.unsqueeze(1), e2).amax(dim=1)  # (n, n_samples) -> (n,)


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
    return _spearman(a.abs(), b.abs())


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman correlation (average ranks for ties; NaN for constant rows)."""
    constant = (a == a[..., :1]).all(-1) | (b == b[..., :1]).all(-1)
    return torch.where(constant, float("nan"), spearman(a, b))


def _relative_l2(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``||other - reference|| / ||reference||`` over the last axis (broadcast); NaN where ``reference`` is zero."""
    num = torch.linalg.vector_norm(other - reference, dim=-1)
    den = torch.linalg.vector_norm(reference, dim=-1).expand_as(num)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))


@metric("randomization", category="randomization", higher_is_better=False, units="pixel")
def randomization(
    task: Task, importance: Importance
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
    model = task.model.module if isinstance(task.model, TorchModel) else task.model
    if not isinstance(model, nn.Module):
        cascade_layers(model)  # raises the ModelError naming the problem
    if _is_reference(importance):
        return torch.full((flat_scores(importance).shape[0],), float("nan"), dtype=torch.float64), {}
    method, params = _method_params(importance)
    layers = cascade_layers(model)
    if not layers:
        raise ModelError("randomization found no layer with parameters in the model; there is nothing to randomize")
    n = task.n
    original = flat_scores(importance, n)
    twin = copy.deepcopy(model)
    twin.eval()
    named = dict(twin.named_modules())
    curve = torch.empty(n, len(layers), dtype=torch.float64)
    cuda = sorted({p.device.index or 0 for p in twin.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(task.seed)
        for k, name in enumerate(layers):
            _reinitialize(named[name])
            again = _explain_again(task, method, params, model=twin)
            curve[:, k] = _spearman_abs(original, flat_scores(again, n))
    steps = torch.arange(1, len(layers) + 1, dtype=torch.float64)
    return curve[:, -1].clone(), {"cascade": (steps, curve)}


class GradientNoise:
    """A tensor hook adding ``N(0, (sigma * std_row(g))^2)`` to each row of a gradient; counts the gradients it saw.

    ``std_row`` is the population standard deviation of the row's clean gradient (all its elements),
    so the noise is relative to the gradient's own scale; a row whose gradient is constant gets none.
    """

    def __init__(self, sigma: float, seed: int) -> None:
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.calls = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.sigma == 0:
            return grad
        gen = self._generators.get(grad.device)
        if gen is None:
            gen = self._generators[grad.device] = torch.Generator(device=grad.device).manual_seed(self.seed)
        work = torch.promote_types(grad.dtype, torch.float32)
        rows = grad.reshape(grad.shape[0], -1).to(work) if grad.ndim else grad.reshape(1, 1).to(work)
        scale = self.sigma * rows.std(dim=1, correction=0, keepdim=True)
        noise = torch.randn(rows.shape, generator=gen, device=grad.device, dtype=work) * scale
        return (rows + noise).reshape(grad.shape).to(grad.dtype)


def _noise_at_layer(layer: nn.Module, noise: GradientNoise) -> Any:
    """Hooks adding ``noise`` to the gradient of ``layer``'s output, whichever other hooks the method adds.

    A forward pre-hook registers, at each call of the layer, a one-shot forward hook; being added last,
    it runs after the method's own hooks (a CAM replaces the output by a leaf's copy) and attaches
    ``noise`` to the output the rest of the model consumes. Outputs without autograd get nothing.
    """
    pending: list[Any] = []

    def attach(_m: nn.Module, _inp: Any, out: Any) -> None:
        pending.pop().remove()
        tensor = out if isinstance(out, torch.Tensor) else next((t for t in out if isinstance(t, torch.Tensor)), None)
        if tensor is not None and tensor.requires_grad:
            tensor.register_hook(noise)

    def arm(_m: nn.Module, _inp: Any) -> None:
        pending.append(layer.register_forward_hook(attach))

    pre = layer.register_forward_pre_hook(arm)

    class _Handles:
        def remove(self) -> None:
            pre.remove()
            while pending:
                pending.pop().remove()

    return _Handles()


def _noise_at_input(module: nn.Module, noise: GradientNoise) -> Any:
    """A forward pre-hook passing the model's first input through a view whose gradient gets ``noise``."""

    def pre(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].requires_grad:
            return None
        view = args[0].view_as(args[0])
        view.register_hook(noise)
        return (view, *args[1:])

    return module.register_forward_pre_hook(pre)


def _distance(clean: torch.Tensor, noisy: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "spearman":
        return torch.where((clean == noisy).all(-1), 0.0, 1 - _spearman(clean, noisy))  # exact 0 for equal maps
    return _relative_l2(clean, noisy)


@metric("gradient_noise", category="robustness", higher_is_better=False, units="pixel")
def gradient_noise(
    task: Task,
    importance: Importance,
    *,
    sigma: float = 0.1,
    n_repeats: int = 3,
    at: str = "auto",
    distance: str = "relative_l2",
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Gradient-noise stability: change of the map when the back-propagated gradient is noisy (lower is better).

    The importance's method is re-run (same parameters and target) once cleanly and ``n_repeats`` times
    with zero-mean Gaussian noise of standard deviation ``sigma * std(g)`` added to the gradient ``g``
    flowing back through one point (``std`` per sample, over the gradient's elements):

    * ``at="layer"``: the output of the method's target layer (``layer`` parameter, else the layer
      the importance records, else the automatic choice); the gradient CAMs weigh their channels by;
    * ``at="input"``: the model's input (saliency, gradient x input, integrated gradients and
      SmoothGrad get the noise in every gradient they take);
    * ``"auto"``: ``"layer"`` for the CAM family (CF-CAM included), ``"input"`` otherwise.

    Score per sample: the mean over repeats of ``||e_noisy - e||_2 / ||e||_2`` (``distance="relative_l2"``,
    default: zero exactly when the maps agree, grows with the noise, does not depend on the map's
    overall scale, and matches ``max_sensitivity``) or of ``1 - Spearman(e_noisy, e)``
    (``"spearman"``: only the ranking, which is what deletion and ROAD read). ``e`` is the clean
    re-run, so ``sigma=0`` gives exactly 0. A method that takes no gradient through that point
    (Score-CAM, Eigen-CAM, occlusion, and the benchmark's random reference) is not applicable: NaN
    scores, not a perfect 0. Curve ``"repeats"``: ``x = 1..n_repeats``, ``y`` each repeat's distance.
    The model's hooks are removed on exit, also on error.
    """
    n_repeats = _positive_int("n_repeats", n_repeats)
    if not isinstance(sigma, numbers.Real) or isinstance(sigma, bool) or not (sigma >= 0 and sigma < float("inf")):
        raise InputError(f"sigma must be a non-negative number (noise std relative to the gradient's), got {sigma!r}")
    if at not in ("auto", "layer", "input"):
        raise InputError(f"at must be 'auto', 'layer' or 'input', got {at!r}")
    if distance not in ("relative_l2", "spearman"):
        raise InputError(f"distance must be 'relative_l2' or 'spearman', got {distance!r}")
    if not importance.per_sample:
        raise InputError("gradient_noise needs per-sample explanations; this importance is aggregated")
    n_rows = flat_scores(importance).shape[0]
    if _is_reference(importance):
        return torch.full((n_rows,), float("nan"), dtype=torch.float64), {}
    method, params = _method_params(importance)
    info = get_method(method)
    if at == "auto":
        at = "layer" if info.family == "cam" and "layer" in info.defaults else "input"
    if not isinstance(task.model, TorchModel):
        raise ModelError("gradient_noise perturbs gradients inside the model: it needs a PyTorch nn.Module")
    x, module = task.inputs, task.model.module
    if at == "layer":
        if "layer" not in info.defaults:
            raise InputError(f"{method!r} takes no target layer; use at='input'")
        if info.family != "cam" and params.get("layer") is None:  # the gradient family's layer= is optional
            raise InputError(f"{method!r} was run on the inputs (no layer=), so it has no target layer; use at='input'")
        from whatmatters.core.layers import resolve_layer

        chosen = params.get("layer") or (importance.extra or {}).get("layer")
        layer = resolve_layer(module, chosen, task.model.forward, task.model.to_model(x[:1]))[1]
    n = x.shape[0]
    clean = flat_scores(_explain_again(task, method, params), n)
    curve = torch.empty(n, n_repeats, dtype=torch.float64)
    noise = GradientNoise(sigma, task.seed)
    for r in range(n_repeats):
        handle = _noise_at_layer(layer, noise) if at == "layer" else _noise_at_input(module, noise)
        with hooks(handle):
            noisy = flat_scores(_explain_again(task, method, params), n)
        curve[:, r] = _distance(clean, noisy, distance)
    if noise.calls == 0:  # no gradient went through the noisy point: the metric does not apply
        curve.fill_(float("nan"))
    steps = torch.arange(1, n_repeats + 1, dtype=torch.float64)
    return curve.mean(1), {"repeats": (steps, curve)}


__all__ = ["GradientNoise", "cascade_layers", "gradient_noise", "max_sensitivity", "randomization"]
