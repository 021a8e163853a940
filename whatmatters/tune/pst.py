"""PST (Li et al. 2023, "Parameter-Efficient Sparsity for Large Language Models Fine-Tuning"): prune while
fine-tuning, with an importance that costs a fraction of the weight matrix's memory.

Each tuned layer computes ``W' = (W + s * B A) * M`` (``W`` frozen, ``B A`` a LoRA update, ``s = 2``) where the
mask ``M`` keeps the top ``1 - sparsity`` of its importance ``S``:

* ``"pst"``: ``S = |W| / mean|W| + P Q + r 1ᵀ + 1 cᵀ``: the data-free magnitude (scaled to mean 1) plus a
  data-driven part that is never stored as a matrix: a rank-``score_rank`` product ``P Q`` and a row and a column
  vector (structure), all trainable, learned through the straight-through mask (``dL/dS = dL/dW' * (W + s B A)``,
  as movement pruning);
* ``"movement"``: ``S`` a full trainable ``(out, in)`` matrix (movement pruning, Sanh et al. 2020);
* ``"magnitude"``: ``S = |W|`` (nothing learned).

The sparsity follows a cubic schedule (Zhu & Gupta 2017) from 0 to the target between ``ramp[0]`` and
``ramp[1]`` of ``steps``; ``tuner.step()`` once per step advances it. ``merged()`` prunes at the target.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core.errors import InputError
from whatmatters.core.fractions import removed_share, whole
from whatmatters.tune.sparse import SparseTuner, checked_weight

MODES = ("pst", "movement", "magnitude")


def cubic_sparsity(step: int, target: float, steps: int, ramp: tuple[float, float] = (0.1, 0.7)) -> float:
    """The sparsity at ``step``: 0 until ``ramp[0] * steps``, ``target`` from ``ramp[1] * steps``, and
    ``target * (1 - (1 - t)^3)`` between (``t`` the share of the ramp done)."""
    first, last = ramp[0] * steps, ramp[1] * steps
    if step <= first:
        return 0.0
    if step >= last:
        return float(target)
    return float(target * (1 - (1 - (step - first) / (last - first)) ** 3))


class SparseLoRALinear(nn.Module):
    """``(W + s B A) * M``, ``M`` the top ``1 - sparsity`` of the importance (module docstring)."""

    def __init__(self, linear: nn.Linear, mode: str, rank: int, score_rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.scaling, self.sparsity = mode, 2.0, 0.0
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        kw = {"dtype": self.weight.dtype, "device": self.weight.device}
        out, inp = self.weight.shape
        self.lora_A = nn.Parameter(torch.empty(rank, inp, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out, rank, **kw))
        magnitude = self.weight.detach().abs()
        self.register_buffer("magnitude", magnitude / magnitude.mean().clamp_min(1e-12))
        if mode == "pst":
            self.score_P = nn.Parameter(torch.randn(out, score_rank, **kw) / math.sqrt(score_rank))
            self.score_Q = nn.Parameter(torch.zeros(score_rank, inp, **kw))
            self.score_row = nn.Parameter(torch.zeros(out, **kw))
            self.score_col = nn.Parameter(torch.zeros(inp, **kw))
        elif mode == "movement":
            self.score = nn.Parameter(torch.zeros(out, inp, **kw))

    def importance(self) -> torch.Tensor:
        """The score ``S`` whose top entries are kept (differentiable for ``pst`` / ``movement``)."""
        if self.mode == "pst":
            return self.magnitude + self.score_P @ self.score_Q + self.score_row[:, None] + self.score_col[None, :]
        if self.mode == "movement":
            return self.score
        return self.magnitude

    def mask(self, sparsity: float | None = None) -> torch.Tensor:
        """The straight-through mask: its value is 0/1, its gradient flows to the learned score."""
        scores = self.importance()
        flat = scores.reshape(-1)
        drop = round((self.sparsity if sparsity is None else sparsity) * flat.numel())
        hard = torch.zeros_like(flat)
        hard[torch.topk(flat.detach(), flat.numel() - drop, sorted=False).indices] = 1
        hard = hard.view_as(scores)
        return hard + scores - scores.detach() if scores.requires_grad else hard

    def dense_weight(self) -> torch.Tensor:
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight() * self.mask(), self.bias)


class PST(SparseTuner):
    """Sparse fine-tuning to a target sparsity (see the module docstring).

    Args:
        model: any torch model (copied, never changed); its ``nn.Linear`` layers matching ``modules`` are tuned.
        sparsity: the target share of each matrix's weights pruned, in [0, 1) (default 0.5).
        steps: the training steps the schedule spans.
        method: ``"pst"``, ``"movement"`` or ``"magnitude"``.
        rank: rank of the LoRA weight update (default 8); score_rank: rank of PST's score factors (default 8);
            each in [1, min(out, in)] of every tuned layer.
        ramp: the shares of ``steps`` where the cubic ramp starts and ends (default (0.1, 0.7)).
        modules / train: as for :class:`~whatmatters.tune.lift.LIFT`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sparsity: float = 0.5,
        steps: int,
        method: str = "pst",
        rank: int = 8,
        score_rank: int = 8,
        ramp: tuple[float, float] = (0.1, 0.7),
        modules: str | None = None,
        train: str | None = None,
    ) -> None:
        self.target = removed_share(sparsity, "sparsity", of="each matrix's weights pruned", example="0.5")
        if method not in MODES:
            raise InputError(f"method must be one of {', '.join(MODES)}, got {method!r}")
        self.total = whole(steps, "steps", meaning="training steps the sparsity schedule spans")
        self.rank = whole(rank, "rank", meaning="of the LoRA update")
        self.score_rank = whole(score_rank, "score_rank", meaning="of PST's score factors")
        ok = len(ramp) == 2 and all(isinstance(v, (int, float)) for v in ramp) and 0 <= ramp[0] < ramp[1] <= 1
        if not ok:
            raise InputError(f"ramp must be two shares of the steps, 0 <= start < end <= 1, got {ramp!r}")
        self.method, self.ramp = method, (float(ramp[0]), float(ramp[1]))
        super().__init__(model, modules=modules, train=train)

    def wrap(self, name: str, linear: nn.Linear) -> nn.Module:
        checked_weight(name, linear.weight)
        most = min(linear.weight.shape)
        meaning = f"at most min(out, in) = {most} of {name!r}"
        whole(self.rank, "rank", maximum=most, meaning=meaning)
        if self.method == "pst":
            whole(self.score_rank, "score_rank", maximum=most, meaning=meaning)
        return SparseLoRALinear(linear, self.method, self.rank, self.score_rank)

    @property
    def sparsity(self) -> float:
        """The sparsity the schedule has reached."""
        return cubic_sparsity(self.steps, self.target, self.total, self.ramp)

    def after_step(self, optimizer: Any) -> None:
        for layer in self.layers.values():
            layer.sparsity = self.sparsity

    @torch.no_grad()
    def unwrap(self, module: nn.Module) -> nn.Linear:
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain = plain.to(device=module.weight.device, dtype=module.weight.dtype)
        plain.weight.copy_(module.dense_weight() * module.mask(self.target).detach())
        if module.bias is not None:
            plain.bias.copy_(module.bias)
        return plain

    def layer_rows(self) -> list[dict[str, Any]]:
        """Per tuned layer: its shape, the sparsity reached and the numbers its learned importance holds."""
        rows = []
        for name, layer in self.layers.items():
            with torch.no_grad():
                kept = float(layer.mask().mean())
            score = sum(p.numel() for n, p in layer.named_parameters() if n.startswith("score"))
            shape = "x".join(map(str, layer.weight.shape))
            rows.append({"layer": name, "shape": shape, "sparsity now": f"{1 - kept:.3f}", "score numbers": score})
        return rows

    def score_parameters(self) -> int:
        """How many numbers the learned importance holds (0 for magnitude)."""
        return sum(
            p.numel() for layer in self.layers.values() for n, p in layer.named_parameters() if n.startswith("score")
        )
