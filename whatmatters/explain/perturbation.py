"""Perturbation methods: remove a feature, watch the output change."""

from __future__ import annotations

from typing import Any

import torch

from whatmatters.core.registry import scorer
from whatmatters.core.task import Task
from whatmatters.explain.baselines import baseline_row


@scorer("ablation", family="perturbation", units="feature", aliases=("feature_ablation",))
def ablation(task: Task, *, baseline: Any = "mean") -> torch.Tensor:
    """Feature ablation: output drop when one feature is replaced by its baseline value.

    All ``n x d`` ablated copies go to the model in a few batched calls.
    """
    x = task.inputs
    d = x.shape[1]
    base = baseline_row(task, baseline)
    eye = torch.eye(d, dtype=torch.bool)
    variants = torch.where(eye, base, x.unsqueeze(1))  # (n, d, d): copy j has feature j ablated
    scores = task.score(torch.cat([x.unsqueeze(1), variants], dim=1), "ablation")
    return scores[:, :1] - scores[:, 1:]
