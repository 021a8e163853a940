"""Context managers that leave the user's model exactly as it was, even when an error is raised."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

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

# Snapshots of weights are taken for models up to this many elements (about 200 MB in float32);
# larger models are checked for in-place changes through tensor version counters instead.
WEIGHT_SNAPSHOT_LIMIT = 50_000_000


@contextmanager
def preserved(module: nn.Module, *, weights: bool | None = None) -> Iterator[nn.Module]:
    """Restore train/eval mode, ``requires_grad`` flags, hooks and (small models) weights on exit.

    Hooks added inside the block are removed; hooks that were there before stay; gradients that
    existed keep their values. Buffers are always snapshotted; with ``weights=None`` parameters
    are snapshotted when the model has at most ``WEIGHT_SNAPSHOT_LIMIT`` elements; otherwise an
    in-place change of a parameter raises ``ModelError``.
    """
    modules = list(module.modules())
    modes = [m.training for m in modules]
    tensors = [*module.parameters(), *module.buffers()]
    grad_flags = [p.requires_grad for p in module.parameters()]
    grads = [p.grad for p in module.parameters()]
    # backward() accumulates into an existing .grad in place: keep its values to put back
    grad_copies = [None if g is None else g.detach().clone() for g in grads]
    grad_versions = [None if g is None else g._version for g in grads]
    hooks = [{name: dict(getattr(m, name, {})) for name in _HOOK_DICTS} for m in modules]
    if weights is None:
        weights = sum(t.numel() for t in tensors) <= WEIGHT_SNAPSHOT_LIMIT
    # buffers are always copied: some kernels update them in place without bumping their version
    # counter (BatchNorm's running statistics in a train-mode forward pass)
    n_params = len(grads)
    snapshot = [t.detach().clone() if weights or i >= n_params else None for i, t in enumerate(tensors)]
    versions = [t._version for t in tensors]
    try:
        yield module
    finally:
        for m, training in zip(modules, modes):
            m.training = training
        for p, flag, grad, copy, version in zip(module.parameters(), grad_flags, grads, grad_copies, grad_versions):
            p.requires_grad_(flag)
            p.grad = grad
            if grad is not None and grad._version != version:
                with torch.no_grad():
                    grad.copy_(copy)
        for m, before in zip(modules, hooks):
            for name, kept in before.items():
                current = getattr(m, name, None)
                if current is None:
                    continue
                for key in [k for k in current if k not in kept]:
                    del current[key]
        lost = False
        with torch.no_grad():
            for t, saved, version in zip(tensors, snapshot, versions):
                if saved is not None and (t._version != version or not torch.equal(t, saved)):
                    t.copy_(saved)
                elif saved is None and t._version != version:
                    lost = True
        if lost:
            raise ModelError("a scorer changed the model's weights in place; this is a bug in whatmatters")


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
