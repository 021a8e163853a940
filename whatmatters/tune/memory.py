"""Measured training memory: bytes held by gradients and by optimizer state."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers (accelerate's ``AcceleratedOptimizer``, ...)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (Adam: ``exp_avg``, ``exp_avg_sq``, ``step``)."""
    return _tensor_bytes(dict(base_optimizer(optimizer).state))


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the ``.grad`` tensors the model's parameters hold now."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def training_bytes(model: nn.Module, optimizer: Any = None) -> dict[str, int]:
    """``{"gradients": ..., "optimizer_state": ..., "total": ...}`` in bytes, measured on the tensors held now."""
    grads = gradient_bytes(model)
    state = optimizer_state_bytes(optimizer) if optimizer is not None else 0
    return {"gradients": grads, "optimizer_state": state, "total": grads + state}
