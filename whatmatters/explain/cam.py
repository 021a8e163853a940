"""Class activation maps: one base for the CAM family, one small function per method.

A CAM weighs the activation maps ``A`` (``(n, C, h, w)``) of one layer and sums them over
channels; methods differ only in the weights. The base (:func:`class_activation_map`) does the
rest once for every member:

* the layer is found by name (or module) or chosen automatically (:func:`whatmatters.core.layers.choose_layer`:
  the last convolutional stage of a CNN, the first norm of a ViT's last block) and its output turned into
  ``(n, C, h, w)`` (ViT tokens are laid out on their patch grid, CLS / register tokens dropped; a
  ``reshape=`` callable for anything else);
* gradient methods run the forward pass without autograd up to the layer and with it after, then take
  ``d target / d activations`` with ``torch.autograd.grad``: no backward pass through the layers before
  it, no parameter gradients, ``requires_grad`` flags untouched; hooks live in context managers;
* ``ReLU(sum_c w_c A_c)``, bilinear upsampling to the input's height and width, optional per-image
  normalisation; images in batches of ``batch_size``, everything in torch on the model's device.

Values are the CAM at input resolution, shape ``(n, H, W)``, unit ``"pixel"``. With
``normalize=True`` (default) each image's map is min-max scaled to ``[0, 1]`` after upsampling, as
pytorch-grad-cam shows them (it scales before and after resizing; both give the same map up to its
``1e-7`` guard); ``"max"`` divides by the maximum only; ``False`` keeps the raw rectified map, whose
scale can be compared across images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core.adapters import TorchModel, row_slices
from whatmatters.core.errors import MethodError, ModelError
from whatmatters.core.layers import Reshape, first_tensor, resolve_layer, to_spatial
from whatmatters.core.registry import scorer
from whatmatters.core.state import hooks
from whatmatters.core.task import Task, progress_bar

__all__ = ["CamBatch", "class_activation_map", "normalize_maps", "weighted_sum"]


@dataclass
class CamBatch:
    """What a CAM method sees for one batch of images.

    ``activations`` and ``gradients`` (``None`` for gradient-free methods) have shape
    ``(b, C, h, w)`` in at least float32; ``inputs`` are the images on the model's device and
    ``target`` the output index explained for each of them.
    """

    activations: torch.Tensor
    gradients: torch.Tensor | None
    inputs: torch.Tensor
    target: torch.Tensor
    model: TorchModel
    batch_size: int
    progress: bool | None = None


CamMethod = Callable[[CamBatch], "torch.Tensor | tuple[torch.Tensor, dict[str, list[Any]]]"]


def weighted_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``sum_c w_c A_c``: channel weights ``(b, C)`` or spatial weights ``(b, C, h, w)`` -> ``(b, h, w)``."""
    if weights.ndim == 2:
        return torch.einsum("bc,bchw->bhw", weights.to(activations.dtype), activations)
    return (weights * activations).sum(1)


def normalize_maps(maps: torch.Tensor, how: bool | str | None) -> torch.Tensor:
    """Per-image scaling of maps ``(n, H, W)``: ``True``/``"minmax"`` to [0, 1], ``"max"`` by the maximum."""
    if how is False or how is None:
        return maps
    flat = maps.flatten(1)
    hi = flat.amax(1).view(-1, 1, 1)
    if how is True or how == "minmax":
        lo = flat.amin(1).view(-1, 1, 1)
        span = hi - lo
        return torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, 1), torch.zeros_like(maps))
    if how == "max":
        return torch.where(hi > 0, maps / torch.where(hi > 0, hi, 1), maps)
    raise MethodError(f"normalize must be True / 'minmax', 'max' or False, not {how!r}")


