"""Concept bottleneck models on a frozen model's features: the class is read from named concepts only.

- :func:`fit_cbm` (Koh et al. 2020): features -> concept probabilities -> class, a linear layer each, trained
  ``"joint"`` (class and concept losses together), ``"sequential"`` (concepts first, the class head on the
  predicted concepts) or ``"independent"`` (the class head on the true concepts).
- :func:`fit_pcbm` (post-hoc CBM, Yuksekgonul et al. 2023): the features are projected on a concept bank (unit
  concept vectors: CAVs fitted here from concept labels, or given, e.g. from :func:`concept_bank` on TCAV-style
  example sets), standardized, and a sparse elastic-net logistic regression (scikit-learn) reads the class from
  the concept scores; ``residual=True`` (PCBM-h) adds a linear head on the features for what the concepts miss.

Both return a :class:`Bottleneck` (an ``nn.Module`` on features): ``model(features)`` gives class logits,
``model.concept_scores(features)`` the concepts, ``model.intervene(features, {"cross": 1})`` the logits with
concepts set by hand. ``explain(model, features, method="concept_bottleneck")`` gives each concept's
contribution to the target logit per sample as a ``unit="concept"`` Importance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from whatmatters.core.adapters import to_tensor
from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task, guarded, make_task
from whatmatters.explain.layer_sites import layer_activations, layer_site
from whatmatters.explain.tcav import concept_sets, fit_cav

MODES = ("joint", "sequential", "independent")


class Bottleneck(nn.Module):
    """Class logits from concept scores (a linear head), optionally plus a residual linear head on the features.

    ``on`` / ``off`` are the score of a present / absent concept, what :meth:`intervene` sets for 1 / 0.
    """

    def __init__(self, n_features: int, names: Sequence[str], n_classes: int, residual: bool = False):
        super().__init__()
        self.names = [str(n) for n in names]
        k = len(self.names)
        self.head = nn.Linear(k, n_classes)
        self.residual = nn.Linear(n_features, n_classes) if residual else None
        self.register_buffer("on", torch.ones(k))
        self.register_buffer("off", torch.zeros(k))

    def concept_scores(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_scores(self, scores: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        out = self.head(scores)
        return out + self.residual(features) if self.residual is not None else out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.from_scores(self.concept_scores(features), features)

    def intervene(self, features: torch.Tensor, values: Mapping[str, Any]) -> torch.Tensor:
        """Class logits with the named concepts set: a value ``v`` (0..1, a float or one per sample) becomes the
        score ``off + v * (on - off)``; the other concepts keep their predicted scores."""
        unknown = [n for n in values if n not in self.names]
        if unknown:
            raise InputError(f"unknown concept(s) {unknown}; this bottleneck's concepts are {self.names}")
        with torch.no_grad():
            scores = self.concept_scores(features).clone()
            for name, value in values.items():
                j = self.names.index(name)
                v = torch.as_tensor(value, dtype=scores.dtype, device=scores.device)
                scores[:, j] = self.off[j] + v * (self.on[j] - self.off[j])
            return self.from_scores(scores, features)


class ConceptBottleneck(Bottleneck):
    """Concept probabilities ``sigmoid(Linear(features))`` read by a linear class head."""

    def __init__(self, n_features: int, names: Sequence[str], n_classes: int):
        super().__init__(n_features, names, n_classes)
        self.concepts = nn.Linear(n_features, len(self.names))

    def concept_scores(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.concepts(features))


class PosthocCBM(Bottleneck):
    """Standardized projections of the features on a bank of unit concept vectors, read by a sparse linear head."""

    def __init__(self, bank: torch.Tensor, names: Sequence[str], n_classes: int, residual: bool = False):
        super().__init__(bank.shape[1], names, n_classes, residual)
        self.register_buffer("bank", bank)
        self.register_buffer("mean", torch.zeros(len(bank)))
        self.register_buffer("scale", torch.ones(len(bank)))

    def concept_scores(self, features: torch.Tensor) -> torch.Tensor:
        return (features @ self.bank.T - self.mean) / self.scale


def _checked(features: Any, y: Any, concepts: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = to_tensor(features, "features")[0].float()
    labels = to_tensor(y, "y")[0]
    if x.ndim != 2 or len(x) != len(labels) or labels.ndim != 1:
        raise InputError(f"features must be (n, d) with one label each; got {tuple(x.shape)} and {len(labels)} labels")
    if (labels.is_floating_point() and not bool((labels == labels.round()).all())) or bool((labels < 0).any()):
        raise InputError("y must hold class indices 0, 1, ... (integers)")
    labels = labels.long()
    if len(labels.unique()) < 2 or int(torch.bincount(labels).max()) == len(labels):
        raise InputError("y needs at least 2 classes to fit a class head")
    if not bool(torch.isfinite(x).all()):
        raise InputError("features hold NaN or infinite values")
    c = None
    if concepts is not None:
        c = to_tensor(concepts, "concepts")[0].float()
        if c.shape != (len(x), c.shape[-1]) or c.ndim != 2:
            raise InputError(f"concepts must be (n, k) with one row per sample ({len(x)}); got {tuple(c.shape)}")
        if not bool(((c == 0) | (c == 1)).all()):
            raise InputError("concepts must be binary labels (0 = absent, 1 = present)")
    return x, labels, c


def _names(names: Sequence[str] | None, k: int) -> list[str]:
    names = [f"concept {i}" for i in range(k)] if names is None else [str(n) for n in names]
    if len(names) != k or len(set(names)) != k:
        raise InputError(f"concept_names must be {k} distinct names, one per concept; got {names}")
    return names


def _train(module: nn.Module, loss_fn: Any, params: list[nn.Parameter], epochs: int, lr: float, seed: int) -> None:
    """Full-batch Adam on ``loss_fn()`` (features are small: one batch)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-4)
    module.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    module.eval()


