"""Rashomon importance clouds: how much a feature's importance depends on which good model you happened to fit.

``rashomon(estimator_or_factory, X, y)`` fits ``n_models`` candidates that differ in seed, hyper-parameters
(drawn from ``params``) and bootstrap sample of the training rows, keeps those whose held-out loss is within
``tolerance`` of the best (the empirical Rashomon set, Semenova, Rudin & Parr 2022; Fisher, Rudin & Dominici's
model class reliance is the min / max of an importance over it), scores every kept model's features with
any registered explain method (default permutation importance on the held-out rows) and the strength of
feature pairs' interactions (:mod:`whatmatters.evaluate.interactions`), and returns a :class:`RashomonCloud`.
Like the Rashomon importance distribution of Donnelly et al. (2023), the result is a distribution of
importances over models and bootstrap samples, not one number; here the set is sampled, not enumerated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from whatmatters.core.adapters import to_tensor, wrap
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.task import progress_bar
from whatmatters.evaluate.rashomon_cloud import RashomonCloud

Loss = Callable[[np.ndarray, np.ndarray], float]


def rashomon(
    estimator_or_factory: Any,
    X: Any,
    y: Any,
    *,
    n_models: int = 20,
    tolerance: float = 0.02,
    params: Mapping[str, Sequence[Any]] | None = None,
    bootstrap: bool = True,
    validation: float | tuple[Any, Any] = 0.3,
    loss: str | Loss | None = None,
    method: str = "permutation",
    interactions: int = 10,
    seed: int = 0,
    n_jobs: int | None = None,
    progress: bool | None = None,
    **method_params: Any,
) -> RashomonCloud:
    """Fit a set of near-equally-good models and the distribution of each feature's importance over it.

    Args:
        estimator_or_factory: an unfitted scikit-learn estimator (cloned and ``set_params`` for every
            candidate; its ``random_state`` gets the candidate's seed), or a factory
            ``factory(X_train, y_train, seed=..., **drawn_params) -> fitted model`` (any model
            ``whatmatters.explain`` accepts: a torch ``nn.Module``, a fitted estimator, a callable).
        X, y: the data (array, tensor or DataFrame; one label or target per row; no NaN).
        n_models: candidates fitted.
        tolerance: a candidate is kept when its held-out loss is at most the best loss + ``tolerance``
            (absolute, in the loss's units: 0.02 = two accuracy points with the default classifier loss).
        params: hyper-parameter name -> values; each candidate draws one value per name at random.
        bootstrap: fit each candidate on a bootstrap sample of the training rows (else on all of them).
        validation: the share of rows held out (a random split, seeded), or ``(X_val, y_val)``.
            Losses, importances and interactions are measured on these rows.
        loss: ``"error"`` (1 - accuracy; default for classifiers), ``"log_loss"`` (class probabilities
            of estimators, softmax of a torch model's outputs), ``"mse"`` (default for regressors), or
            ``loss(y_true, outputs) -> float`` (lower is better) on NumPy arrays.
        method: any explain method of ``whatmatters.methods(unit="feature")``; per-sample scores are
            reduced to the mean |score| per feature, global ones (permutation) are used as they are.
        interactions: pairwise interaction strength among this many features (the highest by median
            importance; 0: none); all pairs of them, measured on every kept model.
        seed: seeds the split, the candidates' draws (candidate ``i`` uses ``seed + i``) and the methods.
        n_jobs: parallel fits (joblib; ``-1``: all cores). Explanations run one model at a time.
        progress: progress bars (default: on a terminal).
        **method_params: parameters of ``method`` (e.g. ``n_repeats=10``).
    """
    _check_options(n_models, tolerance, interactions, bootstrap)
    x, names, y_arr = _data(X, y)
    train, (x_val, y_val) = _split(x, y_arr, validation, seed, len(names))
    estimator = _as_estimator(estimator_or_factory)
    draws = _draws(params, n_models, seed)
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, len(train[0]), len(train[0])) if bootstrap else np.arange(len(train[0])) for _ in draws]
    frame = _frame(X)
    jobs = [
        (estimator_or_factory, estimator, train, r, seed + i, p, frame) for i, (r, p) in enumerate(zip(rows, draws))
    ]
    start = time.perf_counter()
    models = _fit_all(jobs, n_jobs, progress)
    fit_seconds = time.perf_counter() - start
    val = _frame_like(x_val, frame)
    outputs = [_outputs(m, val) for m in models]
    loss_fn, loss_name = _loss(loss, models[0], estimator, y_val, outputs[0].shape[1])
    losses = np.array([loss_fn(y_val, out) for out in outputs])
    if not np.isfinite(losses).all():
        raise ModelError(f"candidate losses are not finite ({losses.tolist()}); check the models and the loss")
    kept = np.flatnonzero(losses <= losses.min() + tolerance)
    if len(kept) < 2:
        raise MethodError(
            f"only {len(kept)} of {n_models} candidate models is within tolerance={tolerance} of the best "
            f"{loss_name} ({losses.min():.4g}; the others range {np.sort(losses)[1:].round(4).tolist()[:5]}...); "
            "raise tolerance, fit more models (n_models) or vary them less (params)"
        )
    return RashomonCloud.measure(
        [models[i] for i in kept],
        val,
        y_val,
        names=names,
        method=method,
        method_params=method_params,
        interactions=interactions,
        seed=seed,
        progress=progress,
        info={
            "losses": losses,
            "kept": kept,
            "params": [draws[i] for i in kept],
            "tolerance": tolerance,
            "loss": loss_name,
            "n_models": n_models,
            "bootstrap": bootstrap,
            "seconds": {"fit": fit_seconds},
        },
    )


def _check_options(n_models: Any, tolerance: Any, interactions: Any, bootstrap: Any) -> None:
    if not isinstance(n_models, (int, np.integer)) or isinstance(n_models, bool) or n_models < 2:
        raise MethodError(f"n_models must be an integer >= 2 (a set needs two models), got {n_models!r}")
    number = isinstance(tolerance, (int, float, np.number)) and not isinstance(tolerance, bool)
    if not number or not math.isfinite(tolerance):
        raise MethodError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if tolerance < 0:
        raise MethodError(f"tolerance must be >= 0 (a loss margin above the best model), got {tolerance!r}")
    if not isinstance(interactions, (int, np.integer)) or isinstance(interactions, bool) or interactions < 0:
        raise MethodError(f"interactions must be a feature count >= 0, got {interactions!r}")
    if not isinstance(bootstrap, bool):
        raise MethodError(f"bootstrap must be True or False, got {bootstrap!r}")


def _data(X: Any, y: Any) -> tuple[torch.Tensor, list[str], np.ndarray]:
    x, names = to_tensor(X, "X")
    if x.ndim != 2:
        raise InputError(f"X must be a 2-D table (rows x features), got shape {tuple(x.shape)}")
    y_arr = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    if y_arr.ndim != 1 or len(y_arr) != len(x):
        raise InputError(f"y must hold one value per row of X ({len(x)} rows), got shape {y_arr.shape}")
    if y_arr.dtype.kind not in "biuf":
        raise InputError(f"y must be numeric (encode class labels as numbers), got dtype {y_arr.dtype}")
    if not np.isfinite(y_arr.astype(np.float64)).all():
        raise InputError(f"y holds {int((~np.isfinite(y_arr.astype(float))).sum())} NaN or infinite values; drop them")
    return x, names or [f"x{j}" for j in range(x.shape[1])], y_arr


def _split(
    x: torch.Tensor, y: np.ndarray, validation: Any, seed: int, d: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    xn = x.cpu().numpy()
    if isinstance(validation, tuple):
        if len(validation) != 2:
            raise InputError("validation must be a share of rows or a pair (X_val, y_val)")
        xv, _, yv = _data(*validation)
        if xv.shape[1] != d:
            raise InputError(f"X_val has {xv.shape[1]} columns, X has {d}")
        return (xn, y), (xv.cpu().numpy(), yv)
    if isinstance(validation, bool) or not isinstance(validation, float) or not 0 < validation < 1:
        raise InputError(f"validation must be a share of rows in (0, 1) or (X_val, y_val), got {validation!r}")
    order = np.random.default_rng(seed).permutation(len(xn))
    n_val = round(validation * len(xn))
    if n_val < 2 or len(xn) - n_val < 2:
        raise InputError(f"{len(xn)} rows are too few to hold out {validation:.0%} for validation; pass more data")
    val, fit = order[:n_val], order[n_val:]
    return (xn[fit], y[fit]), (xn[val], y[val])


def _as_estimator(obj: Any) -> Any:
    """The scikit-learn estimator to clone, or None for a factory."""
    if hasattr(obj, "fit") and hasattr(obj, "get_params"):
        return obj
    if callable(obj) and not hasattr(obj, "forward"):
        return None
    raise ModelError(
        f"cannot fit candidates from a {type(obj).__name__}: pass an unfitted scikit-learn estimator or a factory "
        "factory(X_train, y_train, seed=..., **params) -> fitted model (for torch: train and return the module)"
    )


def _draws(params: Mapping[str, Sequence[Any]] | None, n_models: int, seed: int) -> list[dict[str, Any]]:
    if params is None:
        return [{} for _ in range(n_models)]
    if not isinstance(params, Mapping) or not all(
        isinstance(v, Sequence) and not isinstance(v, str) and len(v) for v in params.values()
    ):
        raise MethodError("params must map hyper-parameter names to non-empty lists of values")
    rng = np.random.default_rng([seed, 1])
    return [{k: v[int(rng.integers(len(v)))] for k, v in params.items()} for _ in range(n_models)]


def _frame(X: Any) -> list[str] | None:
    """The column names when X is a DataFrame (estimators then see DataFrames, as they were fitted)."""
    return [str(c) for c in X.columns] if hasattr(X, "columns") and hasattr(X, "dtypes") else None


def _frame_like(x: np.ndarray, columns: list[str] | None) -> Any:
    if columns is None:
        return x
    import pandas as pd

    return pd.DataFrame(x, columns=columns)


def _fit_one(job: tuple) -> Any:
    obj, estimator, (xt, yt), rows, seed, drawn, columns = job
    xb, yb = _frame_like(xt[rows], columns), yt[rows]
    if estimator is None:
        return obj(xb, yb, seed=seed, **drawn)
    from sklearn.base import clone

    model = clone(estimator)
    try:
        model.set_params(**drawn)
    except ValueError as err:
        raise MethodError(f"params: {err}") from None
    if "random_state" in model.get_params():
        model.set_params(random_state=seed)
    return model.fit(xb, yb)


def _fit_all(jobs: list[tuple], n_jobs: int | None, progress: bool | None) -> list[Any]:
    if n_jobs in (None, 1):
        return [_fit_one(j) for j in progress_bar(jobs, len(jobs), "fitting candidates", progress)]
    from joblib import Parallel, delayed  # joblib comes with scikit-learn

    try:  # joblib >= 1.3 yields results as they come (a live progress bar)
        results = Parallel(n_jobs=n_jobs, return_as="generator")(delayed(_fit_one)(j) for j in jobs)
    except TypeError:  # older joblib (scikit-learn 1.5 admits 1.2): all at once
        results = Parallel(n_jobs=n_jobs)(delayed(_fit_one)(j) for j in jobs)
    return list(progress_bar(results, len(jobs), "fitting candidates", progress))


def _outputs(model: Any, x: Any) -> np.ndarray:
    """Outputs ``(n, k)``: class probabilities of a classifier, predictions of a regressor, a module's outputs."""
    adapter = wrap(model)
    return adapter.predict(to_tensor(x, "X_val")[0]).to(torch.float64).cpu().numpy()


def _loss(loss: Any, model: Any, estimator: Any, y_val: np.ndarray, width: int) -> tuple[Loss, str]:
    if callable(loss):
        return (lambda yt, out: float(loss(yt, out[:, 0] if out.shape[1] == 1 else out))), getattr(
            loss, "__name__", "loss"
        )
    classifier = _is_classifier(model, estimator, y_val, width)
    name = loss if loss is not None else ("error" if classifier else "mse")
    classes = np.asarray(getattr(model, "classes_", np.arange(width)))  # a torch model: output j is class j
    probabilities = estimator is not None or hasattr(model, "predict_proba")
    if name == "mse":
        return (lambda yt, out: float(((out - yt.reshape(len(yt), -1)) ** 2).mean())), name
    if not classifier:
        raise MethodError(f"loss {name!r} needs a classifier (class outputs); use 'mse' or a callable for a regressor")
    if name == "error":
        return (lambda yt, out: float((classes[out.argmax(1)] != yt).mean())), name
    if name == "log_loss":

        def log_loss(yt: np.ndarray, out: np.ndarray) -> float:
            p = out if probabilities else np.exp(out - out.max(1, keepdims=True))
            p = p / p.sum(1, keepdims=True)
            idx = np.searchsorted(classes, yt)
            return float(-np.log(np.clip(p[np.arange(len(yt)), idx], 1e-15, None)).mean())

        return log_loss, name
    raise MethodError(f"unknown loss {name!r}; use 'error', 'log_loss', 'mse' or a callable (y_true, outputs)")


def _is_classifier(model: Any, estimator: Any, y: np.ndarray, width: int) -> bool:
    """A scikit-learn classifier, or a model with several outputs fitted to labels 0, 1, ..."""
    if estimator is not None or hasattr(model, "get_params"):
        from sklearn.base import is_classifier

        return bool(is_classifier(estimator if estimator is not None else model))
    return width > 1 and bool(np.all(y == np.round(y)) and y.min() >= 0)