class _LayerProbe:
    """A forward hook on the explained layer: records its output and counts calls.

    With ``cut=True`` the output is replaced by a copy of a fresh leaf tensor and autograd is switched on
    from there, so a pass that starts under ``torch.no_grad()`` records a graph only after the layer.
    """

    def __init__(self, cut: bool) -> None:
        self.cut = cut
        self.calls = 0
        self.output: torch.Tensor | None = None

    def __call__(self, _m: nn.Module, _inp: Any, out: Any) -> Any:
        self.calls += 1
        tensor = first_tensor(out)
        if tensor is None:
            raise ModelError(
                f"the layer returned a {type(out).__name__}, not a tensor; choose a layer that returns one"
            )
        if self.calls > 1 or not self.cut:
            if self.output is None:  # a copy: in-place ops downstream (ReLU(inplace=True)) must not change it
                self.output = tensor.detach().clone()
            return None
        self.output = tensor.detach().requires_grad_(True)
        torch.set_grad_enabled(True)  # the enclosing no_grad block restores the caller's mode
        new = self.output.clone()  # in-place ops downstream (ReLU(inplace=True)) must not touch the leaf
        if isinstance(out, torch.Tensor):
            return new
        return type(out)([new, *out[1:]]) if isinstance(out, list) else (new, *out[1:])


class _LayerDidNotRun(ModelError):
    """The layer's forward hook never fired."""