def fit_linear_head(features: Any, y: Any, *, epochs: int = 300, lr: float = 0.02, seed: int = 0) -> nn.Linear:
    """The black-box comparison: one linear layer from the features to the classes, trained like the CBMs."""
    x, labels, _ = _checked(features, y)
    head = nn.Linear(x.shape[1], int(labels.max()) + 1)
    _train(head, lambda: nn.functional.cross_entropy(head(x), labels), list(head.parameters()), epochs, lr, seed)
    return head


def fit_cbm(
    features: Any,
    concepts: Any,
    y: Any,
    *,
    concept_names: Sequence[str] | None = None,
    mode: str = "joint",
    concept_weight: float = 1.0,
    epochs: int = 300,
    lr: float = 0.02,
    seed: int = 0,
) -> ConceptBottleneck:
    """A concept bottleneck on ``features`` ``(n, d)`` with binary ``concepts`` ``(n, k)`` and class labels ``y``."""
    if mode not in MODES:
        raise MethodError(f"mode must be one of {list(MODES)}, got {mode!r}")
    x, labels, c = _checked(features, y, concepts)
    model = ConceptBottleneck(x.shape[1], _names(concept_names, c.shape[1]), int(labels.max()) + 1)
    bce, ce = nn.functional.binary_cross_entropy_with_logits, nn.functional.cross_entropy
    concept_loss = lambda: bce(model.concepts(x), c)  # noqa: E731
    if mode == "joint":
        loss = lambda: ce(model(x), labels) + concept_weight * concept_loss()  # noqa: E731
        _train(model, loss, list(model.parameters()), epochs, lr, seed)
        return model
    _train(model, concept_loss, list(model.concepts.parameters()), epochs, lr, seed)
    inputs = c if mode == "independent" else model.concept_scores(x).detach()
    head = model.head
    _train(model, lambda: ce(head(inputs), labels), list(head.parameters()), epochs, lr, seed)
    return model


def concept_bank(model: Any, layer: str, concepts: dict[str, Any], random: Any) -> tuple[torch.Tensor, list[str]]:
    """Unit concept vectors ``(k, d)`` at ``layer`` from example sets (``{name: examples}``, TCAV-style) against
    ``random`` examples: a linear classifier's normal per concept (scikit-learn, as TCAV's CAVs)."""
    with guarded(model):
        task = make_task(model, random)
        site = layer_site(task, layer)
        sets = concept_sets(task, concepts)
        rows = task.rows_per_call()
        negative = layer_activations(task, site, task.inputs, rows).flatten(1).double().cpu().numpy()
        bank = [
            fit_cav(layer_activations(task, site, x, rows).flatten(1).double().cpu().numpy(), negative, "logistic", 0)[
                0
            ]
            for x in sets.values()
        ]
    return torch.from_numpy(np.stack(bank)).float(), list(sets)


