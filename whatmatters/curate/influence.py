"""Influence of training examples: TracIn over checkpoints and a TRAK-like projected-gradient estimator.

Both take per-sample gradients with ``torch.func`` (batched, never a loop over examples). With ``test_data``
a score is the mean influence of a training example on the test examples' loss (positive: training on it
lowers their loss, a proponent; negative: an opponent, e.g. a mislabelled example). Without test data the
score is *self-influence*, which is high for examples the model can only fit by memorising them (mislabelled,
atypical); TracIn's paper uses it to find label noise.
"""

from __future__ import annotations

import torch

from whatmatters.core.errors import MethodError
from whatmatters.core.fractions import whole
from whatmatters.core.registry import scorer
from whatmatters.core.state import parameter_device_dtype
from whatmatters.curate.example_task import ExampleTask
from whatmatters.curate.gradients import n_parameters, per_sample_gradients, projection


@scorer("tracin", verb="curate", units="example", family="influence", needs="gradients", per_sample=False)
def tracin(task: ExampleTask) -> torch.Tensor:
    """TracIn (Pruthi et al. 2020): ``sum over checkpoints of lr * grad loss(train) . grad loss(test)``.

    Checkpoints come from a ``TrainingRun`` (every epoch of every seed, averaged over seeds) or a list of
    ``Checkpoint(model, lr)``. The mean over test examples is one dot product per training example with the
    mean test gradient; without test data the score is self-influence ``sum lr * ||grad||^2``.
    """
    checkpoints = task.need_checkpoints()
    test = task.need_test()
    total = torch.zeros(task.n, dtype=torch.float64)
    for c in checkpoints:
        if test is not None:
            mean_test = sum(g.sum(0) for g in per_sample_gradients(task, c.model, *test)) / len(test[0])
            parts = [g @ mean_test for g in per_sample_gradients(task, c.model, task.inputs, task.y)]
        else:
            parts = [g.square().sum(1) for g in per_sample_gradients(task, c.model, task.inputs, task.y)]
        total += c.lr * torch.cat(parts).double().cpu()
    return total / len({c.seed for c in checkpoints})


def _projected(task: ExampleTask, model, x, y, matrix: torch.Tensor) -> torch.Tensor:
    return torch.cat([g @ matrix for g in per_sample_gradients(task, model, x, y, output="margin")])


@scorer("trak", verb="curate", units="example", family="influence", needs="gradients", per_sample=False)
def trak(
    task: ExampleTask, *, dim: int = 512, projection_kind: str = "rademacher", damping: float = 1e-3
) -> torch.Tensor:
    """TRAK-like influence (Park et al. 2023): random projections of per-sample margin gradients.

    For every model (seed or checkpoint): ``phi = P^T grad margin`` with a seeded ``(n_parameters, dim)``
    projection ``P``, the kernel ``K = Phi^T Phi + damping * mean(diag) * I`` and the score
    ``phi_test^T K^-1 phi_train * (1 - p_train)`` (the loss's weight on the margin), averaged over test
    examples and models. Without test data it is the self-influence ``phi_i^T K^-1 phi_i * (1 - p_i)``.
    Differences from the TRAK package: no sparse JL kernels (a dense projection: ``n_parameters * dim``
    floats of memory) and the scores of the models are averaged rather than their numerators and weights.
    """
    dim = whole(dim, "dim", meaning="the projection dimension")
    if not damping > 0:
        raise MethodError(f"damping must be > 0, got {damping!r}")
    test = task.need_test()
    scores = []
    for model in task.need_models():
        device, dtype = parameter_device_dtype(model)
        matrix = projection(n_parameters(model), dim, seed=task.seed, kind=projection_kind, device=device, dtype=dtype)
        phi = _projected(task, model, task.inputs, task.y, matrix).double()
        kernel = phi.T @ phi
        kernel += damping * kernel.diagonal().mean().clamp_min(1e-12) * torch.eye(dim, dtype=phi.dtype, device=device)
        probs = task.logits(model).softmax(1)
        weight = 1 - probs.gather(1, task.y.unsqueeze(1).to(device)).squeeze(1).double()
        if test is not None:
            query = _projected(task, model, *test, matrix).double().mean(0)
            influence = phi @ torch.linalg.solve(kernel, query)
        else:
            influence = (phi * torch.linalg.solve(kernel, phi.T).T).sum(1)
        scores.append((influence * weight).cpu())
    return torch.stack(scores).mean(0)
