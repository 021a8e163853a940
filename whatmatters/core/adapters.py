"""Model adapters: one batched ``predict(x) -> (n, n_outputs)`` tensor interface for every model.

* :class:`TorchModel` wraps an ``nn.Module`` (gradients available, follows its device and dtype);
* :class:`FunctionModel` wraps a scikit-learn estimator or any ``predict_proba`` / ``predict`` /
  plain callable working on NumPy arrays (or pandas frames, when the estimator was fitted on one).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.params import all_finite
from whatmatters.core.state import parameter_device_dtype


def row_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _as_2d_outputs(out: torch.Tensor) -> torch.Tensor:
    if out.ndim == 1:
        return out.unsqueeze(1)
    if out.ndim != 2:
        raise ModelError(
            f"the model returned outputs of shape {tuple(out.shape)}; whatmatters needs one row per "
            "sample, i.e. shape (n,) or (n, n_outputs). Wrap the model to select the output to explain."
        )
    return out


# Scikit-learn models and callables get large batches: per-call overhead (input validation, tree
# traversal set-up) dominates small calls; 2**22 input values (32 MiB in float64) bound the memory.
VALUES_PER_CALL = 1 << 22

# On a CPU, one forward/backward call over many rows of a wide network runs out of cache: 8192 rows through a
# 256-wide MLP took 1.4x the time of the same rows in calls of 512 (1.1-1.4x for widths 64 to 2048, one or two
# threads, forward alone as well). Gradient methods cap their rows per call so that the outputs of the Linear
# layers of one call hold about CACHE_ACTIVATIONS values, and never below CACHE_ROWS rows.
CACHE_ACTIVATIONS = 1 << 18
CACHE_ROWS = 512
_LINEAR_WIDTHS: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


@dataclass
class Model:
    """Base adapter. ``predict`` returns a float tensor of shape ``(n, n_outputs)``."""

    batch_size: int | None = None  # rows per call; None: about VALUES_PER_CALL input values per call
    output: str = "auto"
    _n_outputs: int | None = field(default=None, init=False, repr=False)

    kind = "callable"
    has_gradients = False

    def _predict_batch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows_per_call(self, x: torch.Tensor) -> int:
        """Rows of ``x`` per model call: ``batch_size``, or as many as hold ``VALUES_PER_CALL`` values."""
        if self.batch_size:
            return self.batch_size
        per_row = max(1, x[0].numel()) if len(x) else 1
        return max(1, VALUES_PER_CALL // per_row)

    def predict(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Model outputs for every row of ``x`` in batches of ``batch_size`` rows (default: ``rows_per_call``)."""
        size = batch_size or self.rows_per_call(x)
        if len(x) <= size:
            return _as_2d_outputs(self._predict_batch(x))
        return torch.cat([_as_2d_outputs(self._predict_batch(x[s])) for s in row_slices(len(x), size)])

    def probe(self, example: torch.Tensor) -> torch.Tensor | None:
        """The outputs of ``example[:1]`` while the output count is unknown (then it is known); else None."""
        if self._n_outputs is not None:
            return None
        out = self.predict(example[:1])
        self._n_outputs = int(out.shape[1])
        return out

    def known_outputs(self, count: int) -> None:
        """Record the output count seen in a prediction, so that no probe row is needed."""
        self._n_outputs = count

    def n_outputs(self, example: torch.Tensor) -> int:
        """Number of outputs, from one row of ``example`` the first time it is asked."""
        self.probe(example)
        return int(self._n_outputs)  # type: ignore[arg-type]  # set by probe

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64


@dataclass
class FunctionModel(Model):
    """A scikit-learn estimator or a callable on NumPy arrays."""

    fn: Callable[[Any], Any] | None = None
    feature_names: Sequence[str] | None = None
    estimator: Any = None
    is_classifier: bool = False

    def model_input(self, array: np.ndarray) -> Any:
        """Rows as the model takes them: a DataFrame with its feature names when it was fitted on one."""
        if self.feature_names is None:
            return array
        import pandas as pd

        return pd.DataFrame(array, columns=list(self.feature_names))

    def _predict_batch(self, x: torch.Tensor) -> torch.Tensor:
        out = np.asarray(self.fn(self.model_input(x.detach().cpu().numpy())))
        if out.dtype == object or not np.issubdtype(out.dtype, np.number):
            raise ModelError(
                "the model's predictions are not numeric (class labels?); explain a classifier through "
                "its probabilities: pass the estimator itself or its predict_proba"
            )
        return torch.from_numpy(out.astype(np.float64, copy=False))