def fit_pcbm(
    features: Any,
    y: Any,
    *,
    concepts: Any = None,
    bank: Any = None,
    concept_names: Sequence[str] | None = None,
    l1_ratio: float = 0.5,
    C: float = 1.0,
    residual: bool = False,
    epochs: int = 300,
    lr: float = 0.02,
    seed: int = 0,
) -> PosthocCBM:
    """A post-hoc CBM on ``features``: the bank is ``bank`` ``(k, d)`` or CAVs fitted from binary ``concepts``
    ``(n, k)`` (each concept's positives vs negatives); ``C`` and ``l1_ratio`` set the elastic net (scikit-learn
    ``LogisticRegression(penalty="elasticnet", solver="saga")``); ``residual`` adds PCBM-h's residual head."""
    from sklearn.linear_model import LogisticRegression

    if (concepts is None) == (bank is None):
        raise InputError("give either concepts= (binary labels, (n, k)) or bank= (concept vectors, (k, d))")
    x, labels, c = _checked(features, y, concepts)
    if c is not None:
        counts = c.sum(0)
        if bool(((counts < 2) | (counts > len(c) - 2)).any()):
            raise InputError("every concept needs at least 2 samples with it and 2 without to fit its vector")
        xs = x.double().numpy()
        vectors = [fit_cav(xs[c[:, j] == 1], xs[c[:, j] == 0], "logistic", seed)[0] for j in range(c.shape[1])]
        bank = torch.from_numpy(np.stack(vectors)).float()
    bank = to_tensor(bank, "bank")[0].float()
    if bank.ndim != 2 or bank.shape[1] != x.shape[1]:
        raise InputError(
            f"bank must be (k, {x.shape[1]}) concept vectors in the features' space; got {tuple(bank.shape)}"
        )
    bank = bank / bank.norm(dim=1, keepdim=True).clamp_min(1e-12)
    model = PosthocCBM(bank, _names(concept_names, len(bank)), int(labels.max()) + 1, residual)
    raw = x @ bank.T
    model.mean.copy_(raw.mean(0))
    model.scale.copy_(raw.std(0).clamp_min(1e-6))
    scores = model.concept_scores(x)
    if c is not None:  # a present concept scores like the samples that have it
        model.on.copy_((scores * c).sum(0) / c.sum(0))
        model.off.copy_((scores * (1 - c)).sum(0) / (1 - c).sum(0))
    else:
        model.on.copy_(scores.quantile(0.95, dim=0))
        model.off.copy_(scores.quantile(0.05, dim=0))
    import sklearn

    # scikit-learn 1.8 deprecated penalty=: l1_ratio alone picks the elastic net there
    old = tuple(int(p) for p in sklearn.__version__.split(".")[:2]) < (1, 8)
    fit = LogisticRegression(
        **({"penalty": "elasticnet"} if old else {}), solver="saga", l1_ratio=l1_ratio, C=C, max_iter=2000
    )
    fit.fit(scores.double().numpy(), labels.numpy())
    weight, bias = torch.from_numpy(fit.coef_).float(), torch.from_numpy(fit.intercept_).float()
    if weight.shape[0] == 1:  # scikit-learn's binary case: one row for class 1
        weight, bias = torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros_like(bias), bias])
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    model.head.requires_grad_(False)
    if model.residual is not None:
        fixed = model.head(scores).detach()
        res = model.residual
        loss = lambda: nn.functional.cross_entropy(fixed + res(x), labels)  # noqa: E731
        _train(model, loss, list(res.parameters()), epochs, lr, seed)
    model.head.requires_grad_(True)
    return model.eval()


def embeddings(model: Any, data: Any, layer: str) -> torch.Tensor:
    """A frozen model's features: its ``layer``'s outputs for ``data``, flattened to ``(n, d)`` (model untouched)."""
    with guarded(model):
        task = make_task(model, data, 0)
        return layer_activations(task, layer_site(task, layer), task.inputs, task.rows_per_call()).flatten(1)


@scorer("concept_bottleneck", family="concept", units="feature", needs="module")
def concept_bottleneck(task: Task) -> tuple[torch.Tensor, dict[str, Any]]:
    """A concept bottleneck's concept contributions to the target logit: concept score x head weight, per sample.

    The model is a :class:`Bottleneck` (from :func:`fit_cbm` / :func:`fit_pcbm`) and the data its features.
    Values ``(n, k)``, ``unit="concept"``; with the head's bias (and a residual head's logit, ``extra["residual"]``)
    they sum to the target logit. ``extra``: ``concept_scores``, ``bias``.
    """
    module = task.torch_model.module
    if not isinstance(module, Bottleneck):
        raise MethodError("concept_bottleneck explains a Bottleneck from fit_cbm / fit_pcbm; fit one on the features")
    x = task.torch_model.to_model(task.inputs)
    target = task.target.to(x.device)
    with torch.no_grad():
        scores = module.concept_scores(x)
        values = scores * module.head.weight[target]
        extra: dict[str, Any] = {"names": module.names, "unit": "concept", "concept_scores": scores}
        extra["bias"] = module.head.bias[target]
        if module.residual is not None:
            extra["residual"] = module.residual(x).gather(1, target[:, None])[:, 0]
    return values, extra
