"""Guided backpropagation, deconvolution and Guided Grad-CAM: gradients with ReLUs' backward passes modified.

Every ``nn.ReLU`` module passes back only positive signals: guided backpropagation keeps the gradient where
the ReLU's input was positive and the incoming gradient is positive (Springenberg et al. 2015); deconvolution
keeps the positive incoming gradient whatever the input (Zeiler & Fergus 2014). As in captum, functional
``F.relu`` calls are not modified (a warning says when no ReLU module ran). Guided Grad-CAM multiplies the
guided backpropagation map by the rectified Grad-CAM of a layer, upsampled to the input's size.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core.errors import MethodError
from whatmatters.core.layers import Reshape
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task
from whatmatters.explain.cam import _grad_cam_map, class_activation_map
from whatmatters.explain.gradient import GRADIENT_UNITS, _gradient_map
from whatmatters.explain.modified_backward import modified_node_backward


def _guided(own: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return own.clamp_min(0)  # the ReLU's own gradient (grad where its input was positive), its positive part


def _deconv(own: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp_min(0)


def _relu_gradients(task: Task, rule: Any, description: str) -> torch.Tensor:
    with modified_node_backward(task.torch_model.module, (nn.ReLU,), rule) as state:
        out = _gradient_map(task, lambda x, g: g, description)
    if state.calls == 0:
        warnings.warn(
            f"{description}: the model has no nn.ReLU modules (functional F.relu is not modified), so the result "
            "is the plain gradient",
            stacklevel=4,
        )
    return out


@scorer("guided_backprop", family="gradient", units=GRADIENT_UNITS, needs="module", aliases=("guided_backpropagation",))
def guided_backprop(task: Task) -> torch.Tensor:
    """Guided backpropagation: the gradient with every ReLU passing back only positive gradients of active units."""
    return _relu_gradients(task, _guided, "guided backprop")


@scorer("deconvolution", family="gradient", units=GRADIENT_UNITS, needs="module", aliases=("deconvnet",))
def deconvolution(task: Task) -> torch.Tensor:
    """Deconvolution: the gradient with every ReLU passing back the positive part of its incoming gradient."""
    return _relu_gradients(task, _deconv, "deconvolution")


@scorer("guided_grad_cam", family="cam", units="pixel", needs="module", aliases=("guided_gradcam",))
def guided_grad_cam(
    task: Task, *, layer: str | nn.Module | None = None, reshape: Reshape | None = None, upsample: str = "nearest"
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Guided Grad-CAM: guided backpropagation times the layer's rectified Grad-CAM upsampled to the image.

    Args:
        layer: the Grad-CAM layer (name or module; ``None``: the last convolutional stage).
        reshape: turns the layer's output into ``(n, C, h, w)`` (as for ``grad_cam``).
        upsample: ``"nearest"`` (captum's default) or ``"bilinear"`` interpolation of the Grad-CAM map.

    Values have the input's shape ``(n, C, H, W)``.
    """
    if upsample not in ("nearest", "bilinear"):
        raise MethodError(f"upsample must be 'nearest' or 'bilinear', not {upsample!r}")
    if task.inputs.ndim != 4:
        raise MethodError(f"Guided Grad-CAM needs images (n, C, H, W), got data of shape {tuple(task.inputs.shape)}")
    size = tuple(task.inputs.shape[-2:])
    cams: list[torch.Tensor] = []

    def low_resolution(batch: Any) -> torch.Tensor:
        cam = _grad_cam_map(batch)
        cams.append(F.interpolate(cam.clamp_min(0).unsqueeze(1), size=size, mode=upsample))
        return cam

    _, extra = class_activation_map(
        task, low_resolution, layer=layer, reshape=reshape, normalize=False, gradients=True, description="Grad-CAM"
    )
    cam = torch.cat(cams)
    guided = _relu_gradients(task, _guided, "guided backprop")
    return guided * cam.to(guided.device, guided.dtype), extra
