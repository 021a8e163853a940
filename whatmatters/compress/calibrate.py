"""Calibration: run a model over a few batches and reduce what the weight scores need, on the fly.

Forward hooks on every selected ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's transposed linear)
reduce each layer's input activations per input channel as they pass: token count, sum, sum of squares
and the centred sum of squares (a running mean / variance, merged batch by batch with Chan's formula).
Activations are never stored, so memory is the model's own forward pass plus ``O(in_features)`` per
layer. Gradient statistics (sum and sum of squares of per-sample weight gradients) take the size of the
selected weights once or twice; they are only computed for the scores that need them.

Padding tokens (``attention_mask == 0``) are left out of every statistic and of the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from whatmatters.compress.batches import Batch, as_batches, call_model, default_loss
from whatmatters.compress.linear import is_transposed, select_layers, weight_matrix
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.state import hooks, parameter_device_dtype, preserved
from whatmatters.core.task import progress_bar

LossFn = Callable[[Any, Any, Any], torch.Tensor]


# ------------------------------------------------------------- statistics
@dataclass
class ActivationStats:
    """Per-input-channel statistics of one layer's inputs over all calibration tokens (float64)."""

    count: float
    sum: torch.Tensor
    sumsq: torch.Tensor
    m2: torch.Tensor  # centred sum of squares

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1.0)

    @property
    def var(self) -> torch.Tensor:
        """Population variance of each input channel."""
        return self.m2 / max(self.count, 1.0)

    @property
    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` over all calibration tokens."""
        return self.sumsq.sqrt()


@dataclass
class GradientStats:
    """Sum and sum of squares of per-batch weight gradients ``(out, in)`` over ``count`` batches."""

    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor | None


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer input as float rows ``(tokens, features)``, padding tokens (``mask`` False) left out."""
    x = x.detach()
    if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
        x = x[mask]
    return x.reshape(-1, x.shape[-1]).float()


class _Reducer:
    """Forward hook state of one layer: reduces its inputs per channel, batch by batch."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        self.count = 0.0
        self.sum = torch.zeros(in_features, dtype=dtype, device=device)
        self.sumsq = torch.zeros_like(self.sum)
        self.m2 = torch.zeros_like(self.sum)
        self.mask: torch.Tensor | None = None

    def __call__(self, _module: nn.Module, inputs: tuple, _output: Any) -> None:
        x = token_rows(inputs[0], self.mask)
        n = x.shape[0]
        if n == 0:
            return
        s = x.sum(0).to(self.sum.dtype)
        mean_b = s / n
        m2_b = (x - mean_b.to(x.dtype)).square().sum(0).to(self.sum.dtype)
        total = self.count + n
        delta = mean_b - self.sum / max(self.count, 1.0)
        self.m2 += m2_b + delta.square() * (self.count * n / total)
        self.sum += s
        self.sumsq += x.square().sum(0).to(self.sum.dtype)
        self.count = total

    def stats(self) -> ActivationStats:
        return ActivationStats(self.count, self.sum, self.sumsq, self.m2)


# ------------------------------------------------------------- calibration
class Calibration:
    """Calibration statistics of one model's layers, computed on first use and kept for reuse.

    Build it with :func:`calibrate` and pass it as ``data=`` to several ``score`` calls: activations
    and gradients are then computed once for all of them.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[Batch],
        layers: Mapping[str, nn.Module],
        *,
        loss: LossFn | None = None,
        grad_batch_size: int = 1,
        progress: bool | None = None,
    ) -> None:
        if grad_batch_size < 1:
            raise InputError(f"grad_batch_size must be at least 1, got {grad_batch_size}")
        self.model = model
        self.batches = batches
        self.layers = dict(layers)
        self.loss = loss
        self.grad_batch_size = grad_batch_size
        self.progress = progress
        self.activations: dict[str, ActivationStats] = {}
        self.gradients: dict[str, GradientStats] = {}
        self.n_sequences = sum(b.size for b in batches)
        self.mean_loss: float | None = None

    def __repr__(self) -> str:
        have = [k for k, v in (("activations", self.activations), ("gradients", self.gradients)) if v]
        return (
            f"Calibration({len(self.batches)} batches, {self.n_sequences} sequences, {len(self.layers)} layers, "
            f"computed: {', '.join(have) or 'nothing yet'})"
        )

    def check_model(self, model: nn.Module, names: Iterable[str]) -> None:
        if model is not self.model:
            raise InputError("this Calibration was computed for another model; calibrate the model being scored")
        missing = [n for n in names if n not in self.layers]
        if missing:
            raise InputError(f"this Calibration does not cover layers {missing[:3]}; calibrate with layers=None")

    def need(self, *, activations: bool = False, gradient_sum: bool = False, gradient_sumsq: bool = False) -> None:
        """Compute what is missing: activation statistics and/or gradient sums (and squares)."""
        want_act = activations and not self.activations
        have_sumsq = bool(self.gradients) and next(iter(self.gradients.values())).sumsq is not None
        want_grad = (gradient_sum and not self.gradients) or (gradient_sumsq and not have_sumsq)
        if want_act or want_grad:
            self._run(want_act, want_grad, squares=gradient_sumsq or have_sumsq)

    def _run(self, activations: bool, gradients: bool, squares: bool) -> None:
        model = self.model
        device, _ = parameter_device_dtype(model)
        reducers = {n: _Reducer(weight_matrix(m).shape[1], device) for n, m in self.layers.items()}
        weights = {n: m.weight for n, m in self.layers.items()}
        shapes = {n: weight_matrix(m).shape for n, m in self.layers.items()} if gradients else {}
        grad_sum = {n: torch.zeros(shape, device=device) for n, shape in shapes.items()}
        grad_sq = {n: torch.zeros(shape, device=device) for n, shape in shapes.items()} if squares else {}
        handles = [m.register_forward_hook(reducers[n]) for n, m in self.layers.items()] if activations else []
        # Per-sample gradients when their squares are needed (empirical Fisher); whole batches otherwise.
        step = self.grad_batch_size if squares else 1 << 30
        count, losses = 0, []
        with preserved(model), hooks(*handles):
            model.eval()
            if gradients:
                for p in model.parameters():
                    p.requires_grad_(False)
                for w in weights.values():
                    w.requires_grad_(True)
            total = len(self.batches)
            for batch in progress_bar(self.batches, total, "calibrating", self.progress):
                batch = batch.to(device)
                if not gradients:
                    for r in reducers.values():
                        r.mask = batch.mask
                    with torch.no_grad():
                        call_model(model, batch)
                    continue
                for part in batch.split(step):
                    for r in reducers.values():
                        r.mask = part.mask
                    with torch.enable_grad():
                        output = call_model(model, part)
                        loss = self.loss(output, part.kwargs or part.args[0], part.labels) if self.loss else None
                        loss = default_loss(model, output, part) if loss is None else loss
                        if not torch.is_tensor(loss) or loss.numel() != 1:
                            raise ModelError("the calibration loss must be a scalar tensor")
                        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                    losses.append(float(loss.detach()))
                    count += 1
                    for (name, m), g in zip(self.layers.items(), grads):
                        if g is None:
                            continue  # the layer was not used by this input
                        g = g.detach().float()
                        g = g.t() if is_transposed(m) else g
                        grad_sum[name] += g
                        if squares:
                            grad_sq[name] += g.square()
        if activations:
            self.activations = {n: r.stats() for n, r in reducers.items()}
        if gradients:
            self.gradients = {n: GradientStats(count, grad_sum[n], grad_sq.get(n)) for n in self.layers}
            self.mean_loss = sum(losses) / max(len(losses), 1)


def calibrate(
    model: nn.Module,
    data: Any,
    tokenizer: Any = None,
    *,
    layers: str | Sequence[str] | None = None,
    activations: bool = True,
    gradients: bool | str = False,
    loss: LossFn | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    grad_batch_size: int = 1,
    progress: bool | None = None,
) -> Calibration:
    """Calibration statistics for ``model`` on ``data``, to pass as ``data=`` to several scores.

    Args:
        data: calibration texts (with ``tokenizer``), token id / input tensors, dicts or a DataLoader
            (see :func:`as_batches`); for LMs :func:`lm_windows` makes Wanda-style random windows.
        layers: regex(es) selecting layers (default: every linear layer but output heads).
        activations: reduce input activations now (Wanda, gradient Wanda, FLAP need them).
        gradients: ``"sum"`` (Taylor), ``"sumsq"`` or ``True`` (Fisher, gradient Wanda: sum and squares of
            per-sample gradients), ``False``: none now (computed later when a score needs them).
        loss: ``loss(output, inputs, labels) -> scalar``; default :func:`default_loss`.
        grad_batch_size: rows per gradient when squares are taken (1 = per-sample empirical Fisher).
    """
    if gradients not in (False, True, "sum", "sumsq"):
        raise InputError(f"gradients must be False, True, 'sum' or 'sumsq', got {gradients!r}")
    chosen = select_layers(model, layers)
    if isinstance(data, Calibration):
        raise InputError("data is already a Calibration")
    cal = Calibration(
        model,
        as_batches(data, tokenizer, batch_size=batch_size, max_length=max_length),
        chosen,
        loss=loss,
        grad_batch_size=grad_batch_size,
        progress=progress,
    )
    cal.need(activations=activations, gradient_sum=bool(gradients), gradient_sumsq=gradients in (True, "sumsq"))
    return cal