def _layer_pass(
    model: TorchModel,
    layer: nn.Module,
    name: str,
    x: torch.Tensor,
    target: torch.Tensor,
    gradients: bool,
    full_graph: bool = False,
    check: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's output for ``x`` and, when ``gradients``, the gradient of each row's target output.

    By default the pass runs without autograd up to the layer. With ``full_graph`` it runs with
    autograd from an input that requires grad, for modules that skip the hooked submodule (a fused
    inference kernel) when autograd is off; the backward pass still stops at the layer. ``check`` sees the
    model's outputs first and gives the rows' targets (``Task.targets_for``: a given target is checked on this
    forward, an undecided one is the predicted class).
    """
    probe = _LayerProbe(cut=gradients)
    if full_graph and x.is_floating_point():
        x = x.detach().requires_grad_(True)
    with hooks(layer.register_forward_hook(probe)), torch.enable_grad() if full_graph else torch.no_grad():
        out = model.forward(x)
    if probe.output is None:
        raise _LayerDidNotRun(
            f"layer {name!r} did not run during the forward pass (a fused fast path or an unused branch?); "
            "choose another layer with layer=..., e.g. the block that contains it or the one before"
        )
    if probe.calls > 1:
        raise ModelError(
            f"layer {name!r} runs {probe.calls} times per forward pass (a shared module), so its output is "
            "ambiguous; choose a layer that runs once, e.g. the block that contains it"
        )
    if check is not None:
        target = check(out)
    if not gradients:
        return probe.output.detach(), None
    score = out.gather(1, target.view(-1, 1).to(out.device))
    if not score.requires_grad:
        raise ModelError(
            f"the model's output is not differentiable with respect to layer {name!r} (is the part after it "
            "run under torch.no_grad()?); choose a layer whose output reaches the prediction through autograd"
        )
    (grad,) = torch.autograd.grad(score.sum(), probe.output, allow_unused=True)
    if grad is None:
        raise ModelError(f"the explained output does not depend on layer {name!r}; choose a layer it depends on")
    return probe.output.detach(), grad


def class_activation_map(
    task: Task,
    method: CamMethod,
    *,
    layer: str | nn.Module | None,
    reshape: Reshape | None,
    normalize: bool | str | None,
    gradients: bool,
    description: str = "CAM",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run a CAM ``method`` over ``task.inputs`` in batches: ``((n, H, W) maps, provenance extras)``.

    ``method`` maps a :class:`CamBatch` to the pre-ReLU CAM at feature resolution ``(b, h, w)``
    (optionally with a dict of per-image lists to store in ``Importance.extra``).
    """
    model = task.torch_model
    if reshape is not None and not callable(reshape):
        raise MethodError(f"reshape must be a callable (n, ...) -> (n, channels, height, width), not {reshape!r}")
    normalize_maps(torch.zeros(1, 1, 1), normalize)  # validates the option before any model call
    if task.inputs.ndim < 3:
        raise MethodError(f"CAMs need images (n, channels, height, width), got data of shape {task.unit_shape}")
    size = (int(task.inputs.shape[-2]), int(task.inputs.shape[-1]))
    name, module = resolve_layer(model.module, layer, model.forward, task.inputs[:1])
    size_b = task.rows_per_call()
    chunks = row_slices(task.n, size_b)
    maps: list[torch.Tensor] = []
    extra: dict[str, Any] = {"layer": name}
    full_graph = False
    for s in progress_bar(chunks, len(chunks), description, task.progress if len(chunks) > 1 else False):
        x = model.to_model(task.inputs[s])
        target = task.target[s].to(model.device)

        def check(out: torch.Tensor, target: torch.Tensor = target, s: slice = s) -> torch.Tensor:
            return task.targets_for(out, target, s)

        try:
            acts, grads = _layer_pass(model, module, name, x, target, gradients, full_graph, check)
        except _LayerDidNotRun:
            if full_graph:
                raise
            full_graph = True  # a fused fast path skipped the layer: record the whole graph from now on
            acts, grads = _layer_pass(model, module, name, x, target, gradients, full_graph, check)
        target = task.target[s].to(model.device)  # as chosen by that forward when it was undecided
        work = torch.promote_types(acts.dtype, torch.float32)
        acts = to_spatial(acts, size, reshape, f"layer {name!r}").to(work)
        if grads is not None:
            grads = to_spatial(grads, size, reshape, f"layer {name!r}").to(work)
        extra["feature_shape"] = list(acts.shape[1:])
        batch = CamBatch(acts, grads, x, target, model, size_b, task.progress)
        out = method(batch)
        cam, more = out if isinstance(out, tuple) else (out, {})
        for key, values in more.items():
            extra.setdefault(key, []).extend(values)
        cam = F.interpolate(cam.clamp_min(0).unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        maps.append(normalize_maps(cam.squeeze(1), normalize))
    return torch.cat(maps), extra


# --------------------------------------------------------------------------------------------- methods
# the CAMs whose one forward (through _layer_pass) checks a given target (no probe row) or chooses the predicted one
GRADIENT_CAM: dict[str, Any] = {
    "family": "cam", "units": "pixel", "needs": "module", "checks_target": True, "predicts_target": True,
}  # fmt: skip
# Shared parameters of every CAM: the layer, how to reshape its output, how to normalise the maps.
_LAYER_DOC = """
    Args:
        layer: name (from ``model.named_modules()``) or module of the layer to read; ``None`` chooses
            the last convolutional stage (CNNs) or the first norm of the last block (ViTs).
        reshape: callable turning the layer's output into ``(n, channels, height, width)``; ``None``
            passes 4-D maps through and lays ViT tokens out on their patch grid.
        normalize: ``True`` (min-max to [0, 1] per image), ``"max"`` (divide by the maximum) or ``False``.
"""


def _doc(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + _LAYER_DOC
    return fn


def _grad_cam_map(b: CamBatch) -> torch.Tensor:
    return weighted_sum(b.gradients.mean((2, 3)), b.activations)


def _grad_cam_pp_map(b: CamBatch) -> torch.Tensor:
    g = b.gradients
    g2 = g * g
    sums = b.activations.sum((2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sums * g2 * g + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return weighted_sum((g.clamp_min(0) * alpha).sum((2, 3)), b.activations)


def _xgrad_cam_map(b: CamBatch) -> torch.Tensor:
    a = b.activations
    weights = (b.gradients * a / (a.sum((2, 3), keepdim=True) + 1e-7)).sum((2, 3))
    return weighted_sum(weights, a)


def _layer_cam_map(b: CamBatch) -> torch.Tensor:
    return weighted_sum(b.gradients.clamp_min(0), b.activations)


@scorer("grad_cam", aliases=("gradcam",), **GRADIENT_CAM)
@_doc
def grad_cam(
    task: Task, *, layer: str | nn.Module | None = None, reshape: Reshape | None = None, normalize: bool | str = True
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Grad-CAM (Selvaraju et al. 2017): a channel's weight is the spatial mean of its gradient."""
    return class_activation_map(
        task, _grad_cam_map, layer=layer, reshape=reshape, normalize=normalize, gradients=True, description="Grad-CAM"
    )


@scorer("grad_cam_plus_plus", aliases=("gradcam++", "grad_cam++"), **GRADIENT_CAM)
@_doc
def grad_cam_plus_plus(
    task: Task, *, layer: str | nn.Module | None = None, reshape: Reshape | None = None, normalize: bool | str = True
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Grad-CAM++ (Chattopadhyay et al. 2018): positive gradients weighted by second/third-order terms.

    ``alpha = g^2 / (2 g^2 + sum(A) g^3)`` (eq. 19, exponential-output form, as pytorch-grad-cam),
    ``w_c = sum ReLU(g) alpha``.
    """
    return class_activation_map(
        task,
        _grad_cam_pp_map,
        layer=layer,
        reshape=reshape,
        normalize=normalize,
        gradients=True,
        description="Grad-CAM++",
    )


@scorer("xgrad_cam", aliases=("xgradcam",), **GRADIENT_CAM)
@_doc
def xgrad_cam(
    task: Task, *, layer: str | nn.Module | None = None, reshape: Reshape | None = None, normalize: bool | str = True
) -> tuple[torch.Tensor, dict[str, Any]]:
    """XGrad-CAM (Fu et al. 2020): gradients weighted by the channel's normalised activations, summed."""
    return class_activation_map(
        task, _xgrad_cam_map, layer=layer, reshape=reshape, normalize=normalize, gradients=True, description="XGrad-CAM"
    )


@scorer("layer_cam", aliases=("layercam",), **GRADIENT_CAM)
@_doc
def layer_cam(
    task: Task, *, layer: str | nn.Module | None = None, reshape: Reshape | None = None, normalize: bool | str = True
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Layer-CAM (Jiang et al. 2021): every position weighted by its own positive gradient."""
    return class_activation_map(
        task, _layer_cam_map, layer=layer, reshape=reshape, normalize=normalize, gradients=True, description="Layer-CAM"
    )


def _small_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a batch of small matrices; on the CPU with one thread.

    LAPACK gains nothing from threads on matrices this small, and its thread pool can cost 100x the
    work when cores are busy (measured: 16 matrices 49 x 49, 1.8 s with 2 threads, 3 ms with 1).
    The thread count is restored on exit.
    """
    if gram.device.type != "cpu":
        return torch.linalg.eigh(gram)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(gram)
    finally:
        torch.set_num_threads(threads)


def principal_projection(activations: torch.Tensor, sign_correction: bool = True) -> torch.Tensor:
    """Activations ``(b, C, h, w)`` projected on their first principal component: ``(b, h, w)``.

    Positions are samples, channels features, centred per channel (as pytorch-grad-cam, which takes
    an SVD; here the same vector comes from an eigendecomposition of the smaller Gram matrix). Its
    sign is arbitrary; ``sign_correction`` flips maps whose minimum is larger in magnitude than their
    maximum (pytorch-grad-cam's Seg-Eigen-CAM rule), so the dominant pattern is positive.
    """
    b, channels, h, w = activations.shape
    exact = torch.float32 if activations.device.type == "mps" else torch.float64  # MPS has no float64
    x = torch.nan_to_num(activations, nan=0.0).flatten(2).transpose(1, 2).to(exact)  # (b, hw, C)
    x = x - x.mean(1, keepdim=True)
    # The first right singular vector v of x, from the eigenvectors of the smaller Gram matrix (in
    # float64): x x^T u = s^2 u gives x v = s u; x^T x v = s^2 v gives x v directly.
    if h * w <= channels:
        vals, vecs = _small_eigh(x @ x.transpose(1, 2))
        proj = vecs[..., -1] * vals[:, -1:].clamp_min(0).sqrt()
    else:
        _, vecs = _small_eigh(x.transpose(1, 2) @ x)
        proj = (x @ vecs[..., -1:]).squeeze(-1)
    proj = proj.to(activations.dtype)
    if sign_correction:
        flip = proj.amin(1).abs() > proj.amax(1).abs()
        proj = torch.where(flip.unsqueeze(1), -proj, proj)
    return proj.view(b, h, w)


@scorer("eigen_cam", aliases=("eigencam",), class_agnostic=True, **GRADIENT_CAM)
@_doc
def eigen_cam(
    task: Task,
    *,
    layer: str | nn.Module | None = None,
    reshape: Reshape | None = None,
    normalize: bool | str = True,
    sign_correction: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Eigen-CAM (Muhammad & Yeasin 2020): the activations' first principal component; no gradients, class-agnostic.

    ``sign_correction=True`` makes the sign deterministic (the larger-magnitude extreme is positive);
    ``False`` keeps the solver's own sign, as pytorch-grad-cam's EigenCAM does, which can differ between
    backends and devices.
    """
    return class_activation_map(
        task,
        lambda b: principal_projection(b.activations, sign_correction),
        layer=layer,
        reshape=reshape,
        normalize=normalize,
        gradients=False,
        description="Eigen-CAM",
    )


def _score_cam_map(b: CamBatch) -> tuple[torch.Tensor, dict[str, list[Any]]]:
    """Channel weights = softmax over channels of the target output on the image masked by each channel."""
    acts, x, model = b.activations, b.inputs, b.model
    m, channels = acts.shape[:2]
    size = x.shape[-2:]
    scores = torch.empty(m, channels, dtype=acts.dtype, device=acts.device)
    flat = acts.flatten(2)
    dead = (flat == 0).all(2)  # all-zero maps mask the image to zeros: one shared model call
    with torch.no_grad():
        if bool(dead.any()):
            out = model.forward(torch.zeros_like(x[:1]))
            rows = dead.nonzero(as_tuple=True)
            scores[rows] = out[0, b.target[rows[0]].to(out.device)].to(scores.dtype).to(scores.device)
        live = (~dead).nonzero()
        chunks = row_slices(len(live), b.batch_size)
        for s in progress_bar(chunks, len(chunks), "Score-CAM masked images", b.progress):
            i, c = live[s, 0], live[s, 1]
            up = F.interpolate(acts[i, c].unsqueeze(1), size=size, mode="bilinear", align_corners=True)
            lo = up.amin((2, 3), keepdim=True)
            hi = up.amax((2, 3), keepdim=True)
            mask = (up - lo) / (hi - lo + 1e-8)
            masked = x[i] * (mask if x.ndim == 4 else mask.squeeze(1)).to(x.dtype)
            out = model.forward(masked)
            scores[i, c] = out.gather(1, b.target[i].view(-1, 1).to(out.device)).squeeze(1).to(scores.dtype)
    weights = torch.softmax(scores, dim=1)
    return weighted_sum(weights, acts), {"masked_images": (~dead).sum(1).tolist()}


@scorer("score_cam", family="cam", units="pixel", needs="module", aliases=("scorecam",))
@_doc
def score_cam(
    task: Task, *, layer: str | nn.Module | None = None, reshape: Reshape | None = None, normalize: bool | str = True
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Score-CAM (Wang et al. 2020): a channel's weight is the model's output on the image masked by it.

    As pytorch-grad-cam: each map is upsampled (bilinear, corners aligned), min-max scaled and multiplied
    into the image; the weights are the softmax over channels of the target logits. All ``n x C`` masked
    images go through the model in batches of ``batch_size``; all-zero maps share one call on a zero image.
    """
    return class_activation_map(
        task,
        _score_cam_map,
        layer=layer,
        reshape=reshape,
        normalize=normalize,
        gradients=False,
        description="Score-CAM",
    )
