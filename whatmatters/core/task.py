"""`Task`: what a scorer is asked to explain, and the batched model calls every scorer shares."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from whatmatters.core.adapters import Model, TorchModel, _batches
from whatmatters.core.errors import InputError, ModelError, TargetError, WhatMattersError

T = TypeVar("T")


def progress_bar(items: Iterable[T], total: int, description: str, enabled: bool | None) -> Iterator[T]:
    """A rich progress bar over ``items`` when ``enabled`` (None: only on a terminal and long work)."""
    if enabled is None:
        enabled = sys.stderr.isatty() and total > 20
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, total=total, description=description, transient=True)


@dataclass
class Task:
    """Inputs, targets and model of one explanation request.

    ``inputs`` has shape ``(n, *unit_shape)``; ``target`` holds one output index per sample.
    ``background`` (optional) is reference data for baselines and maskers.
    """

    model: Model
    inputs: torch.Tensor
    target: torch.Tensor
    background: torch.Tensor | None = None
    y: torch.Tensor | None = None
    names: list[str] | None = None
    seed: int = 0
    batch_size: int | None = None
    progress: bool | None = None

    @property
    def n(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    @property
    def torch_model(self) -> TorchModel:
        if not isinstance(self.model, TorchModel):
            raise ModelError("this method needs a PyTorch nn.Module")
        return self.model

    def score(
        self, x: torch.Tensor, description: str = "model calls", target: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Target outputs for perturbed copies of every sample.

        ``x`` has shape ``(n, m, *unit_shape)``: ``m`` variants of each of the ``n`` samples. Returns
        ``(n, m)``: for every variant, the model output at its sample's target (``target``, one per
        row of ``x``, defaults to the task's). Rows go to the model in batches of the batch size.
        """
        n, m = x.shape[:2]
        flat = x.reshape(n * m, *x.shape[2:])
        rows = (self.target if target is None else target).to(torch.long).repeat_interleave(m)
        size = self.rows_per_call(flat)
        chunks = _batches(len(flat), size)
        outs = []
        for s in progress_bar(chunks, len(chunks), description, self.progress):
            out = self.model.predict(flat[s], batch_size=size)
            outs.append(out.gather(1, rows[s].to(out.device).unsqueeze(1)).squeeze(1))
        return torch.cat(outs).reshape(n, m)

    def rows_per_call(self, x: torch.Tensor | None = None) -> int:
        """Rows per model call: the task's ``batch_size``, else the model's choice for rows like ``x``."""
        return self.batch_size or self.model.rows_per_call(self.inputs if x is None else x)

    def forward_target(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable target outputs ``(len(x),)`` of a torch model (targets default to the task's)."""
        model = self.torch_model
        out = model.forward(x)
        tgt = (self.target if target is None else target).to(out.device, torch.long)
        return out.gather(1, tgt.unsqueeze(1)).squeeze(1)


def as_indices(target: Any, error: type[WhatMattersError] = TargetError) -> torch.Tensor:
    """``target`` (an int, a sequence or a tensor of integers) as a CPU LongTensor of the same shape.

    Raises ``error`` for booleans, complex numbers, non-integral or non-finite floats (Python floats are
    checked in float64, so ``1e-300`` is not rounded to 0) and values that overflow int64.
    """
    message = f"target must be an int index or one int per sample, got {target!r}"
    try:
        if isinstance(target, torch.Tensor):
            t = target.detach().cpu()
        else:
            t = torch.as_tensor(target)
            if t.is_floating_point():
                t = torch.as_tensor(target, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise error(message) from None
    if t.dtype == torch.bool or t.is_complex():
        raise error(message)
    if t.is_floating_point() and not bool((t == t.round()).all() and t.isfinite().all() and (t.abs() < 2**63).all()):
        raise error(f"target must be indices (integers), got {target!r}")
    return t.to(torch.long)


def resolve_target(target: Any, model: Model, inputs: torch.Tensor) -> torch.Tensor:
    """One output index per sample: given, or the predicted class (argmax) when ``target`` is None."""
    n_out = probe(model, inputs)
    n = inputs.shape[0]
    if target is None:
        if n_out == 1:
            return torch.zeros(n, dtype=torch.long)
        return model.predict(inputs).argmax(1).cpu()
    tgt = as_indices(target)
    if tgt.ndim == 0:
        tgt = tgt.expand(n).clone()
    if tgt.shape != (n,):
        raise TargetError(f"target has shape {tuple(tgt.shape)}; give one int or one per sample ({n})")
    if bool((tgt < 0).any()) or bool((tgt >= n_out).any()):
        bad = int(tgt[(tgt < 0) | (tgt >= n_out)][0])
        raise TargetError(f"target {bad} is out of range: the model has {n_out} output(s), indices 0..{n_out - 1}")
    return tgt


def probe(model: Model, inputs: torch.Tensor) -> int:
    """Number of model outputs, from one row; a failure becomes an error that names the input shape."""
    expected = getattr(getattr(model, "estimator", None), "n_features_in_", None)
    if expected is not None and inputs.ndim == 2 and inputs.shape[1] != expected:
        raise InputError(f"data has {inputs.shape[1]} columns but the model was fitted on {expected} features")
    try:
        return model.n_outputs(inputs)
    except (InputError, ModelError, TargetError):
        raise
    except Exception as err:  # the model's own error, re-raised with the shape that caused it
        raise InputError(
            f"the model failed on an input of shape {tuple(inputs[:1].shape)}: {type(err).__name__}: {err}. "
            "Check that the data has the columns / channels / size the model expects."
        ) from err


def infer_unit(inputs: torch.Tensor) -> str:
    if inputs.ndim == 2:
        return "feature" if inputs.is_floating_point() else "token"
    if inputs.ndim in (3, 4):
        return "pixel"
    raise InputError(
        f"cannot tell what units an input of shape {tuple(inputs.shape)} has: give (n, features), "
        "(n, channels, height, width) or (n, tokens)"
    )


def check_params(method_name: str, given: dict[str, Any], accepted: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        from whatmatters.core.errors import MethodError

        raise MethodError(f"{method_name} got unknown parameter(s) {unknown}; it accepts {sorted(accepted) or 'none'}")
