"""Layer-wise relevance propagation: the ``lrp`` scorers and the public LRP API.

``whatmatters.explain.lrp`` is where users import LRP from: ``lrp`` (relevance of any torch model with a
rule composite), ``layer_relevance``, AttnLRP for Llama-family LMs (``lm_lrp``, ``token_relevance``),
composites, rules and canonizers. The machinery lives in :mod:`whatmatters.explain._lrp`.

Relevance of the target logit is propagated back to the input with a rule composite. Images
``(n, C, H, W)`` give pixel maps ``(n, H, W)`` (relevance summed over channels, so the map still sums
to the propagated logit); other inputs give one value per input element.
"""

from __future__ import annotations

from typing import Any

import torch

from whatmatters.core.registry import scorer
from whatmatters.core.task import Task
from whatmatters.explain._lrp import (
    COMPOSITES,
    RULES,
    Composite,
    LMRelevance,
    Rule,
    attached,
    constant_softmax,
    get_composite,
    layer_relevance,
    lm_lrp,
    lrp,
    merge_batchnorm,
    register_composite,
    token_relevance,
)
from whatmatters.explain._lrp.core import relevance
from whatmatters.explain._lrp.lm import is_language_model
from whatmatters.explain._lrp.lm import layer_relevance as lm_layer_relevance


def _run(task: Task, composite: str, canonize: bool, params: dict[str, Any]) -> tuple[torch.Tensor, dict]:
    model = task.torch_model
    size = task.batch_size or task.rows_per_call()
    rel, _ = relevance(model.module, model.to_model(task.inputs), None, composite, canonize=canonize, batch_size=size,
                 choose=lambda logits, rows: task.targets_for(logits, task.target[rows], rows), **params)  # fmt: skip
    values = rel.sum(1) if rel.ndim == 4 else rel
    total = values.flatten(1).sum(1)
    return values, {"relevance_sum": total.tolist()}


LRP_METHOD: dict[str, Any] = {
    "family": "lrp", "units": ("feature", "pixel"), "needs": "module", "checks_target": True, "predicts_target": True,
}  # fmt: skip


@scorer("lrp", **LRP_METHOD)
def lrp_scorer(
    task: Task,
    *,
    composite: str = "epsilon_plus",
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    low: float = 0.0,
    high: float = 1.0,
    canonize: bool = True,
    rules: dict | None = None,
    softmax_functions: bool = False,
) -> tuple[torch.Tensor, dict]:
    """LRP with a rule composite (epsilon, epsilon_plus, epsilon_gamma_box, epsilon_alpha2_beta1, epsilon_plus_flat).

    ``low``/``high``: input bounds for the z-beta box rule (epsilon_gamma_box). ``canonize`` folds
    BatchNorm into the preceding layer (on a copy). ``rules`` maps layer names to rule names.
    LayerNorm and Softmax modules are handled conservatively, so ViTs work with any composite;
    ``softmax_functions`` also freezes functional softmax calls (Hugging Face eager attention).
    ``extra["relevance_sum"]`` holds each sample's total relevance (the logit, if conserved).
    """
    params = {"epsilon": epsilon, "gamma": gamma, "low": low, "high": high, "rules": rules}
    params["softmax_functions"] = softmax_functions
    return _run(task, composite, canonize, params)


@scorer("lrp_epsilon", **LRP_METHOD)
def lrp_epsilon(task: Task, *, epsilon: float = 1e-6, canonize: bool = True) -> tuple[torch.Tensor, dict]:
    """LRP-epsilon on every Linear and Conv layer (``epsilon=0``: LRP-0)."""
    return _run(task, "epsilon", canonize, {"epsilon": epsilon})


__all__ = [
    "COMPOSITES",
    "RULES",
    "Composite",
    "LMRelevance",
    "Rule",
    "attached",
    "constant_softmax",
    "get_composite",
    "is_language_model",
    "layer_relevance",
    "lm_layer_relevance",
    "lm_lrp",
    "lrp",
    "lrp_epsilon",
    "lrp_scorer",
    "merge_batchnorm",
    "register_composite",
    "token_relevance",
]
