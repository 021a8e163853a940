"""`Task`: what a scorer is asked to explain, and the batched model calls every scorer shares."""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import nn

from whatmatters.core.adapters import Model, TorchModel, row_slices, to_tensor, wrap
from whatmatters.core.errors import InputError, MethodError, ModelError, TargetError, WhatMattersError
from whatmatters.core.params import (
    INT64,
    all_finite,
    check_params,  # noqa: F401  (re-exported: older imports read it from here)
)
from whatmatters.core.state import preserved, require_eval

T = TypeVar("T")


def progress_bar(items: Iterable[T], total: int, description: str, enabled: bool | None) -> Iterator[T]:
    """A rich progress bar over ``items`` when ``enabled`` (None: only on a terminal and long work)."""
    if enabled is None:
        enabled = total > 20 and sys.stderr.isatty()
    if not enabled:
        return iter(items)
    from rich.progress import track

    return iter(track(items, total=total, description=description, transient=True))


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
    n_outputs: int | None = None  # the model's output count: found by make_task, or (None) at the first forward
    predict: bool = False  # target=None for a method that predicts it: rows of target -1 are chosen by targets_for

    @property
    def n(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    @property
    def unit(self) -> str:
        """What the inputs' elements are: ``feature``, ``pixel`` or ``token``."""
        return infer_unit(self.inputs)

    def with_target(self, target: Any) -> Task:
        """This task for another target (``None`` keeps the task's); no model call when the output count is known."""
        if target is None:
            return self
        tgt = resolve_target(target, self.model, self.inputs, n_outputs=self.n_outputs)
        return replace(self, target=tgt)

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
        chunks = row_slices(len(flat), size)
        outs = []
        for s in progress_bar(chunks, len(chunks), description, self.progress):
            out = self.model.predict(flat[s], batch_size=size)
            outs.append(out.gather(1, rows[s].to(out.device).unsqueeze(1)).squeeze(1))
        return torch.cat(outs).reshape(n, m)

    def rows_per_call(self, x: torch.Tensor | None = None) -> int:
        """Rows per model call: the task's ``batch_size``, else the model's choice for rows like ``x``."""
        return self.batch_size or self.model.rows_per_call(self.inputs if x is None else x)

    def forward_target(
        self, x: torch.Tensor, target: torch.Tensor | None = None, rows: slice | None = None
    ) -> torch.Tensor:
        """Differentiable target outputs ``(len(x),)`` of a torch model (targets default to the task's).

        ``rows``: ``x`` holds the samples ``task.inputs[rows]`` themselves, so their target may be chosen here
        (:meth:`targets_for`).
        """
        model = self.torch_model
        out = model.forward(x)
        tgt = self.targets_for(out, self.target if target is None else target, rows)
        if tgt.is_inference():  # made under torch.inference_mode: gather saves it for the backward
            tgt = tgt.clone()
        return out.gather(1, tgt.unsqueeze(1)).squeeze(1)

    def targets_for(self, out: torch.Tensor, target: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """The target of each row of ``out`` (the method's outputs), after :meth:`check_first_outputs`.

        A task that predicts its target (``predict``) takes, for the samples ``rows`` (``out`` is their
        own outputs), the predicted class (argmax; 0 for one output) and stores it in ``task.target``.
        """
        self.check_first_outputs(out)
        if not self.predict:
            return target.to(out.device, torch.long)
        if rows is None:  # rows made from the samples (paths, perturbations) cannot choose their targets
            if bool((target < 0).any()):
                raise ModelError("internal error: a target was read before the samples' own forward chose it")
            return target.to(out.device, torch.long)
        if not all_finite(out):
            check_outputs(self.model.predict(self.inputs))  # names the samples whose outputs are not finite
        chosen = out.detach().argmax(1) if out.shape[1] > 1 else torch.zeros(len(out), dtype=torch.long)
        self.target[rows] = chosen.cpu()
        return chosen.to(out.device)

    def outputs_at_targets(self, out: torch.Tensor, sample_of: torch.Tensor, own: slice | None = None) -> torch.Tensor:
        """``(len(out),)``: each row of the method's outputs ``out`` at the target of its sample ``sample_of[j]``,
        after :meth:`check_first_outputs` of every row.

        ``own``: the first rows of ``out`` are the samples ``task.inputs[own]`` themselves; they choose their
        undecided targets (:meth:`targets_for`) before any row reads them.
        """
        self.check_first_outputs(out)
        if own is not None and own.stop > own.start:
            self.targets_for(out[: own.stop - own.start], self.target[own], own)
        tgt = self.targets_for(out, self.target[sample_of], None)
        return out.gather(1, tgt.unsqueeze(1)).squeeze(1)

    def undecided(self) -> bool:
        """Whether some sample's target is still to be chosen by the method's forward (``predict``)."""
        return self.predict and bool((self.target < 0).any())

    def choose_targets(self) -> None:
        """Choose every undecided target now, by one prediction (for a path that runs no forward of its own)."""
        if self.undecided():
            self.target = resolve_target(None, self.model, self.inputs)
            self.n_outputs = self.model.n_outputs(self.inputs)

    def predicted(self) -> None:
        """Every target chosen (a method flagged ``predicts_target`` that left one undecided is a bug)."""
        if self.undecided():
            raise ModelError("internal error: the method did not choose every sample's target; please report it")

    def check_first_outputs(self, outputs: torch.Tensor) -> None:
        """For a task made without a probe row (``n_outputs`` None): the method's own first outputs must be
        finite and have the target among them (``TargetError`` otherwise); then the output count is known."""
        if self.n_outputs is not None:
            return
        if not all_finite(outputs):
            check_outputs(self.model.predict(self.inputs))  # names the samples that fail (on the way to an error)
            raise ModelError(
                "the model returned NaN or infinite outputs for inputs the method made from the samples "
                "(baselines, perturbed or interpolated rows), not for the samples themselves; choose another baseline"
            )
        if int(self.target.max()) >= outputs.shape[1]:  # the target was checked for all else when the task was made
            checked_target(self.target, self.n, int(outputs.shape[1]))
        self.n_outputs = int(outputs.shape[1])


def as_indices(target: Any, error: type[WhatMattersError] = TargetError) -> torch.Tensor:
    """``target`` (an int, a sequence or a tensor of integers) as a CPU LongTensor of the same shape.

    Raises ``error`` for booleans, complex numbers, non-integral or non-finite floats (Python floats are
    checked in float64, so ``1e-300`` is not rounded to 0) and values that overflow int64.
    """

    def refused() -> WhatMattersError:  # built only on error: a tensor's repr costs more than the check
        return error(f"target must be an int index or one int per sample, got {target!r}")

    try:
        if isinstance(target, torch.Tensor):
            t = target.detach().cpu()
        else:
            t = torch.as_tensor(target)
            if t.is_floating_point():
                t = torch.as_tensor(target, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise refused() from None
    if t.dtype == torch.bool or t.is_complex():
        raise refused()
    if t.is_floating_point() and not bool((t == t.round()).all() and t.isfinite().all() and (t.abs() < 2**63).all()):
        raise error(f"target must be indices (integers), got {target!r}")
    return t.to(torch.long)


def resolve_target(target: Any, model: Model, inputs: torch.Tensor, *, n_outputs: int | None = None) -> torch.Tensor:
    """One output index per sample: given (checked against the output count, from one probe row when not
    known), or the predicted class (argmax) when ``target`` is None: one prediction of all rows, which also
    gives the output count (no probe row)."""
    n = inputs.shape[0]
    if target is None:
        if n_outputs == 1:
            return torch.zeros(n, dtype=torch.long)
        outputs = _calling_model(model, inputs, lambda: model.predict(inputs))
        check_outputs(outputs)
        model.known_outputs(int(outputs.shape[1]))
        return outputs.argmax(1).cpu()
    n_out = probe(model, inputs) if n_outputs is None else n_outputs
    return checked_target(target, n, n_out)


def checked_target(target: Any, n: int, n_outputs: int | None) -> torch.Tensor:
    """``target`` as ``n`` output indices: one int (for every sample) or one per sample, non-negative, and
    below ``n_outputs`` when it is known (None: checked later against the method's own outputs)."""
    if isinstance(target, numbers.Integral) and not isinstance(target, bool) and -INT64 <= target < INT64:
        top = n_outputs if n_outputs is not None else INT64
        if not 0 <= target < top:  # one int: checked as a number (no tensor, no sync)
            return checked_target(torch.tensor([int(target)]), 1, n_outputs)  # raises the message below
        return torch.full((n,), int(target), dtype=torch.long)
    tgt = as_indices(target)
    if tgt.ndim == 0:
        tgt = tgt.expand(n).clone()
    if tgt.shape != (n,):
        raise TargetError(f"target has shape {tuple(tgt.shape)}; give one int or one per sample ({n})")
    top = n_outputs if n_outputs is not None else 2**63 - 1
    if bool((tgt < 0).any()) or bool((tgt >= top).any()):
        bad = int(tgt[(tgt < 0) | (tgt >= top)][0])
        if n_outputs is None:
            raise TargetError(f"target {bad} is out of range: output indices are 0 or more")
        raise TargetError(f"target {bad} is out of range: the model has {top} output(s), indices 0..{top - 1}")
    return tgt


def check_outputs(outputs: torch.Tensor) -> None:
    """Model outputs of the samples, one row each, must be finite: else ``ModelError`` naming how many rows are not."""
    if all_finite(outputs):
        return
    finite = torch.isfinite(outputs)
    rows = (~finite.reshape(len(outputs), -1).all(1)).nonzero().flatten().tolist()
    shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
    raise ModelError(
        f"the model returned NaN or infinite outputs for {len(rows)} of {len(outputs)} samples (rows {shown}); "
        "no importance can be computed from them. Check the model on those rows (a log or division by zero, "
        "an overflow, missing values it cannot handle) or leave the rows out"
    )


def probe(model: Model, inputs: torch.Tensor) -> int:
    """Number of model outputs, from one row; a failure becomes an error that names the input shape.

    The row's outputs must be finite; when they are not, the samples are predicted to name how many fail.
    """

    def first_row() -> int:
        first = model.probe(inputs)
        if first is not None and not all_finite(first):  # count the failing rows, then fail
            check_outputs(model.predict(inputs))  # the only extra call, on the way to an error
            check_outputs(first)  # (a model that is not deterministic: the probe row alone)
        return model.n_outputs(inputs)

    return _calling_model(model, inputs, first_row)


def _calling_model(model: Model, inputs: torch.Tensor, call: Callable[[], T]) -> T:
    """``call()`` (a model call on ``inputs``); the model's own failure becomes an error naming the input shape."""
    expected = getattr(getattr(model, "estimator", None), "n_features_in_", None)
    if expected is not None and inputs.ndim == 2 and inputs.shape[1] != expected:
        raise InputError(f"data has {inputs.shape[1]} columns but the model was fitted on {expected} features")
    try:
        return call()
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


def check_units(inputs: torch.Tensor, method: tuple[str, Sequence[str]] | None) -> None:
    """The inputs have a unit (and, given ``(name, units)``, one that the method scores)."""
    unit = infer_unit(inputs)
    if method is not None and unit not in method[1]:
        name, units = method
        raise MethodError(f"{name} scores {', '.join(units)}, not {unit}s (data of shape {tuple(inputs.shape)})")


def torch_module(model: Any) -> nn.Module | None:
    """The ``nn.Module`` behind ``model`` (a module or a torch adapter), or None for other models."""
    module = model.module if isinstance(model, TorchModel) else model
    return module if isinstance(module, nn.Module) else None


def guarded(model: Any, allow_train_mode: bool = False) -> AbstractContextManager[Any]:
    """A torch model is refused in training mode and left exactly as it was; other models pass through."""
    module = torch_module(model)
    if module is None:
        return nullcontext()
    require_eval(module, allow_train_mode)
    return preserved(module)


def _check_int(value: Any, name: str, *, positive: bool) -> int | None:
    if value is None and positive:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (positive and value < 1):
        what = "a positive int (rows per model call)" if positive else "an int"
        raise InputError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _listed(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def _column_mismatch(names: list[str], fitted: list[str], what: str) -> InputError:
    """The error for named columns that are not the model's features (missing, unknown or repeated ones)."""
    missing = [n for n in fitted if n not in names]
    unknown = [n for n in names if n not in fitted]
    repeated = sorted({n for n in names if names.count(n) > 1})
    problems = {"missing": missing, "unknown": unknown, "repeated": repeated}
    found = ", ".join(f"{label} {_listed(cols)}" for label, cols in problems.items() if cols)
    if len(names) != len(fitted):
        head = f"{what} has {len(names)} columns but the model was fitted on {len(fitted)} features"
    else:
        head = f"the columns of {what} are not the features the model was fitted on"
    return InputError(
        f"{head}: {found}. Columns are matched by name: give each of {_listed(fitted)} once "
        "(in any order); rename or drop the others"
    )


def align_columns(
    inputs: torch.Tensor, names: list[str] | None, model: Model, what: str = "data"
) -> tuple[torch.Tensor, list[str] | None, list[int] | None]:
    """``inputs`` with its columns in the order of the features ``model`` was fitted on, their names, the order.

    A model that knows its feature names (scikit-learn's ``feature_names_in_``) reads named columns by name,
    as scikit-learn reads a DataFrame: the same names in another order are reordered (``order[j]`` is the
    column that holds feature ``j``; None when nothing moved), missing, unknown or repeated ones refused.
    Unnamed columns are read by position and take the model's names.
    """
    fitted = getattr(model, "feature_names", None)
    if fitted is None or inputs.ndim != 2:
        return inputs, names, None
    fitted = list(fitted)
    if names is None:
        return inputs, (fitted if inputs.shape[1] == len(fitted) else None), None
    if names == fitted:
        return inputs, names, None
    if sorted(names) != sorted(fitted) or len(set(names)) != len(names):
        raise _column_mismatch(names, fitted, what)
    order = [names.index(n) for n in fitted]
    return inputs[:, order], fitted, order


def _background(background: Any, model: Model, order: list[int] | None) -> torch.Tensor | None:
    """The background as a tensor: a frame's columns matched to the model's by name, an array's columns
    read as the data's (and moved as the data's were)."""
    if background is None:
        return None
    bg, names = to_tensor(background, "background")
    if names is not None:
        return align_columns(bg, names, model, "background")[0]
    return bg[:, order] if order is not None and bg.ndim == 2 else bg


def make_task(
    model: Any,
    data: Any,
    target: Any = None,
    *,
    y: Any = None,
    background: Any = None,
    feature_names: Sequence[str] | None = None,
    seed: Any = 0,
    batch_size: Any = None,
    progress: bool | None = None,
    method: tuple[str, Sequence[str]] | None = None,
    checks_target: bool = False,
    class_agnostic: bool = False,
    predicts_target: bool = False,
) -> Task:
    """The one place where a request's inputs are checked, converted and its target resolved.

    ``explain``, every metric and ``benchmark`` build their :class:`Task` here (or receive one built
    here): the data becomes a tensor (pandas columns become ``names``), the model an adapter, ``y`` and
    ``background`` are checked against the data, and the target is resolved once (``None``: the predicted
    class, one full prediction; given: one probe row for the output count). ``method``, a pair
    ``(name, units)``, refuses data of units the method does not score before the model is called.

    A model that knows its feature names gets its columns by name (:func:`align_columns`): the task's
    inputs and names are in the model's order. The outputs of the model calls made here (the probe row,
    the prediction of the target) must be finite (:func:`check_outputs`). ``checks_target`` (a method that
    checks the target against its own first forward, :meth:`Task.check_first_outputs`) on a torch model with
    a given target: no probe row at all, the task's ``n_outputs`` stays None until that forward. With
    ``class_agnostic`` as well (a method whose scores do not depend on the target), ``target=None`` makes no
    prediction either: the task's target is 0 for every sample, checked on that forward like a given one.
    With ``predicts_target`` as well (a method whose first forward runs the samples themselves),
    ``target=None`` makes no prediction here: that forward chooses each sample's class (``Task.predict``).
    """
    seed = _check_int(seed, "seed", positive=False)
    batch_size = _check_int(batch_size, "batch_size", positive=True)
    inputs, names = to_tensor(data, "data")
    names = list(feature_names) if feature_names is not None else names
    adapted = wrap(model, batch_size=batch_size)
    if not isinstance(adapted, TorchModel) and not inputs.is_floating_point():
        inputs = inputs.to(torch.float64)  # integer columns of a scikit-learn / NumPy model are features, not tokens
    check_units(inputs, method)  # refused before the model sees the data
    if names is not None and (inputs.ndim != 2 or len(names) != inputs.shape[1]):
        raise InputError(f"{len(names)} feature names for data of shape {tuple(inputs.shape)}")
    inputs, names, order = align_columns(inputs, names, adapted)
    bg = _background(background, adapted, order)
    if bg is not None and bg.shape[1:] != inputs.shape[1:]:
        raise InputError(f"background has samples of shape {tuple(bg.shape[1:])}, data {tuple(inputs.shape[1:])}")
    labels = to_tensor(y, "y")[0] if y is not None else None
    if labels is not None and len(labels) != len(inputs):
        raise InputError(f"y has {len(labels)} labels for {len(inputs)} samples")
    own_forward = checks_target and isinstance(adapted, TorchModel)  # the method's first forward checks the target
    predict = own_forward and predicts_target and target is None and not class_agnostic
    if predict:
        n_out, tgt = None, torch.full((len(inputs),), -1)  # that forward chooses each sample's target
    elif own_forward and (target is not None or class_agnostic):
        n_out, tgt = None, checked_target(0 if target is None else target, len(inputs), None)
    else:
        n_out = None if target is None else probe(adapted, inputs)
        tgt = resolve_target(target, adapted, inputs, n_outputs=n_out)
        n_out = adapted.n_outputs(inputs)  # known by now: no model call
    return Task(adapted, inputs, tgt, bg, labels, names, seed, batch_size, progress, n_out, predict)
