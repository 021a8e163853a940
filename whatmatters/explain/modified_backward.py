"""Modified backward passes: the forward pass as it is, the backward pass of chosen modules replaced.

:func:`modified_backward` hooks every module of the chosen types for the duration of a ``with`` block. A
forward pre-hook keeps the module's input (and hands the module a copy, so in-place activations cannot
change it); a forward hook returns the module's own output through :class:`_Replaced`, whose backward
calls a rule ``rule(module, x, y, grad_y) -> grad_x``. Forward values are unchanged. Each call of a module
gets its own pair, so a module used several times (one ``nn.ReLU`` shared by all layers) works.
DeepLIFT's rescale rule is such a rule. A rule that needs no forward values (guided backpropagation,
deconvolution) goes through :func:`modified_node_backward` instead: a hook on the module output's autograd
node rewrites the gradient that node computed, so nothing is copied or kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from whatmatters.core.state import hooks

Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (the gradient the module's own backward gives its input, the gradient at its output) -> the input's gradient
NodeRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Replaced(torch.autograd.Function):
    """``y`` in the forward pass; ``rule(module, x, y, grad)`` as the gradient with respect to ``x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, module: nn.Module, rule: Rule) -> torch.Tensor:
        ctx.save_for_backward(x, y)
        ctx.module, ctx.rule = module, rule
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        x, y = ctx.saved_tensors
        return ctx.rule(ctx.module, x, y, grad), None, None, None


def local_vjp(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The module's ordinary backward pass at ``x`` for output gradient ``grad`` (hooks bypassed)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        out = module.forward(leaf.clone())  # a copy: in-place modules must not write into the leaf
        (g,) = torch.autograd.grad(out, leaf, grad)
    return g


class _Calls:
    """Counts the hooked calls; keeps each call's input between its pre-hook and its hook."""

    def __init__(self, rules: dict[type, Rule]) -> None:
        self.rules, self.calls, self.pending = rules, 0, []

    def before(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], torch.Tensor):
            self.pending.append(None)
            return None
        self.pending.append(args[0])
        return (args[0].clone(), *args[1:])

    def after(self, module: nn.Module, _args: Any, out: Any) -> Any:
        x = self.pending.pop()
        if x is None or not isinstance(out, torch.Tensor) or not x.requires_grad:
            return None
        self.calls += 1
        return _Replaced.apply(x, out.detach(), module, self.rules[type(module)])


@contextmanager
def modified_backward(model: nn.Module, rules: dict[type, Rule]) -> Iterator[_Calls]:
    """Within the block, the backward pass of every module whose type is in ``rules`` follows its rule.

    Yields a counter whose ``calls`` says how many module calls were replaced (0: the model has none of
    these modules, e.g. it uses functional activations). Hooks are removed on exit, also on error.
    """
    state = _Calls(rules)
    handles = []
    for module in model.modules():
        if type(module) in rules:
            handles.append(module.register_forward_pre_hook(state.before))
            handles.append(module.register_forward_hook(state.after))
    with hooks(*handles):
        yield state


@contextmanager
def modified_node_backward(model: nn.Module, types: tuple[type, ...], rule: NodeRule) -> Iterator[_Calls]:
    """Within the block, the input gradient of every call of a module of ``types`` is ``rule(own, grad_out)``
    (``own``: what the module's backward gave). A hook on the output's autograd node rewrites it, so nothing
    is kept from the forward pass; in-place modules work (their output's node is their own). Yields a counter
    of the calls modified (0: none of these modules ran); hooks are removed on exit, also on error.
    """
    state = _Calls({})

    def after(_module: nn.Module, _args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            state.calls += 1
            out.grad_fn.register_hook(lambda grad_in, grad_out: (rule(grad_in[0], grad_out[0]), *grad_in[1:]))

    handles = [m.register_forward_hook(after) for m in model.modules() if isinstance(m, types)]
    with hooks(*handles):
        yield state
