"""``whatmatters.compress.unlearn``: make a causal LM forget a text while keeping the rest, updating only the
weights that matter for it (WAGLE, Jia et al. 2024, arXiv 2410.17509).

Weight attribution (``method="wagle"``): with ``a = -∇ NLL_forget`` (the gradient-ascent direction) and
``b = ∇ NLL_retain`` at the original weights, one unlearning step ``Δθ_i = η a_i`` raises the forget loss by
``η a_i²`` and the retain loss by ``η a_i b_i`` (first order). A weight's score is the forget gain minus
``retain_weight`` times the retain damage, ``a_i (a_i - λ b_i)``: the WAGLE idea (a weight's influence on
the forget set against its influence on the retain set) in its first-order form, without the paper's
Hessian-diagonal constant. The top ``share`` of the selected layers' weights (one global ranking) are then
unlearned; every other parameter stays as it was. Baselines: ``"random"`` (a random mask of the same size)
and ``"full"`` (every weight of the selected layers).

Unlearning losses: ``"grad_diff"`` (gradient difference: ``-NLL_forget + α NLL_retain``) or ``"npo"``
(negative preference optimisation, Zhang et al. 2024: ``-(2/β) log σ(-β (log p_θ - log p_ref))`` per forget
sequence, plus ``α NLL_retain``), optimised with Adam on the masked gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from whatmatters.compress.batches import Batch, as_batches, call_model
from whatmatters.compress.linear import select_layers
from whatmatters.core.actions import Compressed
from whatmatters.core.errors import InputError
from whatmatters.core.fractions import kept_share, whole
from whatmatters.core.state import preserved
from whatmatters.core.task import progress_bar

METHODS = ("wagle", "random", "full")
LOSSES = ("grad_diff", "npo")


@dataclass
class UnlearnReport:
    """What ``unlearn`` did: method, loss, share of weights updated, steps and the loss per step."""

    method: str
    loss: str
    share: float
    n_updated: int
    n_weights: int
    steps: int
    losses: list[float] = field(default_factory=list)


def sequence_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed next-token negative log-likelihood of every sequence of ``batch`` ``(b,)`` (padding left out)."""
    ids = batch.kwargs.get("input_ids", batch.args[0] if batch.args else None)
    logits = call_model(model, batch).logits
    nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    mask = batch.mask
    if mask is not None:
        nll = nll * mask[:, 1:]
    return nll.sum(-1)


def _mean_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    mask = batch.mask
    ids = batch.kwargs.get("input_ids", batch.args[0] if batch.args else None)
    tokens = mask[:, 1:].sum() if mask is not None else ids[:, 1:].numel()
    return sequence_nll(model, batch).sum() / tokens


