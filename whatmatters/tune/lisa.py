"""LISA, layerwise importance sampling: a few uniformly drawn layers train, switched every ``interval`` steps.

Parameters outside every layer (embeddings, the head) train at every step. Unlike LMFlow's callback, a frozen
layer keeps no optimizer state (it is deleted when the layer is frozen), so memory really drops (LMFlow #729, #801).
"""

from __future__ import annotations

from typing import Any

import torch

from whatmatters.core.fractions import whole
from whatmatters.tune.tuner import LayerTuner


class LISA(LayerTuner):
    """Train ``n_layers`` uniformly drawn layers (default 2), drawn again every ``interval`` steps (default 20).

    Its ``importance()`` is the share of steps each layer trained: LISA samples uniformly and learns no scores.
    Other arguments: see :class:`~whatmatters.tune.tuner.LayerTuner`.
    """

    method = "lisa"

    def __init__(self, model: torch.nn.Module, *, n_layers: int = 2, interval: int = 20, **kwargs: Any) -> None:
        self._n = n_layers
        self.interval = whole(interval, "interval", meaning="steps between switching layers")
        super().__init__(model, **kwargs)
        self.n_active = whole(n_layers, "n_layers", maximum=self.n_layers, meaning="layers trained at once")

    def choose(self) -> list[int]:
        if self.active and self.steps % self.interval:
            return list(self.active)
        n = whole(self._n, "n_layers", maximum=self.n_layers, meaning="layers trained at once")
        return torch.randperm(self.n_layers, generator=self.generator)[:n].tolist()

    def scores(self) -> torch.Tensor:
        return self.trainable_share()

    def params(self) -> dict[str, Any]:
        return {**super().params(), "n_layers": self._n, "interval": self.interval}
