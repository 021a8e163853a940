"""Weight importance scores: magnitude, Wanda, first-order Taylor, empirical Fisher, gradient-augmented Wanda.

Each scorer returns ``{layer name: (out_features, in_features) float32 scores}``; higher = keep.
Activation statistics and gradients are computed once on the unpruned model (one-shot calibration) and
shared through :class:`~whatmatters.compress.calibrate.Calibration`. The Wanda and GBLM reference code
recomputes each block's inputs after pruning the blocks before it (sequential calibration); whatmatters
separates scoring from pruning, so its scores are those of the dense model.
"""

from __future__ import annotations

import torch

from whatmatters.compress.api import WeightTask
from whatmatters.core.errors import MethodError
from whatmatters.core.registry import scorer

_KW = {"verb": "compress", "units": "weight", "family": "weight", "needs": "module", "per_sample": False}


@scorer("magnitude", **_KW)
def magnitude(task: WeightTask) -> dict[str, torch.Tensor]:
    """Weight magnitude ``|W_ij|`` (no data needed)."""
    return {n: w.abs().float() for n, w in task.weights().items()}


@scorer("wanda", **_KW)
def wanda(task: WeightTask) -> dict[str, torch.Tensor]:
    """Wanda (Sun et al., 2024): ``|W_ij| * ||X_j||_2``, the weight times the L2 norm of its input channel.

    ``||X_j||_2`` is taken over all calibration tokens (padding excluded). Pruning compares weights
    within each output row (``prune(..., group="row")``), as the paper does.
    """
    acts = task.activations()
    return {n: w.abs().float() * acts[n].norm.to(w.device, torch.float32) for n, w in task.weights().items()}


@scorer("taylor", aliases=("taylor_first_order",), **_KW)
def taylor(task: WeightTask) -> dict[str, torch.Tensor]:
    """First-order Taylor importance ``|W_ij * dL/dW_ij|``: the loss change when the weight is zeroed.

    The gradient is the mean over calibration batches of the calibration loss gradient (next-token loss
    for causal LMs; see ``batches.default_loss`` for other models), as LLM-Pruner's element-wise
    first-order score.
    """
    grads = task.gradients()
    return {n: (w.float() * (grads[n].sum / max(grads[n].count, 1))).abs() for n, w in task.weights().items()}


@scorer("fisher", aliases=("empirical_fisher",), **_KW)
def fisher(task: WeightTask, *, saliency: bool = True) -> dict[str, torch.Tensor]:
    """Empirical Fisher: ``F_ij = sum_s (dL_s/dW_ij)^2`` over per-sample (``grad_batch_size``) gradients.

    With ``saliency=True`` (default) the score is the Fisher pruning saliency ``F_ij * W_ij^2 / 2``, the
    second-order estimate of the loss increase when the weight is removed (Optimal Brain Damage with the
    Fisher as Hessian); ``saliency=False`` returns the diagonal ``F_ij`` itself.
    """
    grads = task.gradients(squares=True)
    out = {}
    for n, w in task.weights().items():
        f = grads[n].sumsq
        out[n] = 0.5 * w.float().square() * f if saliency else f.clone()
    return out


@scorer("gradient_wanda", aliases=("gblm",), **_KW)
def gradient_wanda(task: WeightTask, *, alpha: float = 100.0) -> dict[str, torch.Tensor]:
    """Gradient-augmented Wanda, GBLM-Pruner (Das et al., "Beyond Size: How Gradients Shape Pruning
    Decisions in Large Language Models", 2023): ``|W_ij| * (||X_j||_2 + alpha * ||G_ij||_2)``.

    As in the authors' code: ``||X_j||_2 = sqrt(sum over tokens x_j^2 / n_sequences)``; ``G_ij`` stacks the
    per-sequence gradients of the mean next-token loss (``grad_batch_size=1``) and ``||G_ij||_2`` is their
    L2 norm over sequences; ``alpha = 100`` (their ``scale``). The balance of the two terms depends on the
    sequence length (the paper used 128 sequences of 2048 tokens).
    """
    if not alpha >= 0:
        raise MethodError(f"alpha must be a non-negative number, got {alpha!r}")
    acts = task.activations()
    grads = task.gradients(squares=True)
    n_seq = max(task.n_sequences, 1)
    out = {}
    for n, w in task.weights().items():
        x_norm = (acts[n].sumsq / n_seq).sqrt().to(w.device, torch.float32)
        out[n] = w.abs().float() * (x_norm + alpha * grads[n].sumsq.sqrt())
    return out
