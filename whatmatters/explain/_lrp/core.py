"""Run LRP: attach the composite's rules as hooks (removed on exit), backpropagate, read relevance."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import InputError, MethodError, ModelError, TargetError
from whatmatters.core.state import autograd_on, guarded, hooks, preserved
from whatmatters.core.task import as_indices, check_outputs
from whatmatters.explain._lrp.canonizers import canonized
from whatmatters.explain._lrp.composites import Composite, get_composite
from whatmatters.explain._lrp.rules import RULES, Rule, stabilize

Tensor = torch.Tensor


class _Relevance(torch.autograd.Function):
    """Identity in the forward pass; the rule's modified gradient with respect to the layer input backwards."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, z: Tensor, rule: Rule, module: nn.Module, state: dict) -> Tensor:  # type: ignore[override]
        ctx.rule, ctx.module, ctx.state = rule, module, state
        ctx.is_input = x is state.get("input")
        ctx.save_for_backward(x, z)
        return z.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, z = ctx.saved_tensors
        with torch.no_grad():
            out = ctx.rule.backward(ctx.module, x, z, g)
        if ctx.rule.raw:  # relevance itself: exact at the model input, else turned into a gradient
            if ctx.is_input:
                ctx.state.setdefault("direct", []).append(out)
                out = torch.zeros_like(x)
            else:
                out = out / stabilize(x, 1e-12)
        return out, None, None, None, None


def _hook(rule: Rule, state: dict) -> Any:
    def on_forward(module: nn.Module, inputs: tuple, output: Any) -> Any:
        if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
            raise MethodError(
                f"LRP rule {type(rule).__name__} needs a layer with one tensor input and output; "
                f"{type(module).__name__} gave {type(output).__name__}"
            )
        x = inputs[0]
        replaced = rule.forward(module, x, output)
        if replaced is not None:
            return replaced
        if not x.requires_grad:  # nothing upstream to explain
            return output
        own = output.grad_fn is not None and output.grad_fn is not x.grad_fn  # a node of the layer's own
        factor = rule.output_factor(module, output) if own else None
        if factor is not None:  # the layer's own backward applies the rule to the scaled output gradient
            output.grad_fn.register_prehook(lambda grads: (None if grads[0] is None else grads[0] * factor, *grads[1:]))
            return output
        return _Relevance.apply(x, output, rule, module, state)

    return on_forward


@contextmanager
def attached(model: nn.Module, composite: Composite, state: dict) -> Iterator[dict[str, tuple[nn.Module, Rule | None]]]:
    """Attach the composite's rules to ``model`` as forward hooks; they are removed on exit."""
    assigned = composite.assign(model)
    handles = [m.register_forward_hook(_hook(r, state)) for m, r in assigned.values() if r is not None]
    with hooks(*handles):
        yield assigned


def _as_rule(rule: str | Rule) -> Rule:
    if isinstance(rule, Rule):
        return rule
    if rule not in RULES:
        raise MethodError(f"unknown LRP rule {rule!r}; choose one of {sorted(RULES)} or pass a Rule")
    return RULES[rule]()


def prepare(
    model: nn.Module,
    composite: str | Composite = "epsilon_plus",
    *,
    canonize: bool = True,
    rules: dict[str, str | Rule] | None = None,
    **params: Any,
) -> tuple[nn.Module, Composite]:
    """The model to hook (a BatchNorm-merged copy when ``canonize`` and there is one to merge; cached) and
    the composite with name rules added."""
    comp = get_composite(composite, **params)
    if rules:
        comp = Composite(
            comp.layer_map, comp.first_map, {**comp.name_map, **{k: _as_rule(v) for k, v in rules.items()}}
        )
    if canonize:
        model = canonized(model)
    return model, comp


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if not isinstance(logits, Tensor):
        raise ModelError("the model returned a non-tensor without .logits; wrap it so that it returns a tensor")
    return logits


def _target_rows(target: Any, n: int) -> Tensor:
    """``target`` as ``n`` non-negative class indices (the upper bound is checked against the logits)."""
    t = as_indices(target, InputError).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n or (n and int(t.min()) < 0):
        raise InputError(f"target must be one class index (or one per sample), non-negative; got {target!r}")
    return t


