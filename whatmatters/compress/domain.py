"""Domain-aware weight importance: D-Pruner (Zhang et al., "Pruning as a Domain-specific LLM Extractor", 2024).

D-Pruner keeps the weights that matter for a target domain *and* those that matter for general ability.
Each weight's importance on a corpus is the loss increase when it is zeroed, by a second-order Taylor
expansion with the empirical Fisher as Hessian::

    I_m = | -g_m w_m + 1/2 F_m w_m^2 |      g = mean gradient, F = mean squared per-sample gradient

The general importance ``G`` is measured on open-domain text (``general=``). D-Pruner then trains on the
domain text (``data=``) with a loss regularised towards the weights that ``G`` marks as general; the dual score
is the importance under that regularised objective. Here the objective is ``L_domain + λ L_general`` and its
removal cost is evaluated in closed form at the dense weights, ``I_domain + λ G``: the general term is the
regulariser's value when the weight is removed (a Fisher-weighted penalty ``λ/2 F_m w_m^2`` is the general loss
increase to second order). The authors' code instead accumulates the regularised gradients along a few
optimiser steps on the domain set; whatmatters scores the dense model only and changes no weight.
"""

from __future__ import annotations

import torch

from whatmatters.compress.api import GENERAL_DATA, WeightTask
from whatmatters.compress.calibrate import Calibration, GradientStats
from whatmatters.core import hf
from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.registry import scorer


def removal_loss(weight: torch.Tensor, grads: GradientStats) -> torch.Tensor:
    """``|-g w + 1/2 F w^2|``: the second-order (Fisher) estimate of the loss change when ``weight`` is zeroed."""
    count = max(grads.count, 1)
    w = weight.float()
    mean_grad = grads.sum / count
    fisher = grads.sumsq / count
    return (-mean_grad * w + 0.5 * fisher * w.square()).abs()


def _check_tokens(cal: Calibration, vocab: int | None, name: str) -> None:
    if vocab is None:
        return
    for b in cal.batches:
        ids = b.kwargs.get("input_ids", b.args[0] if b.args else None)
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.numel() and int(ids.max()) >= vocab:
            raise InputError(
                f"the {name} data holds token id {int(ids.max())} but the model's vocabulary has {vocab} tokens: "
                "it was tokenized for another model; tokenize both corpora with this model's tokenizer"
            )


def _corpus_importance(task: WeightTask, cal: Calibration) -> dict[str, torch.Tensor]:
    cal.need(gradient_sum=True, gradient_sumsq=True)
    return {n: removal_loss(w, cal.gradients[n]) for n, w in task.weights().items()}


@scorer(
    "d_pruner", aliases=("dpruner",), verb="compress", units="weight", family="weight", needs="module", per_sample=False
)
def d_pruner(task: WeightTask, *, general_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """D-Pruner dual importance ``I_domain + general_weight * I_general`` (module docstring).

    ``data=`` is the domain corpus, ``general=`` open-domain text; both need per-sample gradients
    (``grad_batch_size``). ``general_weight=0`` scores the domain alone (the second-order Fisher/Taylor
    removal cost on ``data``).
    """
    if not general_weight >= 0:
        raise MethodError(f"general_weight must be a non-negative number, got {general_weight!r}")
    if task.calibration is None:
        raise InputError("d_pruner needs the domain corpus as data= (texts with tokenizer=, or token ids)")
    if task.general is None:
        raise InputError(
            "d_pruner needs open-domain calibration text as general= (texts with tokenizer=, or token ids)"
        )
    vocab = hf.vocab_size(task.model)
    _check_tokens(task.calibration, vocab, "domain (data=)")
    _check_tokens(task.general, vocab, "general")
    domain = _corpus_importance(task, task.calibration)
    general = _corpus_importance(task, task.general)
    return {n: domain[n] + general_weight * general[n] for n in domain}


GENERAL_DATA.add("d_pruner")
