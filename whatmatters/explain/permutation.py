"""Permutation importance: how much a model's score drops when one feature's values are shuffled."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task, progress_bar
from whatmatters.explain.tree_sums import TreeSum, tree_sum

# Input elements per model call when the caller gave no batch_size: all permuted copies of all
# repeats and features are stacked and sent in a few calls of about this many elements.
CHUNK_ELEMENTS = 20_000_000

# A tree ensemble is run tree by tree when the trees that split on a column are at most this share of the
# ensemble, averaged over the columns (above it, the stacked calls cost the same with less overhead).
TREE_SHARE = 0.8

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # outputs (c, n, k) -> scores (c,)


@scorer("permutation", family="perturbation", units="feature", per_sample=False, aliases=("permutation_importance",))
def permutation(task: Task, *, n_repeats: int = 5, scoring: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Permutation importance: mean drop of the model's score on ``y`` when a feature is shuffled.

    Every feature's column is shuffled ``n_repeats`` times (independent permutations, drawn from
    ``seed``). All ``n_repeats x d`` permuted copies of the data are built as one stacked tensor and
    go to the model in a few large calls (about ``CHUNK_ELEMENTS`` input values each, or
    ``batch_size`` rows when given), instead of one call per feature and repeat. A scikit-learn forest or
    histogram gradient boosting model is run as a sum of trees: a shuffled column re-runs only the trees
    that split on it (the same scores, up to rounding; used when it saves work and the sum reproduces the
    model's own outputs on the data; ``extra["tree_sum"]`` says whether it was).

    Args:
        n_repeats: shuffles per feature.
        scoring: ``None`` scores like scikit-learn's ``estimator.score`` (accuracy of the argmax
            class for classifiers, R² for regressors); a scikit-learn scorer name (``"roc_auc"``,
            ``"neg_log_loss"``, ``"f1_macro"``, ...) or a ``make_scorer`` object; or a callable
            ``(y_true, outputs) -> float`` (higher is better) receiving NumPy arrays, ``outputs``
            being the model's outputs: ``(n, n_classes)`` probabilities of a classifier, ``(n,)``
            predictions of a single-output regressor.

    Returns the mean drop per feature; ``extra`` holds ``std`` (over repeats, as scikit-learn),
    ``stderr`` (standard error of the mean), ``importances`` (raw, ``(n_repeats, d)``),
    ``baseline_score`` and ``tree_sum``.
    """
    if task.y is None:
        raise InputError(
            "permutation importance scores the model against the true labels: pass y=... to explain "
            "(one label or target value per sample)"
        )
    if not isinstance(n_repeats, int) or isinstance(n_repeats, bool) or n_repeats < 1:
        raise MethodError(f"n_repeats must be a positive integer, got {n_repeats!r}")
    x = task.inputs
    if x.ndim != 2:
        raise InputError(f"permutation importance shuffles the columns of 2-D data; got shape {tuple(x.shape)}")
    n, d = x.shape
    k = task.model.n_outputs(x)
    score = _score_function(task, scoring, k)

    rows_per_call = task.batch_size or max(1, CHUNK_ELEMENTS // d)
    perms = _Permutations(task.seed, n, d)
    x_np = x.cpu().numpy()
    trees = tree_sum(getattr(task.model, "estimator", None))
    scores = None if trees is None else _tree_scores(task, trees, x_np, perms, n_repeats, score, rows_per_call)
    by_trees = scores is not None
    if scores is None:
        scores = _stacked_scores(task, x_np, perms, n_repeats, score, rows_per_call)

    baseline = scores[0]
    importances = baseline - scores[1:].reshape(n_repeats, d)
    std = importances.std(0, correction=0)
    stderr = importances.std(0) / math.sqrt(n_repeats) if n_repeats > 1 else torch.full((d,), math.nan)
    extra = {
        "std": std.numpy(),
        "stderr": stderr.numpy(),
        "importances": importances.numpy(),
        "baseline_score": float(baseline),
        "tree_sum": by_trees,
    }
    return importances.mean(0), extra


def _stacked_scores(
    task: Task, x: np.ndarray, perms: _Permutations, n_repeats: int, score: ScoreFn, rows_per_call: int
) -> torch.Tensor:
    """Scores of copy 0 (the data) and copy ``1 + r * d + j`` (column ``j`` shuffled by repeat ``r``), all
    copies stacked and sent to the model in a few large calls."""
    n, d = x.shape
    copies_per_call = max(1, rows_per_call // n)
    total = 1 + n_repeats * d
    scores = torch.empty(total, dtype=torch.float64)
    chunks = [slice(i, min(i + copies_per_call, total)) for i in range(0, total, copies_per_call)]
    column_major = getattr(task.model, "feature_names", None) is not None  # the adapter builds a DataFrame
    for s in progress_bar(chunks, len(chunks), "permutation", task.progress):
        copies = torch.from_numpy(_permuted_copies(x, range(s.start, s.stop), perms, column_major))
        out = task.model.predict(copies, batch_size=rows_per_call)
        scores[s] = score(out.reshape(s.stop - s.start, n, -1)).to(torch.float64).cpu()
    return scores


def _tree_scores(
    task: Task, trees: TreeSum, x: np.ndarray, perms: _Permutations, n_repeats: int, score: ScoreFn,
    rows_per_call: int,
) -> torch.Tensor | None:  # fmt: skip
    """The same scores as :func:`_stacked_scores` for a tree ensemble, where a shuffled column re-runs only the
    trees that split on it (the others' outputs on the data are reused). None when that saves little
    (``TREE_SHARE``), when the trees' outputs would not fit in one call's memory, or when the tree sum does not
    reproduce the model's own outputs."""
    n, d = x.shape
    users = trees.users(d)
    k = len(trees.base)
    if sum(map(len, users)) > TREE_SHARE * len(trees.trees) * d or len(trees.trees) * n * k > CHUNK_ELEMENTS:
        return None
    prepared = np.asarray(trees.prepare(task.model.model_input(x)))
    parts = [trees.add(t, prepared, np.zeros((n, k))) for t in range(len(trees.trees))]
    raw = trees.base + np.sum(parts, axis=0)
    own = task.model.predict(torch.from_numpy(x)).numpy()
    mine = np.asarray(trees.link(raw), dtype=np.float64).reshape(n, -1)
    if mine.shape != own.shape or not np.allclose(mine, own, rtol=1e-9, atol=1e-12):
        return None
    scores = torch.empty(1 + n_repeats * d, dtype=torch.float64)
    scores[0] = score(torch.from_numpy(own)[None])[0]
    group = max(1, min(n_repeats, rows_per_call // n))  # repeats whose copies go in one pass
    starts = range(0, n_repeats, group)
    for start in progress_bar(starts, len(starts), "permutation (tree ensemble)", task.progress):
        repeats = np.arange(start, min(start + group, n_repeats))
        orders = np.stack([perms.get(int(r)) for r in repeats])  # (g, d, n)
        for j in range(d):
            rows = np.tile(prepared, (len(repeats), 1))
            rows[:, j] = prepared[orders[:, j], j].reshape(-1)
            kept = raw - sum(parts[t] for t in users[j])  # the trees that do not split on column j
            shuffled = np.tile(kept, (len(repeats), 1))
            for t in users[j]:
                trees.add(t, rows, shuffled)
            out = np.asarray(trees.link(shuffled), dtype=np.float64).reshape(len(repeats), n, -1)
            scores[1 + repeats * d + j] = score(torch.from_numpy(out))
    return scores


class _Permutations:
    """Row permutations of every (repeat, feature), drawn one repeat at a time in a fixed order.

    The draws do not depend on how copies are chunked, so results depend only on the seed.
    """

    def __init__(self, seed: int, n: int, d: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.rows = np.broadcast_to(np.arange(n), (d, n))
        self.current = -1
        self.block = self.rows

    def get(self, repeat: int) -> np.ndarray:
        """``(d, n)``: row ``j`` is the permutation of feature ``j`` in ``repeat``."""
        if repeat < self.current:
            raise RuntimeError("permutations are drawn in order")
        while self.current < repeat:
            self.block = self.rng.permuted(self.rows, axis=1)
            self.current += 1
        return self.block


def _permuted_copies(x: np.ndarray, copies: range, perms: _Permutations, column_major: bool) -> np.ndarray:
    """Stacked copies of ``x`` as one ``(c * n, d)`` array; copy ``1 + r * d + j`` has column ``j``
    shuffled by repeat ``r`` (copy 0 is ``x`` itself).

    ``column_major`` lays the array out feature by feature (Fortran order), which pandas turns into
    a DataFrame without transposing.
    """
    n, d = x.shape
    c = len(copies)
    ids = np.arange(copies.start, copies.stop)
    flat = ids[ids > 0] - 1
    repeat, col = flat // d, flat % d
    where = np.flatnonzero(ids > 0)
    if len(flat):
        rows = np.concatenate([perms.get(int(r))[col[repeat == r]] for r in np.unique(repeat)])  # (m, n)
        values = np.take_along_axis(x.T[col], rows, axis=1)  # column j of x, reordered
    if column_major:
        out = np.empty((d, c, n), dtype=x.dtype)
        out[:] = x.T[:, None, :]
        if len(flat):
            out[col, where] = values
        return out.reshape(d, c * n).T
    out = np.empty((c, n, d), dtype=x.dtype)
    out[:] = x
    if len(flat):
        out[where, :, col] = values
    return out.reshape(c * n, d)


def _score_function(task: Task, scoring: Any, k: int) -> ScoreFn:
    """Score of each stacked copy, from the model outputs ``(c, n, k)``."""
    model = task.model
    estimator = getattr(model, "estimator", None)
    if estimator is not None:
        from sklearn.base import is_classifier

        classifier = bool(is_classifier(estimator))
    else:
        classifier = k > 1
    has_scores = classifier and k > 1  # class probabilities / logits, not labels
    classes = getattr(estimator, "classes_", None) if estimator is not None else None
    if has_scores and classes is not None and len(classes) != k:
        raise MethodError(f"the classifier has {len(classes)} classes but returns {k} outputs per sample")
    y = task.y

    def labels(out: torch.Tensor) -> np.ndarray:  # (n, k) -> predicted labels (n,)
        if not has_scores:
            return out[:, 0].cpu().numpy()
        idx = out.argmax(1).cpu().numpy()
        return np.asarray(classes)[idx] if classes is not None else idx

    if scoring is None:
        if classifier:
            y_labels = _as_label_tensor(y, classes)

            def accuracy(out: torch.Tensor) -> torch.Tensor:
                if has_scores:
                    idx = out.argmax(2).cpu()
                    pred = idx if classes is None else torch.as_tensor(_numeric(classes), dtype=torch.float64)[idx]
                else:
                    pred = out[..., 0].cpu()
                return (pred.to(torch.float64) == y_labels).to(torch.float64).mean(1)

            return accuracy
        target = y.to(torch.float64).reshape(len(y), -1)
        if target.shape[1] not in (1, k):
            raise InputError(f"y has {target.shape[1]} columns but the model returns {k} outputs per sample")

        def r2(out: torch.Tensor) -> torch.Tensor:
            pred = out.to(torch.float64).cpu()
            t = target.to(pred.device)
            sse = ((t - pred) ** 2).sum(1)
            sst = ((t - t.mean(0)) ** 2).sum(0)
            ratio = torch.where(sst > 0, sse / sst.clamp_min(1e-300), torch.where(sse > 0, 1.0, 0.0))
            return (1 - ratio).mean(1)

        return r2

    y_np = _label_array(y, classes) if classifier else y.numpy()
    if isinstance(scoring, str) or _is_sklearn_scorer(scoring):
        return _sklearn_scorer(scoring, y_np, classifier, has_scores, classes, labels)
    if callable(scoring):

        def custom(out: torch.Tensor) -> torch.Tensor:
            values = []
            for o in out:
                o_np = o.cpu().numpy()
                values.append(float(scoring(y_np, o_np[:, 0] if o_np.shape[1] == 1 else o_np)))
            return torch.tensor(values, dtype=torch.float64)

        return custom
    raise MethodError(
        f"scoring must be None, a scikit-learn scorer name or a callable (y_true, outputs) -> float; got {scoring!r}"
    )


def _is_sklearn_scorer(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("_score_func", "_sign", "_kwargs", "_response_method"))


def _sklearn_scorer(
    scoring: Any,
    y_true: np.ndarray,
    classifier: bool,
    has_scores: bool,
    classes: Any,
    labels: Callable[[torch.Tensor], np.ndarray],
) -> ScoreFn:
    """A scikit-learn scorer applied to outputs already computed (no extra model calls)."""
    if isinstance(scoring, str):
        from sklearn.metrics import get_scorer, get_scorer_names

        if scoring not in get_scorer_names():
            import difflib

            close = difflib.get_close_matches(scoring, get_scorer_names(), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise MethodError(f"unknown scoring {scoring!r}.{hint} sklearn.metrics.get_scorer_names() lists them.")
        scoring_obj = get_scorer(scoring)
    else:
        scoring_obj = scoring
    if not _is_sklearn_scorer(scoring_obj):
        raise MethodError(
            f"scoring {scoring!r} is not a plain scikit-learn scorer (multi-metric or passthrough scorers are not "
            "supported); pass one metric name or a callable (y_true, outputs) -> float"
        )
    func, sign, kwargs = scoring_obj._score_func, scoring_obj._sign, dict(scoring_obj._kwargs)
    wanted = scoring_obj._response_method
    wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    available = ("predict", "predict_proba") if has_scores else ("predict",)
    response = next((r for r in wanted if r in available), None)
    if response is None:
        raise MethodError(
            f"scoring {scoring!r} needs the model's {' or '.join(wanted)}, which whatmatters does not get from "
            f"this model (it has {' and '.join(available)}); pass a callable (y_true, outputs) -> float instead"
        )
    column = None
    if response == "predict_proba" and classes is not None and len(classes) == 2:
        if "pos_label" in kwargs:
            pos_label = kwargs["pos_label"]
        else:
            import inspect

            param = inspect.signature(func).parameters.get("pos_label")
            pos_label = param.default if param is not None else None
        pos_label = classes[-1] if pos_label is None else pos_label
        matches = np.flatnonzero(np.asarray(classes) == pos_label)
        if len(matches) != 1:
            raise MethodError(f"pos_label={pos_label!r} is not one of the classes {list(classes)}")
        column = int(matches[0])
    elif response == "predict_proba" and classes is None and has_scores:
        column = 1  # a two-output model without classes_: output 1 is the positive class

    def apply(out: torch.Tensor) -> torch.Tensor:
        values = []
        for o in out:
            if response == "predict":
                pred = labels(o) if classifier else o.cpu().numpy()
                if not classifier and pred.ndim == 2 and pred.shape[1] == 1:
                    pred = pred[:, 0]
            else:
                proba = o.cpu().numpy()
                pred = proba[:, column] if column is not None and proba.shape[1] == 2 else proba
            values.append(sign * float(func(y_true, pred, **kwargs)))
        return torch.tensor(values, dtype=torch.float64)

    return apply


def _numeric(classes: Any) -> np.ndarray:
    array = np.asarray(classes)
    if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
        raise InputError(f"the classifier's classes {list(array)} are not numeric; encode the labels as numbers")
    return array.astype(np.float64)


def _as_label_tensor(y: torch.Tensor, classes: Any) -> torch.Tensor:
    labels = y.reshape(-1).to(torch.float64)
    if len(labels) != len(y):
        raise InputError(f"a classifier needs one label per sample; y has shape {tuple(y.shape)}")
    if classes is not None:
        known = torch.as_tensor(_numeric(classes))
        unknown = ~torch.isin(labels, known)
        if bool(unknown.any()):
            raise InputError(
                f"y holds label(s) {sorted(set(labels[unknown].tolist()))[:5]} that the classifier does not know "
                f"(its classes are {list(np.asarray(classes))}); pass the labels it was fitted on"
            )
    return labels


def _label_array(y: torch.Tensor, classes: Any) -> np.ndarray:
    labels = _as_label_tensor(y, classes).numpy()
    if classes is not None:
        return labels.astype(np.asarray(classes).dtype)
    return labels.astype(np.int64) if np.all(labels == np.round(labels)) else labels
