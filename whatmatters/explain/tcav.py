"""TCAV: does a human concept (examples of it) push the model towards the target, at a layer?

For each concept and layer (Kim et al. 2018): a linear classifier (scikit-learn) separates the layer's
activations of the concept's examples from those of a random set; its unit normal pointing to the concept is
the concept activation vector (CAV). The TCAV score is the share of explained inputs whose target output rises
along the CAV (positive directional derivative ``grad_A f(x) . v``). This is repeated ``n_random`` times, each
run with a random half of the concept's examples against another random set; the null does the same with a
random set in the concept's place, and a two-sided t-test (scipy) of the concept's scores against the null's
says whether the concept matters or the score is chance. (With the whole concept set in every run, as captum
does, the runs share the set's quirks: near the output, where the gradient hardly changes between inputs, every
fixed set, a meaningless one included, then scores all 0 or all 1 and looks significant.)

Random sets are drawn (seeded, without replacement within a set) from ``random=``, else the background, else
the explained data. Activations of all examples go through the model in batched calls; the gradients at the
inputs are taken once per layer and projected on every CAV of that layer in one product.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from whatmatters.core.adapters import row_slices, to_tensor
from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task
from whatmatters.explain.gradient import GRADIENT_UNITS, rows_per_call
from whatmatters.explain.layer_sites import LayerSite, layer_activations, layer_gradients, layer_site

CLASSIFIERS = ("sgd", "logistic")


def concept_sets(task: Task, concepts: Any) -> dict[str, torch.Tensor]:
    """The concept examples as tensors shaped like the inputs; each set needs at least 2 examples."""
    if not isinstance(concepts, Mapping) or not concepts:
        raise InputError("concepts= must be a dict {concept name: examples shaped like the data}, e.g. {'striped': x}")
    sets = {}
    for name, examples in concepts.items():
        x = to_tensor(examples, f"concept {name!r}")[0]
        if tuple(x.shape[1:]) != task.unit_shape:
            raise InputError(
                f"concept {name!r} has examples of shape {tuple(x.shape[1:])}, the data {task.unit_shape}; "
                "give examples shaped like the data"
            )
        if len(x) < 2:
            raise InputError(
                f"concept {name!r} has {len(x)} example(s); a concept activation vector needs at least 2 "
                "(tens are usual)"
            )
        sets[str(name)] = x.to(task.inputs.dtype)
    return sets


def _random_sets(task: Task, random: Any, n_sets: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random pool and ``n_sets`` index sets of ``size`` of its rows (each without repeats)."""
    pool = to_tensor(random, "random")[0] if random is not None else task.background
    pool = task.inputs if pool is None else pool
    if tuple(pool.shape[1:]) != task.unit_shape or len(pool) < 2:
        raise InputError(
            f"the random examples (random=, else the background, else the data) must be at least 2 samples shaped "
            f"like the data {task.unit_shape}; got shape {tuple(pool.shape)}"
        )
    g = task.generator()
    size = min(size, len(pool))
    index = torch.stack([torch.randperm(len(pool), generator=g)[:size] for _ in range(n_sets)])
    return pool.to(task.inputs.dtype), index


def fit_cav(positive: np.ndarray, negative: np.ndarray, classifier: str, seed: int) -> tuple[np.ndarray, float]:
    """Unit normal (towards ``positive``) of a linear classifier, and its accuracy on every third example held out."""
    from sklearn.linear_model import LogisticRegression, SGDClassifier

    x = np.concatenate([positive, negative])
    y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    held = (np.arange(len(x)) % 3 == 2) if min(len(positive), len(negative)) >= 3 else np.zeros(len(x), bool)
    fit = (
        SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3, random_state=seed)
        if classifier == "sgd"
        else LogisticRegression(max_iter=1000)
    ).fit(x[~held], y[~held])
    w = fit.coef_.ravel()
    norm = np.linalg.norm(w)
    test = held if held.any() else ~held
    return (w / norm if norm > 0 else w), float(fit.score(x[test], y[test]))


def _p_value(scores: np.ndarray, null: np.ndarray) -> float:
    """Two-sided t-test of the concept's scores against the random-vs-random ones (exact ties: 1, apart: 0)."""
    from scipy.stats import ttest_ind

    if scores.std() == 0 and null.std() == 0:
        return 1.0 if scores.mean() == null.mean() else 0.0
    return float(ttest_ind(scores, null).pvalue)


def _input_gradients_at(task: Task, site: LayerSite, rows: int) -> torch.Tensor:
    model = task.torch_model
    parts = [
        layer_gradients(task, site, model.to_model(task.inputs[s]), task.target[s])[1].flatten(1)
        for s in row_slices(task.n, rows)
    ]
    return torch.cat(parts).double().cpu()


