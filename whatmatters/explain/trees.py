"""TreeSHAP for tree ensembles, through shap's TreeExplainer (optional extra ``whatmatters[trees]``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task
from whatmatters.explain.shapley import background_rows

OUTPUTS = ("probability", "raw")


def _shap() -> Any:
    try:
        import shap
    except ImportError:
        raise ModelError("tree_shap needs the shap package: pip install 'whatmatters[trees]'") from None
    return shap


@scorer("tree_shap", family="shapley", units="feature", extras=("shap",))
def tree_shap(task: Task, *, output: str = "probability", max_background: int = 100) -> tuple[torch.Tensor, dict]:
    """Interventional Shapley values of a tree ensemble in polynomial time (shap's TreeSHAP).

    Same value function as ``shapley_exact``: features outside a coalition are taken from the
    background rows (the data when none is given, subsampled to ``max_background`` rows with the
    seed). Regressors explain ``predict``; classifiers explain, by default, ``predict_proba`` of the
    target class like every other method here:

    * forests and single trees (RandomForest, ExtraTrees, DecisionTree) average leaf probabilities,
      so their values are exact and equal ``shapley_exact`` on the same background;
    * boosted classifiers (GradientBoosting, HistGradientBoosting, XGBoost, LightGBM) add log-odds.
      shap then rescales each background row's exact log-odds attribution into probability units
      (``tree_shap.h``, "per reference scaling"): the values sum to ``f(x) - base_value`` but are
      *not* the Shapley values of ``predict_proba`` (``extra["exact"]`` is False), and shap supports it
      for binary models only. ``output="raw"`` explains the log-odds (decision function) exactly.

    shap compares feature values in float32; HistGradientBoosting splits in float64, so data lying
    between a threshold and its float32 rounding can shift its values slightly. For probabilities and
    regressions the values' sum is checked against the model (``extra["efficiency_gap"]``) and
    ``extra["exact"]`` is False when it is off. ``extra``: ``base_value`` per sample, ``exact``,
    ``output``, ``efficiency_gap``.
    """
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {OUTPUTS}, got {output!r}")
    shap = _shap()
    estimator = getattr(task.model, "estimator", None)
    if estimator is None:
        raise ModelError(
            "tree_shap needs a fitted tree ensemble (scikit-learn forest or boosting, XGBoost, LightGBM), "
            "not a plain callable; use method='kernel_shap' for any model"
        )
    classifier = bool(getattr(task.model, "is_classifier", False))
    model_output = "probability" if classifier and output == "probability" else "raw"
    background = background_rows(task, max_background).double().cpu().numpy()
    try:
        explainer = shap.TreeExplainer(
            estimator, data=background, feature_perturbation="interventional", model_output=model_output
        )
    except Exception as err:  # shap says which model types and outputs it supports
        raise ModelError(
            f"shap's TreeExplainer cannot explain this {type(estimator).__name__} ({type(err).__name__}: {err}). "
            "It supports tree ensembles such as RandomForest, ExtraTrees, (Hist)GradientBoosting, XGBoost and "
            "LightGBM; use method='kernel_shap' for any other model."
        ) from None
    tree_output = getattr(explainer.model, "tree_output", "raw_value")
    try:
        values = explainer.shap_values(task.inputs.double().cpu().numpy(), check_additivity=False)
    except NotImplementedError as err:
        raise ModelError(
            f"shap cannot explain the probabilities of this {type(estimator).__name__} ({err}); pass "
            "output='raw' to explain its log-odds exactly, or use method='kernel_shap' for the probabilities"
        ) from None
    values = np.stack(values, -1) if isinstance(values, list) else np.asarray(values)
    base = np.atleast_1d(np.asarray(explainer.expected_value, dtype=np.float64)).reshape(-1)
    target = task.target.numpy()
    if values.ndim == 3:  # (n, d, outputs)
        values = values[np.arange(task.n), :, target]
        base = base[target]
    else:  # one output: a regressor, or a binary classifier's positive class (probability or log-odds)
        base = np.broadcast_to(base[0], (task.n,)).copy()
        negative = target == 0 if classifier else np.zeros(task.n, dtype=bool)
        # class 0: probability 1 - p (base 1 - E p) or log-odds -margin; both negate the attributions
        values = np.where(negative[:, None], -values, values)
        base = np.where(negative, (1.0 - base) if model_output == "probability" else -base, base)
    exact = model_output == "raw" or tree_output == "probability"
    extra: dict[str, Any] = {"base_value": torch.from_numpy(base.astype(np.float64)), "output": model_output}
    if model_output == "probability" or not classifier:  # the output the adapter predicts: check efficiency
        size = task.rows_per_call()
        fx = task.model.predict(task.inputs, batch_size=size).double().cpu().numpy()[np.arange(task.n), target]
        fb = task.model.predict(torch.from_numpy(background), batch_size=size).double().cpu().numpy().mean(0)[target]
        gap = float(np.abs(values.sum(1) - (fx - fb)).max())
        extra["efficiency_gap"] = gap
        # shap compares features in float32; a model that splits in float64 (HistGradientBoosting) can disagree
        exact = exact and gap <= 1e-6 * max(1.0, float(np.abs(fx).max()))
    extra["exact"] = exact
    return torch.from_numpy(values.astype(np.float64)), extra
