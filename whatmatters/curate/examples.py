"""``whatmatters.curate.score``: which training examples matter, and the scores from a model's training.

Every score is an :class:`~whatmatters.core.importance.Importance` with ``unit="example"`` and one value per
example (``per_sample=False``, shape ``(n,)``): ``imp.top(k)`` lists the ``k`` highest-scoring examples. High
means hard, atypical or harmful: mislabelled examples score high on every method here.

* ``loss``: the cross-entropy of each example, averaged over the models given.
* ``el2n``: the L2 norm of the error vector ``softmax(f(x)) - onehot(y)`` (Paul et al. 2021).
* ``grand``: the norm of each example's loss gradient (GraNd, Paul et al. 2021), vectorized per sample.
* ``forgetting``: forgetting events during training (Toneva et al. 2019), from a ``TrainingRun`` or a
  ``ForgettingRecorder``.

EL2N and GraNd are meant "early in training, averaged over seeds": pass ``train_models(...).models(epoch=2)``
(a list of models, one per seed) and the scores are the mean over them.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn.functional as F

from whatmatters.core.errors import MethodError
from whatmatters.core.fractions import whole
from whatmatters.core.importance import Importance
from whatmatters.core.registry import get_method, scorer
from whatmatters.core.state import preserved
from whatmatters.core.task import check_params
from whatmatters.curate.example_task import ExampleTask, make_example_task
from whatmatters.curate.gradients import per_sample_gradients


def score(
    model: Any = None,
    data: Any = None,
    method: str = "el2n",
    *,
    y: Any = None,
    test_data: Any = None,
    test_y: Any = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool | None = None,
    **params: Any,
) -> Importance:
    """Score training examples with a curate ``method`` (``whatmatters.methods(verb="curate")``).

    Args:
        model: a torch classifier returning class logits, a list of them (seeds: scores are averaged), a list of
            :class:`~whatmatters.curate.training.Checkpoint`, a :class:`~whatmatters.curate.training.TrainingRun`
            (``train_models``), a :class:`~whatmatters.curate.training.ForgettingRecorder` (``forgetting``), or
            None for model-free methods (``lexrank``). It is not changed: mode, ``requires_grad``, gradients,
            hooks and weights are as before, even on error; models are scored in eval mode.
        data: the training examples ``(n, ...)`` (tensor, array, DataFrame); embeddings or texts for ``lexrank``.
        method: ``"loss"``, ``"el2n"``, ``"grand"``, ``"forgetting"``, ``"tracin"``, ``"trak"``, ``"lexrank"``,
            ``"gais"`` (label consistency over a kNN graph of the rows; needs ``y``, no model).
        y: one class index per example.
        test_data, test_y: examples whose loss the influence methods (``tracin``, ``trak``) explain; without
            them they score self-influence.
        batch_size: rows per forward / per-sample gradient batch (memory bound).
        **params: the method's own parameters (``whatmatters.describe(method)``).

    Returns:
        An :class:`Importance` with ``unit="example"`` and one score per example.
    """
    if not isinstance(method, str):
        raise MethodError(f"method must be a method name (str), got {method!r}; whatmatters.methods() lists them")
    info = get_method(method)
    if info.verb != "curate":
        raise MethodError(f"{method!r} is a {info.verb} method, not a curate method; use whatmatters.{info.verb}")
    check_params(info.name, params, info.defaults)
    batch_size = whole(batch_size, "batch_size")
    task = make_example_task(
        model, data, y, needs=info.needs, test_data=test_data, test_y=test_y,
        seed=seed, batch_size=batch_size, progress=progress, method=info.name,
    )  # fmt: skip
    models = {id(m): m for m in [*task.models, *(c.model for c in task.checkpoints)]}.values()
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(preserved(m)).eval()
        task.check_models()
        start = time.perf_counter()
        out = info.fn(task, **params)  # values, or (values, extra)
        seconds = time.perf_counter() - start
    out = (out[0].detach(), out[1]) if isinstance(out, tuple) else out.detach()
    return info.to_importance(out, unit="example", params=params, seed=seed, seconds=seconds)


def _mean_over_models(task: ExampleTask, per_model) -> torch.Tensor:
    return torch.stack([per_model(m).double().cpu() for m in task.need_models()]).mean(0)


@scorer("loss", verb="curate", units="example", family="training dynamics", needs="gradients", per_sample=False)
def example_loss(task: ExampleTask) -> torch.Tensor:
    """Cross-entropy loss of each example, averaged over the models given."""

    def cross_entropy(m):
        logits = task.logits(m)
        return F.cross_entropy(logits, task.y.to(logits.device), reduction="none")

    return _mean_over_models(task, cross_entropy)


@scorer("el2n", verb="curate", units="example", family="training dynamics", needs="gradients", per_sample=False)
def el2n(task: ExampleTask) -> torch.Tensor:
    """EL2N: ``||softmax(f(x)) - onehot(y)||_2`` per example, averaged over models (seeds) early in training."""

    def error_norm(m):
        probs = task.logits(m).softmax(1)
        return (probs - F.one_hot(task.y.to(probs.device), probs.shape[1]).to(probs.dtype)).norm(dim=1)

    return _mean_over_models(task, error_norm)


@scorer("grand", verb="curate", units="example", family="training dynamics", needs="gradients", per_sample=False)
def grand(task: ExampleTask) -> torch.Tensor:
    """GraNd: the L2 norm of each example's loss gradient (per-sample, vmap), averaged over models (seeds)."""

    def gradient_norm(m):
        return torch.cat([g.norm(dim=1) for g in per_sample_gradients(task, m, task.inputs, task.y)])

    return _mean_over_models(task, gradient_norm)


@scorer("forgetting", verb="curate", units="example", family="training dynamics", needs="training", per_sample=False)
def forgetting(task: ExampleTask, *, never_learned: str = "max") -> torch.Tensor:
    """Forgetting events (correct, then incorrect) per example during training, averaged over seeds.

    ``never_learned="max"`` counts an example never predicted correctly as forgotten once more than any other.
    """
    return torch.stack([r.counts(never_learned) for r in task.recorders]).mean(0)
