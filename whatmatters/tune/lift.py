"""LIFT (Liu et al. 2025, "LIFT the Veil for the Truth"): fine-tune only the principal weights.

A weight's importance is its magnitude after a rank-``r`` approximation of its matrix, ``|W_r|`` with
``W_r = U_r S_r V_rᵀ`` (the truncated SVD); the top ``fraction`` (default 5 %) of each matrix's entries are
the only ones updated. They are stored sparsely: each chosen layer keeps its weight frozen and holds a trainable
vector of ``k`` values at fixed flat indices, added to the weight in the forward pass (``index_add``), so the
gradient and the optimizer state (Adam: two moments) exist only for those ``k`` entries. ``score="magnitude"``
picks the top ``|W|`` entries instead (the magnitude-sparse baseline at the same count). ``reselect_every``
(optional) folds the learned values into the weights, scores the updated matrices again and restarts the
values (and their optimizer state) at the new principal entries.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.compress.api import WeightTask
from whatmatters.core.errors import InputError
from whatmatters.core.fractions import kept_share, whole
from whatmatters.core.registry import scorer
from whatmatters.tune.memory import base_optimizer
from whatmatters.tune.sparse import SparseTuner, checked_weight

SCORES = ("principal", "magnitude")


def default_rank(shape: tuple[int, ...]) -> int:
    """The rank used when none is given: ``min(out, in) // 16``, at least 1 (24 for a 384-wide MiniLM layer)."""
    return max(1, min(shape) // 16)


def principal_magnitude(weight: torch.Tensor, rank: int | None = None, *, name: str = "weight") -> torch.Tensor:
    """``|W_r|``: the entries' magnitudes in the best rank-``rank`` approximation of ``weight`` (float32)."""
    weight = checked_weight(name, weight)
    if weight.dim() != 2:
        raise InputError(f"{name!r} is not a matrix (shape {tuple(weight.shape)}); LIFT scores 2-d weights")
    r = (
        default_rank(weight.shape)
        if rank is None
        else whole(
            rank,
            "rank",
            maximum=min(weight.shape),
            meaning=f"of the approximation of {name!r}, shape {tuple(weight.shape)}",
        )
    )
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).abs()


@scorer(
    "principal_magnitude",
    aliases=("lift",),
    verb="compress",
    units="weight",
    family="weight",
    needs="module",
    per_sample=False,
)
def principal_magnitude_scores(task: WeightTask, *, rank: int | None = None) -> dict[str, torch.Tensor]:
    """LIFT's principal weights: ``|W_r|``, the magnitude after a rank-``rank`` SVD approximation of each matrix
    (default rank ``min(out, in) // 16``); no data needed."""
    return {n: principal_magnitude(w, rank, name=n) for n, w in task.weights().items()}


class SparseDeltaLinear(nn.Module):
    """An ``nn.Linear`` whose weight is frozen except ``k`` entries: ``W + scatter(values at index)``."""

    def __init__(self, linear: nn.Linear, index: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        self.register_buffer("index", index.to(self.weight.device))
        self.values = nn.Parameter(torch.zeros(len(index), dtype=self.weight.dtype, device=self.weight.device))

    def current_weight(self) -> torch.Tensor:
        return self.weight.reshape(-1).index_add(0, self.index, self.values).view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.current_weight(), self.bias)

    @torch.no_grad()
    def fold(self) -> None:
        """Add the values into the frozen weight and set them to zero."""
        self.weight.view(-1).index_add_(0, self.index, self.values)
        self.values.zero_()


class LIFT(SparseTuner):
    """Principal-weight sparse fine-tuning (see the module docstring).

    Args:
        model: any torch model (copied, never changed); its ``nn.Linear`` layers matching ``modules`` are tuned.
        fraction: share of each matrix's entries updated, in (0, 1] (default 0.05).
        rank: rank of the approximation (default per layer: ``min(out, in) // 16``); an int in [1, min(out, in)].
        score: ``"principal"`` (LIFT, ``|W_r|``) or ``"magnitude"`` (``|W|``, the baseline).
        reselect_every: steps between re-selections (0, the default: the entries stay fixed).
        modules: regex on module names choosing the linear layers (default: all).
        train: regex on parameter names trained in full besides (e.g. a new classifier head ``r"^head\\."``).
    """

    method = "lift"

    def __init__(
        self,
        model: nn.Module,
        *,
        fraction: float = 0.05,
        rank: int | None = None,
        score: str = "principal",
        reselect_every: int = 0,
        modules: str | None = None,
        train: str | None = None,
    ) -> None:
        self.fraction = kept_share(fraction, "fraction", of="each matrix's entries updated")
        if score not in SCORES:
            raise InputError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        if rank is not None:
            whole(rank, "rank", meaning="of the low-rank approximation")
        self.rank, self.score = rank, score
        self.reselect_every = whole(reselect_every, "reselect_every", minimum=0, meaning="steps; 0: never")
        super().__init__(model, modules=modules, train=train)

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if self.score == "magnitude":
            return checked_weight(name, weight).abs().float()
        return principal_magnitude(weight, self.rank, name=name)

    def _index(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        k = max(1, round(self.fraction * weight.numel()))
        return torch.topk(self.scores(name, weight).reshape(-1), k, sorted=False).indices.sort().values

    def wrap(self, name: str, linear: nn.Linear) -> nn.Module:
        return SparseDeltaLinear(linear, self._index(name, linear.weight))

    def unwrap(self, module: nn.Module) -> nn.Linear:
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain = plain.to(device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(module.current_weight())
            if module.bias is not None:
                plain.bias.copy_(module.bias)
        plain.weight.requires_grad_(False)
        return plain

    def after_step(self, optimizer: Any) -> None:
        if self.reselect_every and self.steps % self.reselect_every == 0:
            self.reselect(optimizer)

    @torch.no_grad()
    def reselect(self, optimizer: Any = None) -> None:
        """Fold the learned values into the weights and choose the top entries of the updated matrices again;
        the values restart at 0 and their optimizer state is dropped."""
        state = base_optimizer(optimizer).state if optimizer is not None else None
        for name, layer in self.layers.items():
            layer.fold()
            layer.index.copy_(self._index(name, layer.weight))
            if state is not None:
                state.pop(layer.values, None)

    def layer_rows(self) -> list[dict[str, Any]]:
        """Per tuned layer: its shape, the rank of the approximation, the entries updated, their mean change."""
        return [
            {
                "layer": name,
                "shape": "x".join(map(str, layer.weight.shape)),
                "rank": default_rank(layer.weight.shape) if self.rank is None else self.rank,
                "entries updated": layer.values.numel(),
                "mean |change|": f"{float(layer.values.detach().abs().mean()):.2e}",
            }
            for name, layer in self.layers.items()
        ]

    def masks(self) -> dict[str, torch.Tensor]:
        """Each tuned layer's boolean ``(out, in)`` mask of the entries it updates."""
        out = {}
        for name, layer in self.layers.items():
            mask = torch.zeros(layer.weight.numel(), dtype=torch.bool, device=layer.weight.device)
            mask[layer.index] = True
            out[name] = mask.view_as(layer.weight)
        return out
