"""`ExampleTask`: what a curate scorer of examples gets, built and checked once by ``curate.score``.

It mirrors ``compress.api.WeightTask``: the models to average over (one model, several seeds' models, or the
checkpoints of a :class:`~whatmatters.curate.training.TrainingRun`), the training examples and labels, an
optional test set for influence, and batched helpers (logits, per-sample gradients) every scorer shares.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from whatmatters.core.adapters import row_slices, to_tensor
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.state import parameter_device_dtype
from whatmatters.core.task import as_indices, progress_bar
from whatmatters.curate.training import Checkpoint, ForgettingRecorder, TrainingRun


def check_examples(data: Any, y: Any, name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """Examples as a tensor ``(n, ...)`` and labels as a LongTensor ``(n,)`` (clear errors otherwise)."""
    x, _ = to_tensor(data, name)
    if y is None:
        raise InputError(f"labels are missing: pass y= with one class index per row of {name}")
    labels = as_indices(y.to_numpy() if hasattr(y, "to_numpy") else y, InputError)
    if labels.ndim != 1 or len(labels) != len(x):
        raise InputError(
            f"y has shape {tuple(labels.shape)} but {name} has {len(x)} rows; give one class index per row"
        )
    if bool((labels < 0).any()):
        raise InputError(f"labels must be class indices >= 0, got {int(labels.min())}")
    return x, labels


def check_logits(out: Any, labels: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``out`` must be class logits ``(b, classes)`` with every label a valid class."""
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] < 2 or not out.is_floating_point():
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"{type(model).__name__} returned {shape}; example scores need class logits of shape (n, classes) "
            "with at least 2 classes (wrap the model so that forward returns them)"
        )
    if int(labels.max()) >= out.shape[1]:
        raise InputError(f"label {int(labels.max())} is out of range: the model has {out.shape[1]} classes")
    return out


@dataclass
class ExampleTask:
    """The models, examples, labels and test set of one example-scoring request."""

    models: list[nn.Module]
    inputs: torch.Tensor | None
    y: torch.Tensor | None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    recorders: list[ForgettingRecorder] = field(default_factory=list)
    test_inputs: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    data: Any = None  # the user's data as given (texts for model-free methods)
    seed: int = 0
    batch_size: int = 256
    progress: bool | None = None
    method: str = ""

    @property
    def n(self) -> int:
        return len(self.inputs) if self.inputs is not None else len(self.data)

    def check_models(self) -> None:
        """One small call per model (in the mode it will be scored in): class logits, every label in range."""
        if self.inputs is None:
            return
        for model in {id(m): m for m in [*self.models, *(c.model for c in self.checkpoints)]}.values():
            with torch.no_grad():
                xb, _ = next(self.chunks(self.inputs[:2], self.y[:2], model, "probe"))
                out = check_logits(model(xb), self.y, model)
            if self.test_y is not None and int(self.test_y.max()) >= out.shape[1]:
                raise InputError(f"test label {int(self.test_y.max())} is out of range for the model's classes")

    def need_models(self) -> list[nn.Module]:
        if not self.models:
            raise ModelError(f"{self.method} needs a torch model (or a list of them, or a TrainingRun)")
        return self.models

    def need_checkpoints(self) -> list[Checkpoint]:
        if not self.checkpoints:
            raise ModelError(
                f"{self.method} needs checkpoints saved during training: pass a TrainingRun from "
                "curate.train_models(...) or a list of curate.Checkpoint(model, lr=...)"
            )
        return self.checkpoints

    def need_test(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.test_inputs is None else (self.test_inputs, self.test_y)

    def chunks(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module, what: str) -> Iterator[tuple[Any, Any]]:
        """``(x, y)`` batches of ``batch_size`` rows on the model's device (and dtype, for float inputs)."""
        device, dtype = parameter_device_dtype(model)
        slices = row_slices(len(x), self.batch_size)
        for s in progress_bar(slices, len(slices), what, self.progress):
            xb = x[s].to(device, dtype) if x.is_floating_point() else x[s].to(device)
            yield xb, y[s].to(device)

    def logits(self, model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``(n, classes)`` of ``model`` on the examples (or ``x``), in batches, without gradients."""
        x = self.inputs if x is None else x
        y = self.y if y is None else y
        with torch.no_grad():
            outs = [check_logits(model(xb), yb, model) for xb, yb in self.chunks(x, y, model, "logits")]
        return torch.cat(outs)


def _models_of(model: Any) -> tuple[list[nn.Module], list[Checkpoint], list[ForgettingRecorder]]:
    if model is None:
        return [], [], []
    if isinstance(model, TrainingRun):
        return model.models(), model.checkpoints, model.recorders
    if isinstance(model, ForgettingRecorder):
        return [], [], [model]
    if isinstance(model, nn.Module):
        return [model], [Checkpoint(model)], []
    if isinstance(model, Sequence) and model and all(isinstance(m, Checkpoint) for m in model):
        return [c.model for c in model], list(model), []
    if isinstance(model, Sequence) and model and all(isinstance(m, nn.Module) for m in model):
        return list(model), [Checkpoint(m) for m in model], []
    raise ModelError(
        f"cannot score examples with a {type(model).__name__}: pass a torch nn.Module, a list of them "
        "(models of several seeds), a list of curate.Checkpoint, a curate.TrainingRun or a ForgettingRecorder"
    )


def make_example_task(
    model: Any,
    data: Any,
    y: Any,
    *,
    needs: str,
    test_data: Any = None,
    test_y: Any = None,
    **options: Any,
) -> ExampleTask:
    """Check the model, data and labels once, into an :class:`ExampleTask` (``needs`` is the method's)."""
    models, checkpoints, recorders = _models_of(model)
    inputs = labels = test_inputs = test_labels = None
    if needs == "data":
        if data is None or len(data) == 0:
            raise InputError("data is empty: pass the examples (embeddings or texts) to score")
    elif needs == "training":
        if not recorders:
            raise ModelError(
                f"{options.get('method')} needs a training record: pass a TrainingRun from curate.train_models(...) "
                "or the ForgettingRecorder you called during training"
            )
        if data is not None:
            inputs, labels = check_examples(data, y)
    else:
        inputs, labels = check_examples(data, y)
        if test_data is not None:
            test_inputs, test_labels = check_examples(test_data, test_y, "test_data")
    for r in recorders:
        if inputs is not None and r.n != len(inputs):
            raise InputError(f"the forgetting record covers {r.n} examples but data has {len(inputs)} rows")
    return ExampleTask(models, inputs, labels, checkpoints, recorders, test_inputs, test_labels, data, **options)
