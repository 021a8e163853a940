"""Context managers that leave the user's model exactly as it was, even when an error is raised."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from whatmatters.core.errors import ModelError

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)

# Copies of weights are kept for models up to this many parameter elements (about 200 MB in float32), so
# that a scorer's in-place change can be undone; larger models are only checked, through tensor version
# counters, and such a change raises ``ModelError``. 0 turns the copies off.
WEIGHT_SNAPSHOT_LIMIT = 50_000_000

# Per model: parameter id -> (weak reference, (version, data pointer), copy). A copy is taken once and
# reused by later calls while the parameter's version counter and storage are unchanged (``p.data = t``
# and ``module.double()`` keep the version but move the storage), so a call costs O(number of tensors)
# integer reads; the copies go with the model (weak keys). Writes through ``p.data`` bump no counter:
# whatmatters never writes weights that way.
_SNAPSHOTS: weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[Any, tuple[int, int], torch.Tensor]]]
_SNAPSHOTS = weakref.WeakKeyDictionary()


def _stamp(p: torch.Tensor) -> tuple[int, int]:
    return p._version, p.data_ptr()


def fingerprint(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """Version counter and storage of every parameter and buffer: equal fingerprints, unchanged tensors.

    O(number of tensors). BatchNorm's running statistics change without a version bump in a train-mode
    forward, but its ``num_batches_tracked`` counter bumps; writes through ``.data`` are not seen.
    """
    _, params, buffers = _walk(module)
    return tuple(_stamp(t) for t in (*params, *buffers))


def weight_copies(module: nn.Module, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Copies of ``params`` at their current values, reused across calls while their versions are unchanged."""
    cached = _SNAPSHOTS.get(module, {})
    fresh = {}
    for p in params:
        hit = cached.get(id(p))
        if hit is None or hit[0]() is not p or hit[1] != _stamp(p):
            hit = (weakref.ref(p), _stamp(p), p.detach().clone())
        fresh[id(p)] = hit
    _SNAPSHOTS[module] = fresh
    return [fresh[id(p)][2] for p in params]


@contextmanager
def preserved(module: nn.Module, *, weights: bool | None = None) -> Iterator[nn.Module]:
    """Restore train/eval mode, ``requires_grad`` flags, gradients, hooks, buffers and weights on exit.

    Hooks added inside the block are removed; hooks that were there before stay; gradients that existed
    keep their values. Parameters are checked through their version counters (no copy, no comparison);
    a changed one is restored from :func:`weight_copies` (``weights=None``: models up to
    ``WEIGHT_SNAPSHOT_LIMIT`` elements; ``True``: always) or else raises ``ModelError``. Buffers are
    always copied: some kernels update them without bumping their version (BatchNorm's running statistics).
    """
    modules, params, buffers = _walk(module)
    modes = [m.training for m in modules]
    grad_flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    # backward() accumulates into an existing .grad in place: keep its values to put back
    grad_copies = [None if g is None else (g._version, g.detach().clone()) for g in grads]
    # hook handles take increasing ids, so the hooks added inside the block are those from here on;
    # a torch release without the counter falls back to listing every module's hooks
    first_new = getattr(RemovableHandle, "next_id", None)
    hooks = [_hook_keys(m) for m in modules] if first_new is None else None
    if weights is None:
        weights = sum(p.numel() for p in params) <= WEIGHT_SNAPSHOT_LIMIT
    copies = weight_copies(module, params) if weights else None
    stamps = [_stamp(p) for p in params]
    buffer_copies = [b.detach().clone() for b in buffers]
    try:
        yield module
    finally:
        for m, training in zip(modules, modes):
            if m.training != training:
                m.training = training
        for p, flag, grad, saved in zip(params, grad_flags, grads, grad_copies):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad
            if saved is not None and grad._version != saved[0]:
                with torch.no_grad():
                    grad.copy_(saved[1])
        if first_new is None or RemovableHandle.next_id != first_new:  # else no hook was added
            for i, m in enumerate(modules):
                _remove_new_hooks(m, first_new, hooks[i] if hooks is not None else {})
        changed = [i for i, (p, stamp) in enumerate(zip(params, stamps)) if _stamp(p) != stamp]
        with torch.no_grad():
            for b, saved in zip(buffers, buffer_copies):
                if not torch.equal(b, saved):
                    b.copy_(saved)
            if copies is not None:
                for i in changed:
                    params[i].copy_(copies[i])
                    _SNAPSHOTS[module][id(params[i])] = (weakref.ref(params[i]), _stamp(params[i]), copies[i])
        if changed and copies is None:
            raise ModelError("a scorer changed the model's weights in place; this is a bug in whatmatters")