@scorer("tcav", family="concept", units=GRADIENT_UNITS, needs="gradients", per_sample=False)
def tcav(
    task: Task,
    *,
    concepts: dict[str, Any] | None = None,
    layers: str | list[str] | None = None,
    random: Any = None,
    n_random: int = 10,
    set_size: int | None = None,
    classifier: str = "sgd",
    alpha: float = 0.05,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """TCAV: the share of inputs whose target output rises along a concept's activation vector, per layer.

    Args:
        concepts: ``{name: examples}``, each at least 2 examples shaped like the data.
        layers: a layer name or names (from ``model.named_modules()``).
        random: examples to draw the random sets from (default: the background, else the data).
        n_random: random sets each concept is tested against (and the null is built from).
        set_size: examples per random set (default: the largest concept set, at most the pool).
        classifier: ``"sgd"`` (scikit-learn's ``SGDClassifier(alpha=0.01)``, captum's default) or ``"logistic"``.
        alpha: significance level of ``extra["significant"]``.

    Values: the mean TCAV score over the random sets, one per ``"concept@layer"`` (``unit="concept"``).
    ``extra``: ``p_values`` (two-sided t-test against random-vs-random scores), ``significant``
    (``p < alpha``), ``scores`` (per random set), ``random_scores`` (the null, per layer), ``cav_accuracy``
    (held-out accuracy of each linear classifier), ``magnitudes`` (per random set, the mean directional
    derivative ``grad_A f(x) . v`` over the inputs: captum's "magnitude" score), ``cavs`` (per
    ``"concept@layer"``, the ``(n_random, D)`` unit CAVs of the runs, on the flattened layer output),
    ``concepts`` and ``layers``.
    """
    if classifier not in CLASSIFIERS:
        raise MethodError(f"classifier must be one of {list(CLASSIFIERS)}, got {classifier!r}")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 2:
        raise MethodError(f"n_random must be an int of at least 2 (random sets for the t-test), got {n_random!r}")
    names = [layers] if isinstance(layers, str) else list(layers) if isinstance(layers, list | tuple) else []
    if not names or not all(isinstance(n, str) for n in names):
        raise MethodError(
            f"tcav needs layers=, a layer name or a list of names from model.named_modules(); got {layers!r}"
        )
    if set_size is not None and (isinstance(set_size, bool) or not isinstance(set_size, int) or set_size < 2):
        raise MethodError(f"set_size must be at least 2 examples per random set, got {set_size!r}")
    sets = concept_sets(task, concepts)
    size = set_size if set_size is not None else max(len(x) for x in sets.values())
    pool, index = _random_sets(task, random, n_random + 1, int(size))
    g = task.generator()
    rows = rows_per_call(task, int(np.prod(task.unit_shape)))
    examples = torch.cat([*sets.values(), pool])
    bounds = np.cumsum([0, *(len(x) for x in sets.values())])
    scores = np.empty((len(sets), len(names), n_random))
    accuracy, magnitude = np.empty_like(scores), np.empty_like(scores)
    cav_list: list[list[np.ndarray]] = [[] for _ in sets]
    null = np.empty((len(names), n_random))
    for j, name in enumerate(names):
        site = layer_site(task, name)
        acts = layer_activations(task, site, examples, rows).flatten(1).double().cpu().numpy()
        concept_acts = [acts[a:b] for a, b in itertools.pairwise(bounds)]
        random_acts = acts[bounds[-1] :][index.numpy()]  # (n_random + 1, size, D)
        # each run: a random half of the concept's examples against random set i; the null puts a random half
        # of random set 0 in the concept's place (the same structure: with no effect, the two scores agree)
        positives = [*concept_acts, random_acts[0]]
        halves = [
            [torch.randperm(len(p), generator=g)[: max(2, len(p) // 2)] for _ in range(n_random)] for p in positives
        ]
        pairs = [(p[halves[k][i]], random_acts[i + 1]) for k, p in enumerate(positives) for i in range(n_random)]
        cavs, accs = zip(*[fit_cav(a, b, classifier, task.seed) for a, b in pairs])
        grads = _input_gradients_at(task, site, rows)
        derivatives = (grads @ torch.from_numpy(np.stack(cavs)).T).numpy()  # (n, runs): grad_A f(x) . v
        share = (derivatives > 0).mean(0)
        scores[:, j] = share[: len(sets) * n_random].reshape(len(sets), n_random)
        magnitude[:, j] = derivatives.mean(0)[: len(sets) * n_random].reshape(len(sets), n_random)
        null[j] = share[len(sets) * n_random :]
        for c in range(len(sets)):
            cav_list[c].append(np.stack(cavs[c * n_random : (c + 1) * n_random]))
        accuracy[:, j] = np.asarray(accs[: len(sets) * n_random]).reshape(len(sets), n_random)
    p = np.array([[_p_value(scores[c, j], null[j]) for j in range(len(names))] for c in range(len(sets))])
    extra = {
        "names": [f"{c}@{layer}" for c in sets for layer in names],
        "p_values": p.ravel(),
        "significant": (p < alpha).ravel().tolist(),
        "scores": scores.reshape(-1, n_random),
        "random_scores": null,
        "cav_accuracy": accuracy.reshape(-1, n_random),
        "magnitudes": magnitude.reshape(-1, n_random),
        "cavs": [cav for per_concept in cav_list for cav in per_concept],
        "concepts": list(sets),
        "layers": names,
        "unit": "concept",
    }
    return torch.from_numpy(scores.mean(2).ravel()), extra