@dataclass
class TorchModel(Model):
    """An ``nn.Module``: outputs in its own device and dtype; gradients available."""

    module: nn.Module | None = None
    batch_size: int | None = 256
    kind = "torch"
    has_gradients = True

    def __post_init__(self) -> None:
        self._device, self._dtype = parameter_device_dtype(self.module)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs moved to the model's device; floating inputs in the model's dtype."""
        if x.is_floating_point():
            return x.to(self._device, self._dtype)
        return x.to(self._device)

    def _predict_batch(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.forward(x)

    def cache_rows(self) -> int | None:
        """Rows per call that keep a CPU forward/backward in cache (``CACHE_ACTIVATIONS``), from the widths of
        the model's Linear layers; None (no cap) on other devices or without Linear layers."""
        if self._device.type != "cpu":
            return None
        width = _LINEAR_WIDTHS.get(self.module)
        if width is None:  # a layer swapped later leaves a stale width: only the speed depends on it
            width = _LINEAR_WIDTHS[self.module] = sum(
                m.out_features for m in self.module.modules() if isinstance(m, nn.Linear)
            )
        return max(CACHE_ROWS, CACHE_ACTIVATIONS // width) if width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A differentiable forward pass (outputs as (n, n_outputs))."""
        out = self.module(self.to_model(x))
        if not isinstance(out, torch.Tensor):
            out = getattr(out, "logits", None)
            if out is None:
                raise ModelError("the model returned a non-tensor without .logits; wrap it so that it returns a tensor")
        return _as_2d_outputs(out)


def wrap(model: Any, *, feature_names: Sequence[str] | None = None, batch_size: int | None = None) -> Model:
    """Turn an ``nn.Module``, scikit-learn estimator or callable into a :class:`Model`."""
    if isinstance(model, Model):
        return model
    kwargs: dict[str, Any] = {} if batch_size is None else {"batch_size": batch_size}
    if isinstance(model, nn.Module):
        return TorchModel(module=model, **kwargs)
    names = None
    fitted_names = getattr(model, "feature_names_in_", None)
    if fitted_names is not None:
        names = [str(n) for n in fitted_names]
    if hasattr(model, "predict_proba"):
        _check_fitted(model)
        return FunctionModel(fn=model.predict_proba, feature_names=names, estimator=model, is_classifier=True, **kwargs)
    if hasattr(model, "predict"):
        _check_fitted(model)
        return FunctionModel(fn=model.predict, feature_names=names, estimator=model, **kwargs)
    if callable(model):
        return FunctionModel(fn=model, **kwargs)
    raise ModelError(
        f"cannot explain a {type(model).__name__}: pass a torch nn.Module, a scikit-learn estimator, "
        "or a callable mapping an (n, d) array to predictions"
    )


def _check_fitted(estimator: Any) -> None:
    try:
        from sklearn.exceptions import NotFittedError
        from sklearn.utils.validation import check_is_fitted
    except ImportError:  # pragma: no cover - scikit-learn is a core dependency
        return
    try:
        check_is_fitted(estimator)
    except NotFittedError:
        raise ModelError(f"the {type(estimator).__name__} is not fitted yet; call .fit(X, y) first") from None
    except TypeError:
        pass


def to_tensor(data: Any, name: str = "data") -> tuple[torch.Tensor, list[str] | None]:
    """Numeric tensor from an array, tensor, DataFrame or nested list; pandas columns become names.

    Raises :class:`InputError` for empty, non-numeric or non-finite data.
    """
    names = None
    if hasattr(data, "columns") and hasattr(data, "dtypes"):  # pandas DataFrame
        names = [str(c) for c in data.columns]
        from pandas.api.types import is_bool_dtype, is_numeric_dtype

        bad = [str(c) for c, t in data.dtypes.items() if not (is_numeric_dtype(t) or is_bool_dtype(t))]
        if bad:
            raise InputError(
                f"{name} has non-numeric columns {bad}; encode them first (e.g. one-hot with "
                "pandas.get_dummies or sklearn's OneHotEncoder in a Pipeline)"
            )
        data = data.to_numpy(dtype=np.float64, na_value=np.nan)  # missing values become NaN (rejected below)
    if isinstance(data, torch.Tensor):
        tensor = data.detach()
    else:
        try:
            array = np.asarray(data)
        except ValueError as err:
            raise InputError(f"{name} is ragged or not array-like: {err}") from None
        if array.dtype == object or array.dtype.kind in "USV":
            raise InputError(
                f"{name} is not numeric (dtype {array.dtype}); encode text or categorical columns as numbers first"
            )
        if array.dtype == np.bool_:
            array = array.astype(np.float64)
        tensor = torch.from_numpy(np.array(array, copy=True))  # never shares the user's memory
    if tensor.is_complex():
        raise InputError(f"{name} holds complex numbers; whatmatters needs real numeric data")
    if tensor.numel() == 0 or tensor.ndim == 0 or tensor.shape[0] == 0:
        raise InputError(f"{name} is empty (shape {tuple(tensor.shape)}); pass at least one sample")
    if not all_finite(tensor):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise InputError(
            f"{name} contains {n_bad} NaN or infinite value(s); impute or drop them before explaining "
            "(e.g. sklearn.impute.SimpleImputer)"
        )
    return tensor, names
