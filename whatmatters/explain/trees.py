"""TreeSHAP for tree ensembles, through shap's TreeExplainer (optional extra ``whatmatters[trees]``)."""

from __future__ import annotations

import numpy as np
import torch

from whatmatters.core.errors import ModelError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task
from whatmatters.explain.shapley import _background


@scorer("tree_shap", family="shapley", units="feature", extras=("shap",))
def tree_shap(task: Task, *, max_background: int = 100) -> tuple[torch.Tensor, dict]:
    """Exact interventional Shapley values of a tree ensemble in polynomial time (shap's TreeSHAP).

    Explains the same output as every other method here: class probabilities for classifiers
    (``predict_proba``), predictions for regressors, with features outside a coalition taken from
    the background (the data when none is given, subsampled to ``max_background`` rows) — so it
    equals ``shapley_exact`` on the same background, only faster.
    """
    try:
        import shap
    except ImportError:
        raise ModelError("tree_shap needs the shap package: pip install 'whatmatters[trees]'") from None
    estimator = getattr(task.model, "estimator", None)
    if estimator is None:
        raise ModelError("tree_shap needs a fitted tree ensemble (scikit-learn, XGBoost, LightGBM), not a callable")
    background = _background(task, max_background).numpy()
    output = "probability" if getattr(task.model, "is_classifier", False) else "raw"
    try:
        explainer = shap.TreeExplainer(
            estimator, data=background, feature_perturbation="interventional", model_output=output
        )
    except Exception as err:  # shap's own message says which model types it supports
        raise ModelError(f"tree_shap cannot explain a {type(estimator).__name__}: {err}") from None
    values = np.asarray(explainer.shap_values(task.inputs.numpy(), check_additivity=False))
    base = np.atleast_1d(np.asarray(explainer.expected_value, dtype=np.float64))
    if values.ndim == 3:  # (n, d, outputs) or, from older shap, (outputs, n, d)
        if values.shape[0] != task.n:
            values = values.transpose(1, 2, 0)
        values = values[np.arange(task.n), :, task.target.numpy()]
        base = base[task.target.numpy()]
    return torch.from_numpy(values.astype(np.float64)), {"base_value": np.broadcast_to(base, (task.n,)).copy()}