def _gradients(model: nn.Module, batches: list[Batch], weights: list[nn.Parameter]) -> list[torch.Tensor]:
    total = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        grads = torch.autograd.grad(_mean_nll(model, batch), weights, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t += g / len(batches)
    return total


def wagle_scores(
    model: nn.Module, forget: list[Batch], retain: list[Batch], weights: list[nn.Parameter], retain_weight: float
) -> list[torch.Tensor]:
    """``a (a - λ b)`` per weight (module docstring), ``a = -∇ NLL_forget``, ``b = ∇ NLL_retain``."""
    a = [-g for g in _gradients(model, forget, weights)]
    b = _gradients(model, retain, weights)
    return [ai * (ai - retain_weight * bi) for ai, bi in zip(a, b)]


def _masks(
    scores: list[torch.Tensor] | None, shapes: list[torch.Tensor], share: float, seed: int
) -> list[torch.Tensor]:
    if scores is None:  # random: the same number of weights, uniformly
        g = torch.Generator().manual_seed(seed)
        flat = torch.rand(sum(s.numel() for s in shapes), generator=g)
    else:
        flat = torch.cat([s.reshape(-1).float().cpu() for s in scores])
    k = max(1, round(share * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[flat.topk(k).indices] = True
    return [m.reshape(s.shape).to(s.device) for m, s in zip(chosen.split([s.numel() for s in shapes]), shapes)]


def _check_data(data: Any, name: str, tokenizer: Any, batch_size: int, max_length: int) -> list[Batch]:
    empty = data is None or (hasattr(data, "__len__") and len(data) == 0)
    if empty or (isinstance(data, str) and not data.strip()):
        raise InputError(f"the {name} set is empty; give texts (with tokenizer=) or token ids to {name}=")
    batches = as_batches(data, tokenizer, batch_size=batch_size, max_length=max_length)
    for b in batches:
        ids = b.kwargs.get("input_ids", b.args[0] if b.args else None)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.ndim != 2 or ids.shape[1] < 2:
            raise InputError(f"{name} must be texts or token ids (n, seq_len >= 2) of a causal LM")
    return batches


def unlearn(
    model: nn.Module,
    *,
    forget: Any,
    retain: Any,
    tokenizer: Any = None,
    method: str = "wagle",
    share: float = 0.05,
    loss: str = "grad_diff",
    steps: int = 20,
    lr: float = 1e-4,
    retain_weight: float = 1.0,
    beta: float = 0.1,
    layers: str | Sequence[str] | None = None,
    batch_size: int = 4,
    max_length: int = 128,
    seed: int = 0,
    progress: bool | None = None,
) -> Compressed:
    """A copy of a causal LM that has unlearned ``forget`` while keeping ``retain`` (``model`` is untouched).

    Args:
        forget, retain: texts (with ``tokenizer``) or token ids ``(n, seq_len)``; neither may be empty.
        method: ``"wagle"`` (attributed weights), ``"random"`` (a random mask of the same size) or ``"full"``.
        share: share of the selected layers' weights updated (``wagle`` and ``random``), in ``(0, 1]``.
        loss: ``"grad_diff"`` or ``"npo"``; ``retain_weight`` is ``α`` (and ``λ`` in the WAGLE score),
            ``beta`` NPO's temperature.
        steps, lr: Adam steps over the forget batches (one forget and one retain batch per step) and rate.
        layers: regular expression(s) of the linear layers that may change (default: all but output heads).

    Returns:
        ``Compressed(model, UnlearnReport)``.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {LOSSES}, got {loss!r}")
    share = 1.0 if method == "full" else kept_share(share, name="share")
    if share == 0:
        raise InputError("share=0 would update no weight; give a share in (0, 1]")
    steps = whole(steps, "steps", meaning="unlearning steps")
    for name, v in (("lr", lr), ("retain_weight", retain_weight), ("beta", beta)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < float("inf"):
            raise InputError(f"{name} must be a finite number >= 0, got {v!r}")
    forget_b = _check_data(forget, "forget", tokenizer, batch_size, max_length)
    retain_b = _check_data(retain, "retain", tokenizer, batch_size, max_length)
    new = copy.deepcopy(model)
    weights = [m.weight for m in select_layers(new, layers).values()]
    with preserved(model):
        for p in new.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        new.eval()  # no dropout: the attribution and the updates see the same function
        scores = wagle_scores(new, forget_b, retain_b, weights, retain_weight) if method == "wagle" else None
        masks = [torch.ones_like(w, dtype=torch.bool) for w in weights] if method == "full" else None
        masks = masks or _masks(scores, weights, share, seed)
        with torch.no_grad():
            ref = [sequence_nll(model, b) for b in forget_b] if loss == "npo" else []
        losses = _optimise(new, weights, masks, forget_b, retain_b, ref, loss, steps, lr, retain_weight, beta, progress)
    for p, old in zip(new.parameters(), model.parameters()):
        p.requires_grad_(old.requires_grad)
    new.train(model.training)
    n_updated = int(sum(m.sum() for m in masks))
    report = UnlearnReport(method, loss, share, n_updated, sum(w.numel() for w in weights), steps, losses)
    return Compressed(new, report)


def _optimise(
    model: nn.Module,
    weights: list[nn.Parameter],
    masks: list[torch.Tensor],
    forget: list[Batch],
    retain: list[Batch],
    ref: list[torch.Tensor],
    loss: str,
    steps: int,
    lr: float,
    alpha: float,
    beta: float,
    progress: bool | None,
) -> list[float]:
    opt = torch.optim.Adam(weights, lr=lr)
    history = []
    for step in progress_bar(range(steps), steps, "unlearning", progress):
        i = step % len(forget)
        f, r = forget[i], retain[step % len(retain)]
        if loss == "npo":
            ratio = sequence_nll(model, f) - ref[i]  # -(log p_θ - log p_ref)
            forget_loss = -(2 / beta) * nn.functional.logsigmoid(beta * ratio).mean()
        else:
            forget_loss = -_mean_nll(model, f)
        total = forget_loss + alpha * _mean_nll(model, r)
        opt.zero_grad()
        total.backward()
        for w, m in zip(weights, masks):
            w.grad.mul_(m)
        opt.step()
        history.append(float(total.detach()))
    return history
