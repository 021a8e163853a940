"""Context managers that leave the user's model exactly as it was, even when an error is raised."""

from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
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

# Per model: its parameters, their stamps (version, data pointer) and a copy of each. A copy is taken once and
# reused by later calls while the parameter's version counter and storage are unchanged (``p.data = t`` and
# ``module.double()`` keep the version but move the storage), so a call costs O(number of tensors) integer
# reads; the snapshot goes with the model (weak keys) and holds weak references to the parameters (a parameter
# that holds its module, through a hook, must not keep it alive). Writes through ``p.data`` bump no counter:
# whatmatters never writes weights that way.


@dataclass
class _Snapshot:
    params: list[weakref.ref]
    stamps: list[tuple[int, int]]
    copies: list[torch.Tensor]


_SNAPSHOTS: weakref.WeakKeyDictionary[nn.Module, _Snapshot] = weakref.WeakKeyDictionary()


def _stamp(p: torch.Tensor) -> tuple[int, int]:
    return p._version, p.data_ptr()


def fingerprint(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """Version counter and storage of every parameter and buffer: equal fingerprints, unchanged tensors.

    O(number of tensors). BatchNorm's running statistics change without a version bump in a train-mode
    forward, but its ``num_batches_tracked`` counter bumps; writes through ``.data`` are not seen.
    """
    _, params, buffers = _walk(module)
    return tuple(_stamp(t) for t in (*params, *buffers))


def weight_snapshot(
    module: nn.Module, params: list[nn.Parameter], stamps: list[tuple[int, int]], weights: bool | None = None
) -> _Snapshot | None:
    """Copies of ``params`` (whose stamps are ``stamps``) at their current values, reused across calls while
    their versions are unchanged; None when ``weights`` is False, or None and the model is larger than
    ``WEIGHT_SNAPSHOT_LIMIT`` elements."""
    if weights is False:
        return None
    snap = _SNAPSHOTS.get(module)
    same = snap is not None and snap.stamps == stamps and len(snap.params) == len(params)
    if same and all(map(operator.is_, [ref() for ref in snap.params], params)):
        return snap
    if weights is None and sum(p.numel() for p in params) > WEIGHT_SNAPSHOT_LIMIT:
        return None
    old = {} if snap is None else {id(r()): (r, st, c) for r, st, c in zip(snap.params, snap.stamps, snap.copies)}
    copies = []
    for p, stamp in zip(params, stamps):
        hit = old.get(id(p))  # the same parameter only if its reference still points to it (ids are reused)
        copies.append(hit[2] if hit is not None and hit[0]() is p and hit[1] == stamp else p.detach().clone())
    snap = _SNAPSHOTS[module] = _Snapshot([weakref.ref(p) for p in params], list(stamps), copies)
    return snap


@contextmanager
def preserved(module: nn.Module, *, weights: bool | None = None) -> Iterator[nn.Module]:
    """Restore train/eval mode, ``requires_grad`` flags, gradients, hooks, buffers and weights on exit.

    Hooks added inside the block are removed; hooks that were there before stay; gradients that existed
    keep their values. Parameters are checked through their version counters (no copy, no comparison);
    a changed one is restored from :func:`weight_snapshot` (``weights=None``: models up to
    ``WEIGHT_SNAPSHOT_LIMIT`` elements; ``True``: always) or else raises ``ModelError``. Buffers are
    always copied: some kernels update them without bumping their version (BatchNorm's running statistics).
    """
    modules, params, buffers = _walk(module)
    modes = [m.training for m in modules]
    grad_flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    # backward() accumulates into an existing .grad in place: keep its values to put back
    grad_copies = [(g._version, g.detach().clone()) for g in grads if g is not None]
    # hook handles take increasing ids, so the hooks added inside the block are those from here on;
    # a torch release without the counter falls back to listing every module's hooks
    first_new = getattr(RemovableHandle, "next_id", None)
    hooks = [_hook_keys(m) for m in modules] if first_new is None else None
    stamps = [_stamp(p) for p in params]
    snap = weight_snapshot(module, params, stamps, weights)
    buffer_copies = [b.detach().clone() for b in buffers]
    try:
        yield module
    finally:  # each check reads all flags first (one list comparison) and restores only on a difference
        if [m.training for m in modules] != modes:
            for m, training in zip(modules, modes):
                m.training = training
        if [p.requires_grad for p in params] != grad_flags:
            for p, flag in zip(params, grad_flags):
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
        if grad_copies or not all(map(operator.is_, [p.grad for p in params], grads)):
            _restore_grads(params, grads, grad_copies)
        if first_new is None or RemovableHandle.next_id != first_new:  # else no hook was added
            for i, m in enumerate(modules):
                _remove_new_hooks(m, first_new, hooks[i] if hooks is not None else {})
        now = [_stamp(p) for p in params]
        changed = [i for i, (a, b) in enumerate(zip(now, stamps)) if a != b] if now != stamps else []
        with torch.no_grad():
            for b, saved in zip(buffers, buffer_copies):
                if not torch.equal(b, saved):
                    b.copy_(saved)
            if snap is not None:
                for i in changed:
                    params[i].copy_(snap.copies[i])
                    snap.stamps[i] = _stamp(params[i])  # restored: the copy still holds its values
        if changed and snap is None:
            raise ModelError("a scorer changed the model's weights in place; this is a bug in whatmatters")


def _restore_grads(params: list[nn.Parameter], grads: list[Any], copies: list[tuple[int, torch.Tensor]]) -> None:
    """Put back each parameter's ``.grad`` object, and the values of those that existed (``copies``, in order)."""
    saved = iter(copies)
    for p, grad in zip(params, grads):
        if p.grad is not grad:
            p.grad = grad
        if grad is not None:
            version, values = next(saved)
            if grad._version != version:
                with torch.no_grad():
                    grad.copy_(values)


def _walk(module: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter], list[torch.Tensor]]:
    """Modules, parameters and buffers (each once, in ``module.modules()`` order) in one traversal."""
    modules, params, buffers = [], [], []
    seen: set[int] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        modules.append(m)
        for group, out in ((m._parameters, params), (m._buffers, buffers)):
            for t in group.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        if m._modules:  # leaves (most modules) have none
            stack.extend([c for c in reversed(m._modules.values()) if c is not None])
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


def autograd_on() -> AbstractContextManager[Any]:
    """Autograd on for the block, also inside ``torch.no_grad()`` or ``torch.inference_mode()`` (tensors made
    there are normal ones); nothing to enter when it already is on."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def require_eval(module: nn.Module, allow_train: bool = False) -> None:
    if module.training and not allow_train:
        raise ModelError(
            "the model is in training mode, so dropout and batch-norm make its explanations random; "
            "call model.eval() first (or pass allow_train_mode=True to explain it as it is)"
        )


def guarded(fn: Callable[..., Any], name: str | None = None) -> Callable[..., Any]:
    """``fn(module, ...)`` run inside :func:`preserved` (its signature and documentation; ``name``: its new name)."""

    @functools.wraps(fn)
    def wrapper(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with preserved(module):
            return fn(module, *args, **kwargs)

    if name is not None:
        wrapper.__name__ = wrapper.__qualname__ = name
    return wrapper