def _walk(module: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter], list[torch.Tensor]]:
    """Modules, parameters and buffers (each once, in ``module.modules()`` order) in one traversal."""
    modules = list(module.modules())
    seen: set[int] = set()
    params, buffers = [], []
    for m in modules:
        for group, out in ((m._parameters, params), (m._buffers, buffers)):
            for t in group.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
    return modules, params, buffers


def _hook_keys(m: nn.Module) -> dict[str, set]:
    """The keys of the module's non-empty hook dictionaries."""
    found = {}
    for name in _HOOK_DICTS:
        hooks = m.__dict__.get(name)
        if hooks:
            found[name] = set(hooks)
    return found


def _remove_new_hooks(m: nn.Module, first_new: int | None, before: dict[str, set]) -> None:
    """Remove the hooks with handle ids from ``first_new`` on, or (no id counter) those not in ``before``."""
    for name in _HOOK_DICTS:
        hooks = m.__dict__.get(name)
        if hooks:
            new = (
                [k for k in hooks if k >= first_new]
                if first_new is not None
                else hooks.keys() - before.get(name, set())
            )
            for key in new:
                del hooks[key]


class Tally:
    """Counts the calls of hook functions, so a feature can check that every hook it installed ran.

    A library release that stops calling a module (a functional call instead of the submodule, a renamed
    path) must give an error, not a result computed without the hook: ``tally.hook(name, fn)`` wraps
    ``fn``; ``tally.missed()`` lists the names never called.
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def hook(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.calls.setdefault(name, 0)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    def missed(self) -> list[str]:
        return [name for name, n in self.calls.items() if n == 0]


@contextmanager
def hooks(*handles: Any) -> Iterator[None]:
    """Remove the given hook handles on exit."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def find_module(module: nn.Module, name: str) -> nn.Module:
    """``module.get_submodule(name)`` with an error that lists what exists."""
    try:
        return module.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n]
        import difflib

        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ModelError(
            f"the model has no layer named {name!r}.{hint} "
            f"Layer names are those of model.named_modules(), e.g. {names[:5]}"
        ) from None


@contextmanager
def capture(layer: nn.Module, *, grads: bool = False) -> Iterator[dict[str, Any]]:
    """Record a layer's output (and its gradient when ``grads``) during the block.

    Yields a dict that gets ``"activations"`` after the forward pass and ``"gradients"`` after
    ``backward``. The hook is removed on exit.
    """
    store: dict[str, Any] = {}

    def on_forward(_m: nn.Module, _inp: Any, out: Any) -> None:
        out = out[0] if isinstance(out, (tuple, list)) else out
        store["activations"] = out
        if grads and out.requires_grad:
            out.register_hook(lambda g: store.__setitem__("gradients", g))

    with hooks(layer.register_forward_hook(on_forward)):
        yield store


def parameter_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
    for b in module.buffers():
        return b.device, (b.dtype if b.dtype.is_floating_point else torch.float32)
    return torch.device("cpu"), torch.float32


def require_eval(module: nn.Module, allow_train: bool = False) -> None:
    if module.training and not allow_train:
        raise ModelError(
            "the model is in training mode, so dropout and batch-norm make its explanations random; "
            "call model.eval() first (or pass allow_train_mode=True to explain it as it is)"
        )


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``fn(module, ...)`` inside :func:`preserved`."""

    def wrapper(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with preserved(module):
            return fn(module, *args, **kwargs)

    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper
