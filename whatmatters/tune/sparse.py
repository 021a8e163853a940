"""Shared parts of the weight-level sparse tuners (LIFT, PST): a new model whose chosen ``nn.Linear`` layers are
replaced by trainable sparse wrappers, everything else frozen unless ``train=`` names it.

The user's model is deep-copied first and never changed. ``tuner.model`` is the model to train,
``tuner.parameters()`` what to give the optimizer, ``tuner.step(optimizer)`` the one call per step (after
``loss.backward()``: it steps the optimizer), ``tuner.merged()`` a plain torch model with the learned weights folded in.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import ModelError
from whatmatters.tune.memory import training_bytes


def checked_weight(name: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight, detached; ``ModelError`` when it holds NaN or inf (importance would be meaningless)."""
    weight = weight.detach()
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ModelError(
            f"the weight of {name!r} holds {bad} NaN or infinite values; load a finite checkpoint before tuning"
        )
    return weight


def linear_layers(model: nn.Module, modules: str | None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose names match the regex ``modules`` (default: every one)."""
    regex = re.compile(modules) if modules else None
    found = {n: m for n, m in model.named_modules() if n and isinstance(m, nn.Linear)}
    chosen = {n: m for n, m in found.items() if regex is None or regex.search(n)}
    if not chosen:
        names = ", ".join(list(found)[:5]) or "none"
        raise ModelError(
            f"no nn.Linear layer matches modules={modules!r} (the model's linear layers: {names}); pass a regex "
            "that matches some of them, e.g. modules=r'encoder\\.'"
        )
    return chosen


class SparseTuner:
    """Base of :class:`~whatmatters.tune.lift.LIFT` and :class:`~whatmatters.tune.pst.PST`.

    Subclasses define ``wrap(name, linear) -> nn.Module`` (the trainable replacement of one layer) and
    ``unwrap(module) -> nn.Linear`` (the plain layer with what was learned folded in).
    """

    method = "sparse"

    def __init__(self, model: nn.Module, *, modules: str | None = None, train: str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"a sparse tuner needs a torch nn.Module, got {type(model).__name__}")
        self.modules, self.train = modules, train
        self._flags = {n: p.requires_grad for n, p in model.named_parameters()}
        new = copy.deepcopy(model)
        keep = re.compile(train) if train else None
        for name, p in new.named_parameters():
            p.requires_grad_(bool(keep and keep.search(name)))
        self.layers: dict[str, nn.Module] = {}
        for name, linear in linear_layers(new, modules).items():
            wrapped = self.wrap(name, linear)
            _replace(new, name, wrapped)
            self.layers[name] = wrapped
        self.model = new
        self.steps = 0
        self._optimizer: Any = None
        self.sparsities: list[float] = []
        self.peak = {"gradients": 0, "optimizer_state": 0}

    def wrap(self, name: str, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def unwrap(self, module: nn.Module) -> nn.Linear:
        raise NotImplementedError

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters of ``self.model`` (give these to the optimizer)."""
        return (p for p in self.model.parameters() if p.requires_grad)

    @property
    def trainable(self) -> int:
        """How many numbers train (the sparse values, factors and the ``train=`` parameters)."""
        return sum(p.numel() for p in self.parameters())

    def step(self, optimizer: Any = None) -> None:
        """Once per training step, after ``loss.backward()``: ``optimizer.step()`` and ``zero_grad`` (with the
        gradient and optimizer-state bytes held recorded in ``peak``), then the tuner's own step (LIFT's
        re-selection, PST's sparsity schedule). Without an optimizer only the tuner's own step runs."""
        if optimizer is not None:
            self._measure("gradients", optimizer)
            optimizer.step()
            self._measure("optimizer_state", optimizer)
            optimizer.zero_grad(set_to_none=True)
        self._advance(optimizer)

    def _advance(self, optimizer: Any) -> None:
        self.steps += 1
        self.after_step(optimizer)
        self.sparsities.append(self.sparsity)

    @property
    def sparsity(self) -> float:
        """The share of each tuned matrix pruned now (0 unless the tuner prunes)."""
        return 0.0

    def _measure(self, what: str, optimizer: Any) -> None:
        self.peak[what] = max(self.peak[what], training_bytes(self.model, optimizer)[what])

    def after_step(self, optimizer: Any) -> None:
        """What a subclass does at the end of a step (re-selection, the sparsity schedule)."""

    def merged(self) -> nn.Module:
        """A new plain model: every wrapped layer back as an ``nn.Linear`` with what was learned folded in, every
        ``requires_grad`` flag as in the user's model."""
        new = copy.deepcopy(self.model)
        for name in self.layers:
            _replace(new, name, self.unwrap(new.get_submodule(name)))
        for name, p in new.named_parameters():  # requires_grad as in the user's model
            p.requires_grad_(self._flags.get(name, True))
        return new

    def callback(self) -> Any:
        """A ``transformers.TrainerCallback`` doing :meth:`step`'s part after the Trainer's own optimizer step
        (build the Trainer on ``tuner.model``)."""
        from transformers import TrainerCallback

        tuner = self

        class SparseTunerCallback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any):
                tuner._optimizer = optimizer

            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any):
                tuner._measure("gradients", tuner._optimizer)

            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any):
                tuner._measure("optimizer_state", tuner._optimizer)

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any):
                tuner._advance(tuner._optimizer)

        return SparseTunerCallback()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.layers)} layers, {self.trainable} trainable, step {self.steps})"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
