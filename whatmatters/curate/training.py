"""Short training runs for example scores: checkpoints over seeds and epochs, and forgetting events.

EL2N and GraNd are computed "early in training, averaged over seeds", TracIn sums over saved checkpoints and
forgetting counts need a record of each example's correctness while it is trained on. :func:`train_models`
trains copies of a torch classifier for a few epochs over several seeds and keeps all three;
:class:`ForgettingRecorder` is the record a user keeps in their own training loop.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.fractions import whole
from whatmatters.core.state import parameter_device_dtype
from whatmatters.core.task import progress_bar


@dataclass(frozen=True)
class Checkpoint:
    """A model saved during training and the learning rate in use while it was trained (TracIn's weight)."""

    model: nn.Module
    lr: float = 1.0
    seed: int = 0
    epoch: int = 0


class ForgettingRecorder:
    """Counts forgetting events (Toneva et al. 2019): an example predicted correctly, then incorrectly.

    Call :meth:`record` with every mini-batch's logits (before the optimizer step, as the paper does) and the
    indices of its examples, or once per epoch with the logits of the whole data set. ``counts()`` gives one
    forgetting count per example; examples never predicted correctly count as forgotten more often than any
    other (``never_learned="max"``), so unlearnable (often mislabelled) examples rank first.
    """

    def __init__(self, n: int) -> None:
        self.n = whole(n, "n", meaning="the number of training examples")
        self.correct = torch.zeros(self.n, dtype=torch.bool)
        self.learned = torch.zeros(self.n, dtype=torch.bool)
        self.forgotten = torch.zeros(self.n, dtype=torch.long)
        self.seen = torch.zeros(self.n, dtype=torch.long)

    def record(self, logits: torch.Tensor, y: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Update the counts with predictions ``logits`` ``(b, classes)`` for labels ``y`` of examples ``indices``."""
        logits, y = torch.as_tensor(logits).detach(), torch.as_tensor(y).detach()
        idx = torch.arange(self.n) if indices is None else torch.as_tensor(indices).detach().cpu().long()
        if logits.ndim != 2 or logits.shape[0] != len(idx) or y.shape != (len(idx),):
            raise InputError(
                f"record() needs logits (b, classes), labels (b,) and indices (b,); got shapes "
                f"{tuple(logits.shape)}, {tuple(y.shape)} and {tuple(idx.shape)} (without indices b = n = {self.n})"
            )
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise InputError(f"indices must be in [0, {self.n}), got {int(idx.min())}..{int(idx.max())}")
        now = (logits.argmax(1) == y.to(logits.device)).cpu()
        self.forgotten[idx] += (self.correct[idx] & ~now).long()
        self.correct[idx] = now
        self.learned[idx] |= now
        self.seen[idx] += 1

    def counts(self, never_learned: str = "max") -> torch.Tensor:
        """Forgetting events per example (float); ``never_learned``: ``"max"`` (max count + 1) or ``"zero"``."""
        if never_learned not in ("max", "zero"):
            raise InputError(f"never_learned must be 'max' or 'zero', got {never_learned!r}")
        if not bool((self.seen > 0).any()):
            raise InputError("the forgetting recorder has recorded nothing; call record() during training")
        counts = self.forgotten.double()
        if never_learned == "max":
            counts = torch.where(self.learned, counts, counts.max() + 1)
        return counts


@dataclass
class TrainingRun:
    """What :func:`train_models` keeps: checkpoints after every epoch of every seed, and forgetting records."""

    checkpoints: list[Checkpoint]
    recorders: list[ForgettingRecorder] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted({c.seed for c in self.checkpoints})

    @property
    def epochs(self) -> int:
        return max(c.epoch for c in self.checkpoints)

    def models(self, epoch: int | None = None) -> list[nn.Module]:
        """One model per seed after ``epoch`` (1-based; default the last): the ensemble EL2N/GraNd average over."""
        epoch = self.epochs if epoch is None else whole(epoch, "epoch", maximum=self.epochs)
        return [c.model for c in self.checkpoints if c.epoch == epoch]


def _fresh_model(make_model: Callable[[], nn.Module] | nn.Module, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(make_model, nn.Module):
            model = copy.deepcopy(make_model)
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        elif callable(make_model):
            model = make_model()
        else:
            raise ModelError(f"make_model must be an nn.Module or a callable returning one, got {make_model!r}")
    if not isinstance(model, nn.Module):
        raise ModelError(f"make_model() returned a {type(model).__name__}, not an nn.Module")
    return model


def train_models(
    make_model: Callable[[], nn.Module] | nn.Module,
    data: Any,
    y: Any,
    *,
    epochs: int = 3,
    seeds: int | Sequence[int] = 3,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    progress: bool | None = None,
) -> TrainingRun:
    """Train a classifier for a few ``epochs`` with SGD over several ``seeds``, keeping every epoch's checkpoint.

    ``make_model`` is a callable returning a fresh model (called under each seed) or a model whose copies are
    re-initialised per seed (``reset_parameters`` of its modules); the given model itself is never trained.
    Forgetting events are recorded on every mini-batch before the optimizer step. The loss is cross-entropy
    on the model's class logits.
    """
    from whatmatters.curate.example_task import check_examples

    x, labels = check_examples(data, y)
    epochs = whole(epochs, "epochs")
    batch_size = whole(batch_size, "batch_size")
    seed_list = list(range(whole(seeds, "seeds"))) if not isinstance(seeds, Sequence) else list(seeds)
    if not seed_list:
        raise InputError("seeds is empty; give a count (e.g. seeds=3) or a list of seeds")
    checkpoints, recorders = [], []
    n = len(x)
    steps = [(s, e) for s in seed_list for e in range(epochs)]
    model = optimizer = recorder = order = None
    for seed, epoch in progress_bar(steps, len(steps), "training", progress):
        if epoch == 0:
            model = _fresh_model(make_model, seed)
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
            recorder = ForgettingRecorder(n)
            recorders.append(recorder)
            order = torch.Generator().manual_seed(seed)
        device, dtype = parameter_device_dtype(model)
        for idx in torch.randperm(n, generator=order).split(batch_size):
            xb = x[idx].to(device, dtype if x.is_floating_point() else x.dtype)
            yb = labels[idx].to(device)
            logits = model(xb)
            recorder.record(logits, yb, idx)
            loss = nn.functional.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        saved = copy.deepcopy(model).eval()
        checkpoints.append(Checkpoint(saved, lr=lr, seed=seed, epoch=epoch + 1))
    return TrainingRun(checkpoints, recorders)
