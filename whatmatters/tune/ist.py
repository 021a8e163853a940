"""IST, importance-aware sparse tuning: train the layers that matter, learned from cheap suppression probes.

Each step a share of the layers (default 25 %) is drawn without replacement with probabilities ``sigmoid(score)``.
Every ``probe_every`` steps, on one batch and without gradients, ``probes`` half-sets of layers (drawn with
``sigmoid(-score)``: unimportant layers are tried more) have their adapters scaled by ``suppression``; each probe's
reward is ``exp(-loss)`` minus the probes' mean, and every suppressed layer's score moves by
``-lr * reward * p (1 - p)`` (REINFORCE through the sampling probability ``p``). A layer whose suppression leaves the
loss low (high reward) loses importance. The reference code (antgroup IST, ``ist.py``) keeps the opposite sign: its
high score marks a layer that can be suppressed; here higher = more important, like every ``Importance``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from whatmatters.core.errors import InputError
from whatmatters.core.fractions import kept_share, whole
from whatmatters.tune.layers import suppressed
from whatmatters.tune.tuner import LayerTuner


def _count(share: float, total: int) -> int:
    return min(total, max(1, round(share * total)))


class IST(LayerTuner):
    """Importance-aware sparse tuning (see the module docstring); ``probe_every=0`` gives random layer selection.

    Args:
        trainable: share of layers trained per step (default 0.25), or a whole number of layers.
        probe_every: steps between probes (default 10; 0 never probes: uniform random choice, the RST baseline).
        probes: probe forward passes per update (default 3).
        suppressed_share: share of layers suppressed per probe (default 0.5).
        suppression: factor on a suppressed layer's adapter output (default 0.25).
        lr: step size of the score update (default 10).
        Other arguments: see :class:`~whatmatters.tune.tuner.LayerTuner`.
    """

    method = "ist"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        trainable: float | int = 0.25,
        probe_every: int = 10,
        probes: int = 3,
        suppressed_share: float = 0.5,
        suppression: float = 0.25,
        lr: float = 10.0,
        **kwargs: Any,
    ) -> None:
        self.probe_every = whole(probe_every, "probe_every", minimum=0, meaning="steps between probes; 0: never")
        self.probes = whole(probes, "probes", minimum=2, meaning="probe passes per update, to compare them")
        self.suppressed_share = kept_share(suppressed_share, "suppressed_share", of="layers suppressed per probe")
        if not (isinstance(suppression, (int, float)) and 0 <= suppression < 1):
            raise InputError(f"suppression must be a factor in [0, 1) on a suppressed adapter, got {suppression!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise InputError(f"lr must be a positive number (the score update's step size), got {lr!r}")
        self.suppression, self.lr, self._trainable = float(suppression), float(lr), trainable
        self._scores: torch.Tensor | None = None
        super().__init__(model, **kwargs)

    @property
    def n_trainable(self) -> int:
        share = self._trainable
        if isinstance(share, int) and not isinstance(share, bool) and share >= 1:
            return whole(share, "trainable", maximum=self.n_layers, meaning="layers trained per step")
        return _count(kept_share(share, "trainable", of="layers trained per step"), self.n_layers)

    def scores(self) -> torch.Tensor:
        if self._scores is None:
            self._scores = torch.zeros(self.n_layers)
        return self._scores

    def _load_scores(self, scores: torch.Tensor) -> None:
        self._scores = scores.clone()

    def _draw(self, weights: torch.Tensor, k: int) -> torch.Tensor:
        return torch.multinomial(weights, k, replacement=False, generator=self.generator)

    def choose(self) -> list[int]:
        weights = torch.sigmoid(self.scores()) if self.probe_every else torch.ones(self.n_layers)
        return self._draw(weights, self.n_trainable).tolist()

    def update(self, batch: Any) -> None:
        if not self.probe_every or self.steps % self.probe_every:
            return
        m = _count(self.suppressed_share, self.n_layers)
        p_suppress = torch.sigmoid(-self.scores())
        masks = torch.zeros(self.probes, self.n_layers, dtype=torch.bool)
        for k in range(self.probes):
            for _ in range(10):  # distinct sets where the layer count allows
                masks[k] = False
                masks[k, self._draw(p_suppress, m)] = True
                if not any(torch.equal(masks[k], masks[j]) for j in range(k)):
                    break
        losses = torch.tensor([self._probe_loss(batch, mask) for mask in masks])
        rewards = torch.exp(-losses)
        rewards = rewards - rewards.mean()
        push = (rewards[:, None] * masks).sum(0) * p_suppress * (1 - p_suppress)
        self._scores = self.scores() - self.lr * push

    def _probe_loss(self, batch: Any, mask: torch.Tensor) -> float:
        names = [n for n, on in zip(self.names, mask.tolist()) if on]
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            with torch.no_grad(), suppressed(self.model, names, self.suppression):
                loss = self.loss_fn(self.model, batch)
        finally:
            for module, training in modes:
                module.training = training
        value = float(loss.detach())
        if not math.isfinite(value):
            raise InputError(f"a probe's loss is {value}; check the batch and the loss function")
        return value

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "trainable": self._trainable,
            "probe_every": self.probe_every,
            "probes": self.probes,
            "suppressed_share": self.suppressed_share,
            "suppression": self.suppression,
            "lr": self.lr,
        }
