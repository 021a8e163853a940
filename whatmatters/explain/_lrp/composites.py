"""Composites: which rule goes on which layer, by layer type (and a special first layer), by name.

The named composites follow zennit's definitions of the same names (``EpsilonPlus``,
``EpsilonGammaBox``, ``EpsilonAlpha2Beta1``, ``EpsilonPlusFlat``) so that their relevance maps
match. All of them add the layers zennit leaves out: LayerNorm (normalisation constant) and
Softmax modules (attention weights constant), so the same composite explains a transformer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from whatmatters.core.errors import MethodError
from whatmatters.explain._lrp.rules import (
    AlphaBeta,
    Constant,
    Epsilon,
    Flat,
    Gamma,
    LayerNormRule,
    Norm,
    Pass,
    Rule,
    ZBox,
    ZPlus,
)

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR = (nn.Linear,)
AVGPOOL = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# element-wise activations get the identity (pass) rule; ReLU is listed too (pass == its gradient)
ACTIVATIONS = (
    nn.ELU,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ReLU6,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.Sigmoid,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Tanh,
)
# parameter-free layers whose plain gradient is already the right relevance propagation
GRADIENT_OK = (
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)

# parameter-free leaf modules with these class names are element-wise activations: the pass rule
_ACTIVATION_NAME = re.compile(r"GELU|SiLU|Swish|Mish|Tanh|Sigmoid|Activation", re.IGNORECASE)

RuleMap = list[tuple[tuple[type, ...], Rule]]


@dataclass
class Composite:
    """Rules by layer type (first match wins), a special first layer, and rules by layer name (highest priority)."""

    layer_map: RuleMap
    first_map: RuleMap = field(default_factory=list)
    name_map: dict[str, Rule] = field(default_factory=dict)

    def assign(self, model: nn.Module) -> dict[str, tuple[nn.Module, Rule | None]]:
        """``{name: (module, rule)}`` for every leaf layer; ``rule`` None means the plain gradient.

        Raises :class:`MethodError` for a layer with parameters that no rule covers.
        """
        out: dict[str, tuple[nn.Module, Rule | None]] = {}
        first_done = False
        for name, module in model.named_modules():
            rule: Rule | None = self.name_map.get(name)
            if rule is None and not first_done:
                rule = next((r for types, r in self.first_map if isinstance(module, types)), None)
                first_done = rule is not None
            if rule is None:
                rule = next((r for types, r in self.layer_map if isinstance(module, types)), None)
            if rule is not None:
                out[name] = (module, rule)
                continue
            if next(module.children(), None) is not None:
                continue  # a container: its leaves carry the rules
            if isinstance(module, GRADIENT_OK):
                out[name] = (module, None)
            elif _ACTIVATION_NAME.search(type(module).__name__) and not any(True for _ in module.parameters()):
                out[name] = (module, Pass())  # activation classes of other libraries (transformers' GELUActivation)
            elif any(True for _ in module.parameters(recurse=False)):
                raise MethodError(
                    f"LRP has no rule for layer {name!r} ({type(module).__name__}), which has parameters. "
                    f"Give it one with rules={{{name!r}: 'epsilon'}} "
                    "(any name of whatmatters.explain.lrp.RULES or a Rule), "
                    "or replace the layer by standard Linear/Conv/norm modules"
                )
            # other parameter-free leaves (reshapes, custom glue) pass the plain gradient
        return out


def base_map(stabilizer: float) -> RuleMap:
    return [
        (ACTIVATIONS, Pass()),
        (AVGPOOL, Norm(stabilizer)),
        (BATCHNORM, Pass()),
        ((nn.LayerNorm,), LayerNormRule()),
        ((nn.Softmax,), Constant()),
    ]


def epsilon(*, epsilon: float = 1e-6, stabilizer: float = 1e-6, **_: Any) -> Composite:
    """Epsilon on every Linear and Conv layer (``epsilon=0``: LRP-0, gradient x input on ReLU nets)."""
    return Composite([*base_map(stabilizer), (CONV + LINEAR, Epsilon(epsilon))])


def epsilon_plus(*, epsilon: float = 1e-6, stabilizer: float = 1e-6, **_: Any) -> Composite:
    """z+ (alpha1-beta0) on convolutions, epsilon on Linear layers (zennit ``EpsilonPlus``)."""
    return Composite([*base_map(stabilizer), (CONV, ZPlus(stabilizer)), (LINEAR, Epsilon(epsilon))])


def epsilon_alpha2_beta1(*, epsilon: float = 1e-6, stabilizer: float = 1e-6, **_: Any) -> Composite:
    """alpha2-beta1 on convolutions, epsilon on Linear layers (zennit ``EpsilonAlpha2Beta1``)."""
    return Composite([*base_map(stabilizer), (CONV, AlphaBeta(2.0, 1.0, stabilizer)), (LINEAR, Epsilon(epsilon))])


def epsilon_plus_flat(*, epsilon: float = 1e-6, stabilizer: float = 1e-6, **_: Any) -> Composite:
    """Like ``epsilon_plus`` with the flat rule on the first Linear or Conv layer (zennit ``EpsilonPlusFlat``)."""
    comp = epsilon_plus(epsilon=epsilon, stabilizer=stabilizer)
    comp.first_map = [(CONV + LINEAR, Flat(stabilizer))]
    return comp


def epsilon_gamma_box(
    *, epsilon: float = 1e-6, gamma: float = 0.25, low: Any = 0.0, high: Any = 1.0, stabilizer: float = 1e-6, **_: Any
) -> Composite:
    """z-beta box on the first conv, gamma on other convs, epsilon on Linear (zennit ``EpsilonGammaBox``)."""
    return Composite(
        [*base_map(stabilizer), (CONV, Gamma(gamma, stabilizer)), (LINEAR, Epsilon(epsilon))],
        first_map=[(CONV, ZBox(low, high, stabilizer))],
    )


COMPOSITES: dict[str, Callable[..., Composite]] = {
    "epsilon": epsilon,
    "epsilon_plus": epsilon_plus,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
    "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_gamma_box": epsilon_gamma_box,
}


def register_composite(name: str) -> Callable[[Callable[..., Composite]], Callable[..., Composite]]:
    """Decorator: add a composite factory ``fn(**params) -> Composite`` under ``name``."""

    def deco(fn: Callable[..., Composite]) -> Callable[..., Composite]:
        if name in COMPOSITES:
            raise MethodError(f"composite {name!r} is registered twice")
        COMPOSITES[name] = fn
        return fn

    return deco


def get_composite(name: str | Composite, **params: Any) -> Composite:
    if isinstance(name, Composite):
        return name
    if name not in COMPOSITES:
        raise MethodError(f"unknown LRP composite {name!r}; choose one of {sorted(COMPOSITES)} or pass a Composite")
    return COMPOSITES[name](**params)