def relevance(
    model: nn.Module,
    inputs: Tensor,
    target: Any = None,
    composite: str | Composite = "epsilon_plus",
    *,
    canonize: bool = True,
    rules: dict[str, str | Rule] | None = None,
    layers: Sequence[str] | None = None,
    softmax_functions: bool = False,
    batch_size: int | None = None,
    choose: Callable[[Tensor, slice], Tensor] | None = None,
    **params: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Relevance of every input value for the target logit, shaped like ``inputs``.

    The target output's relevance is its logit, so with conservative rules (epsilon -> 0, no
    biases) the relevance sums to the logit. ``layers`` (names in the hooked model) also returns the
    relevance arriving at each of those layers' outputs, shaped like the output. The user's model is
    never changed: hooks go on a BatchNorm-merged copy (``canonize``) or, without canonizing, on the
    model itself inside :func:`whatmatters.core.state.preserved`. ``softmax_functions`` also treats
    calls of ``torch.softmax`` / ``F.softmax`` as constants (attention written without a Softmax module).
    ``batch_size``: rows per modified backward pass (default: all); the model is prepared once.
    ``choose(logits, rows)`` (instead of ``target``) gives the targets of the input rows ``rows`` from their
    logits (``Task.targets_for``: checked, or predicted where undecided).

    :func:`lrp` is this function inside :func:`~whatmatters.core.state.preserved` of the model; ``relevance``
    itself is for a caller that guards the model already (``explain``).
    """
    work, comp = prepare(model, composite, canonize=canonize, rules=rules, **params)
    device = next((p.device for p in work.parameters()), inputs.device)
    targets = _target_rows(target, len(inputs)) if target is not None else None
    size = batch_size or max(len(inputs), 1)
    state: dict = {}
    captured: dict[str, Tensor] = {}
    rels, layer_rels = [], []
    with ExitStack() as stack:
        if work is not model:  # the hooks go on our merged copy, which only reads the model
            stack.enter_context(preserved(work, weights=False))
        stack.enter_context(autograd_on())
        if softmax_functions:
            stack.enter_context(constant_softmax())
        stack.enter_context(attached(work, comp, state))
        if layers:
            stack.enter_context(_capture(work, layers, captured))
        for start in range(0, len(inputs), size):
            rows = slice(start, start + size)
            state.pop("direct", None)
            captured.clear()
            x = inputs[rows].detach().to(device).clone().requires_grad_(True)
            state["input"] = x
            pick = None if choose is None else (lambda logits, rows=rows: choose(logits, rows))
            rel = _relevance(work(x), x, None if targets is None else targets[rows], state, pick)
            rels.append(rel)
            layer_rels.append({name: t.detach() for name, t in captured.items()})
    if len(rels) == 1:
        return rels[0], layer_rels[0]
    layer_rel = {name: torch.cat([d[name] for d in layer_rels]) for name in layer_rels[0]} if layer_rels else {}
    return torch.cat(rels), layer_rel


lrp = guarded(relevance, "lrp")


def _relevance(
    out: Any, x: Tensor, target: Tensor | None, state: dict, choose: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """One modified backward pass: ``x * d logit[target] / dx`` plus the rules' direct input terms."""
    logits = _logits(out)
    if logits.ndim != 2:
        raise ModelError(f"LRP needs outputs of shape (n, classes); the model returned {tuple(logits.shape)}")
    check_outputs(logits.detach())
    if choose is not None:
        rows = choose(logits.detach())
    else:
        rows = logits.detach().argmax(1) if target is None else target.to(logits.device)
    if target is not None and int(rows.max()) >= logits.shape[1]:
        top = logits.shape[1]
        raise TargetError(
            f"target {int(rows.max())} is out of range: the model has {top} output(s), indices 0..{top - 1}"
        )
    onehot = torch.zeros_like(logits).scatter_(1, rows.unsqueeze(1), 1.0)
    if not logits.requires_grad:
        raise ModelError("the model's output does not depend differentiably on its input, so LRP cannot run")
    (grad,) = torch.autograd.grad(logits, x, onehot, allow_unused=True)
    rel = x.detach() * (grad if grad is not None else 0)
    for direct in state.get("direct", []):
        rel = rel + direct
    return rel.detach()


@contextmanager
def _capture(model: nn.Module, layers: Sequence[str], store: dict[str, Tensor]) -> Iterator[None]:
    """Store ``output * gradient`` (the relevance arriving at the output) of each named layer."""
    from whatmatters.core.state import find_module

    def make(name: str) -> Any:
        def on_forward(_m: nn.Module, _inp: Any, out: Any) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(t, Tensor) or not t.requires_grad:
                raise MethodError(f"layer {name!r} does not return a tensor on the path to the output; choose another")
            val = t.detach()
            t.register_hook(lambda g: store.__setitem__(name, store[name] + val * g if name in store else val * g))

        return on_forward

    handles = [find_module(model, name).register_forward_hook(make(name)) for name in layers]
    with hooks(*handles):
        yield


@contextmanager
def constant_softmax() -> Iterator[None]:
    """Within the block, ``torch.softmax``, ``Tensor.softmax`` and ``F.softmax`` return detached outputs.

    This is the AH-rule for attention implemented with functional softmax calls (Hugging Face
    eager attention). It patches module attributes for the block's duration (not thread-safe).
    """
    import torch.nn.functional as F

    originals = (torch.softmax, F.softmax, Tensor.softmax)

    def const(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Tensor:
            return fn(*args, **kwargs).detach()

        return wrapped

    torch.softmax, F.softmax, Tensor.softmax = (const(f) for f in originals)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.softmax, F.softmax, Tensor.softmax = originals  # type: ignore[assignment]
