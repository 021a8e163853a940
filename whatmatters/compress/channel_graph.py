"""Channel dependencies of plain PyTorch models, from ``torch.fx`` tracing: which layers' output channels can be
removed, with which BatchNorms, and which consumer inputs go with them (used by :mod:`whatmatters.compress.channels`).

A layer is prunable when its output reaches conv / linear consumers only through channel-wise operations
(BatchNorm, activations, dropout, pooling, reductions over spatial axes, and ``flatten`` in front of a
``Linear``, where channel ``c`` is the input block ``[c*h*w, (c+1)*h*w)``); otherwise the reason is recorded.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from whatmatters.compress.api import LAYER_SELECTORS
from whatmatters.compress.linear import match_layers
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.state import preserved

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYERS = (*CONV, nn.Linear)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# operations that act on every channel separately (for any layout)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.clamp, torch.clip, torch.abs, torch.neg,
    operator.mul, operator.truediv, operator.add, operator.sub, operator.neg, operator.iadd, operator.imul,
    torch.mul, torch.add, torch.sub, torch.div,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "to", "abs", "neg", "clamp",
    "clamp_", "mul", "mul_", "div", "div_", "add", "add_", "sub", "sub_",
}  # fmt: skip
# operations that act on every channel separately when channels are axis 1 of an (n, C, *spatial) tensor
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d,
)  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d,
}  # fmt: skip
_FLATTEN = ({torch.flatten, torch.reshape}, {"flatten", "view", "reshape"})
_REDUCE = ({torch.mean, torch.sum, torch.amax}, {"mean", "sum", "amax"})
_SHAPE_METHODS = {"size", "dim"}


# ------------------------------------------------------------------ layers
def select_channel_layers(model: Any, layers: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The ``nn.Conv1d/2d/3d`` and ``nn.Linear`` layers of ``model`` (all, or those matching the regex(es))."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"channel scores and removal need a PyTorch nn.Module, got {type(model).__name__}")
    found = {n: m for n, m in model.named_modules() if n and isinstance(m, LAYERS)}
    if not found:
        raise ModelError(f"{type(model).__name__} has no nn.Conv1d/2d/3d or nn.Linear layer, so no channels to score")
    if layers is None:
        return found
    return match_layers(found, layers, "conv / linear layers")


LAYER_SELECTORS["channel"] = select_channel_layers


def n_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, CONV) else module.out_features


# ------------------------------------------------------------ dependencies
class _Tracer(fx.Tracer):
    """Traces into the modules holding layers of interest; every other module is one opaque operation."""

    def __init__(self, open_modules: set[str]) -> None:
        super().__init__()
        self.open_modules = open_modules
        self.failed: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (*LAYERS, *BATCHNORM)):
            return True
        return super().is_leaf_module(m, qualname) or qualname not in self.open_modules

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:  # the innermost module fails first
                self.failed = self.path_of_module(m)
            raise


def trace(model: nn.Module, names: Sequence[str]) -> fx.GraphModule:
    """``torch.fx`` graph of ``model`` (in its current mode) opening only the modules that hold ``names``."""
    open_modules = {""}
    for name in names:
        parts = name.split(".")
        open_modules |= {".".join(parts[:i]) for i in range(1, len(parts))}
    tracer = _Tracer(open_modules)
    try:
        graph = tracer.trace(model)
    except Exception as err:
        where = f" in module {tracer.failed!r}" if tracer.failed else f" in {type(model).__name__}.forward"
        raise ModelError(
            f"torch.fx cannot trace the model{where} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            "Channel scores and removal need a traceable forward: pass layers= regular expressions selecting only "
            "layers outside that module (modules holding no selected layer are treated as one opaque operation), "
            "or remove the data-dependent Python control flow from its forward"
        ) from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def shape_query(node: fx.Node) -> bool:
    """A node computing sizes, not tensors (``x.size(0)``, ``x.shape[1]``, arithmetic on them)."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "dtype", "device", "ndim")
    if node.op == "call_function" and getattr(node.target, "__module__", "") in ("_operator", "operator"):
        inputs = [a for a in node.all_input_nodes]
        return bool(inputs) and all(shape_query(a) for a in inputs)
    return False


def _other_tensors(u: fx.Node, n: fx.Node, shapes: dict[str, tuple] | None) -> list[fx.Node]:
    """Tensor inputs of ``u`` other than ``n``."""
    others = [a for a in u.all_input_nodes if a is not n]
    if shapes is not None:
        return [a for a in others if a.name in shapes]
    return [a for a in others if not shape_query(a)]


@dataclass
class Layout:
    """Where the channels of a tensor are: axis 1 (``"first"``), the last axis, or flattened blocks (``"flat"``)."""

    kind: str
    block: int = 1


@dataclass
class LayerDeps:
    """One conv / linear layer's channel dependencies."""

    name: str
    module: nn.Module
    channels: int
    batchnorms: list[str] = field(default_factory=list)
    consumers: dict[str, int] = field(default_factory=dict)  # consumer -> input features per channel
    point: str = ""  # the graph node where the channels enter the next layer (channel_taylor's mask point)
    point_layout: str = "first"
    reason: str | None = None  # why the layer cannot be pruned; None when it can

    @property
    def prunable(self) -> bool:
        return self.reason is None


def _describe(u: fx.Node, modules: dict[str, nn.Module]) -> str:
    if u.op == "call_module":
        return f"module {u.target!r} ({type(modules[u.target]).__name__})"
    if u.op == "call_method":
        return f"the tensor method .{u.target}()"
    return f"{getattr(u.target, '__name__', str(u.target))}()"


def _step(
    u: fx.Node,
    n: fx.Node,
    layout: Layout,
    channels: int,
    modules: dict[str, nn.Module],
    calls: dict[str, int],
    shapes: dict[str, tuple] | None,
) -> tuple:
    """How the channels in ``n`` pass into its user ``u``.

    Returns ``("pass", layout)``, ``("bn", name)``, ``("consumer", name, features_per_channel)`` or
    ``("stop", reason)``.
    """
    unknown = ("stop", f"its output feeds {_describe(u, modules)}, which is not known to keep channels separate")
    if u.op == "output":
        return ("stop", "its output is a model output")
    others = _other_tensors(u, n, shapes)
    if u.op == "call_function" and u.target in (operator.add, operator.iadd, torch.add) and others:
        return ("stop", "its output is added to another tensor (residual connection), which couples the channels")
    if u.op == "call_function" and u.target in (torch.cat, torch.concat, torch.stack):
        return ("stop", "its output is concatenated with other tensors, which couples the channel positions")
    if others:
        return ("stop", f"its output is combined with another tensor in {_describe(u, modules)}, coupling the channels")
    first = layout.kind == "first"
    if u.op == "call_module":
        m = modules[u.target]
        if calls[u.target] > 1 and isinstance(m, (*LAYERS, *BATCHNORM)):
            return ("stop", f"it feeds {u.target!r}, which is called more than once (shared weights)")
        if isinstance(m, CONV):
            if not first:
                return ("stop", f"it feeds the convolution {u.target!r} with channels on another axis")
            if m.groups > 1:
                return ("stop", f"it feeds the grouped / depthwise convolution {u.target!r}, whose channels are tied")
            return ("consumer", u.target, 1) if m.in_channels == channels else unknown
        if isinstance(m, nn.Linear):
            if first:
                return ("stop", f"it feeds the Linear {u.target!r} along the last (not the channel) axis")
            ok = m.in_features == channels * layout.block
            return ("consumer", u.target, layout.block) if ok else unknown
        if isinstance(m, BATCHNORM):
            if (layout.kind == "flat" and layout.block > 1) or m.num_features != channels:
                return ("stop", f"the BatchNorm {u.target!r} does not normalize its channels one by one")
            if layout.kind == "last" and shapes is not None and len(shapes.get(n.name, ())) != 2:
                return ("stop", f"the BatchNorm {u.target!r} normalizes another axis than the channels")
            return ("bn", u.target)
        if isinstance(m, _ELEMENTWISE_MODULES):
            return ("pass", layout)
        if isinstance(m, _POOL_MODULES):
            return ("pass", layout) if first else unknown
        if isinstance(m, nn.Flatten):
            return _flatten(u, n, layout, shapes)
        return unknown
    if u.op == "call_function":
        if u.target in _ELEMENTWISE_FUNCTIONS:
            return ("pass", layout)
        if u.target in _POOL_FUNCTIONS:
            return ("pass", layout) if first else unknown
        if u.target in _FLATTEN[0]:
            return _flatten(u, n, layout, shapes)
        if u.target in _REDUCE[0]:
            return _reduce(u, n, layout, shapes)
        return unknown
    if u.op == "call_method":
        if u.target in _ELEMENTWISE_METHODS:
            return ("pass", layout)
        if u.target in _FLATTEN[1]:
            return _flatten(u, n, layout, shapes)
        if u.target in _REDUCE[1]:
            return _reduce(u, n, layout, shapes)
    return unknown


def _flatten(u: fx.Node, n: fx.Node, layout: Layout, shapes: dict[str, tuple] | None) -> tuple:
    if shapes is None or n.name not in shapes or u.name not in shapes:
        return ("stop", "its output is reshaped (pass example_input so the flattened layout can be checked)")
    a, b = shapes[n.name], shapes[u.name]
    if layout.kind == "first" and len(a) >= 3 and b == (a[0], math.prod(a[1:])):
        return ("pass", Layout("flat", math.prod(a[2:])))
    if a == b:
        return ("pass", layout)
    return ("stop", f"its output is reshaped from {a} to {b}, which mixes the channels with other axes")


def _reduce(u: fx.Node, n: fx.Node, layout: Layout, shapes: dict[str, tuple] | None) -> tuple:
    """Mean / sum / amax over the spatial axes of an ``(n, C, *spatial)`` tensor (global pooling)."""
    if layout.kind != "first" or shapes is None or n.name not in shapes or u.name not in shapes:
        return ("stop", f"its output is reduced by .{getattr(u.target, '__name__', u.target)}() over unknown axes")
    a, b = shapes[n.name], shapes[u.name]
    dims = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        return ("stop", "its output is reduced over all axes, which mixes the channels")
    if any(d % len(a) < 2 for d in dims):
        return ("stop", "its output is reduced over the batch or channel axis, which mixes the channels")
    if b == a[:2]:
        return ("pass", Layout("flat", 1))
    return ("pass", layout) if b[:2] == a[:2] else ("stop", "its output is reduced in a way that mixes the channels")


def _record_shapes(gm: fx.GraphModule, inputs: tuple) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            out = super().run_node(node)
            if isinstance(out, torch.Tensor):
                shapes[node.name] = tuple(out.shape)
            return out

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return shapes


def as_inputs(example_input: Any) -> tuple:
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise InputError(
            f"example_input must be a tensor (or a tuple of tensors) the model accepts, e.g. a batch of two "
            f"images, got {type(example_input).__name__}"
        )
    return inputs


def dependencies(
    model: nn.Module, names: Sequence[str], example_input: Any = None
) -> tuple[fx.GraphModule, dict[str, LayerDeps]]:
    """Trace ``model`` (in eval mode; restored after) and find the channel dependencies of the layers ``names``.

    ``example_input`` gives the shapes needed for ``flatten`` / reductions; without it they stop a chain.
    """
    with preserved(model):
        model.eval()
        gm = trace(model, names)
        shapes = None
        if example_input is not None:
            inputs = as_inputs(example_input)
            try:
                shapes = _record_shapes(gm, inputs)
            except Exception as err:
                raise InputError(
                    f"the model fails on example_input ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                    "give a batch of inputs it accepts"
                ) from None
    modules = dict(gm.named_modules())
    nodes: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            nodes.setdefault(node.target, []).append(node)
    calls = {k: len(v) for k, v in nodes.items()}
    deps = {}
    for name in names:
        module = modules.get(name)
        if module is None:  # an opaque module holds it: not reached by the graph
            module = model.get_submodule(name)
        d = LayerDeps(name, module, n_channels(module))
        deps[name] = d
        if name not in nodes:
            d.reason = "it is not called as a module in the traced forward (inside an opaque module, or unused)"
            continue
        if calls[name] > 1:
            d.reason = "it is called more than once (shared weights)"
            continue
        if isinstance(module, CONV) and module.groups > 1:
            d.reason = "grouped / depthwise convolution: its output channels are tied to its input channels"
        start = nodes[name][0]
        layout = Layout("first" if isinstance(module, CONV) else "last")
        d.point_layout = layout.kind
        _walk(d, start, layout, modules, calls, shapes)
        if d.reason is None and not d.consumers:
            d.reason = "its output reaches no conv / linear layer"
    return gm, deps


def _walk(
    d: LayerDeps,
    start: fx.Node,
    layout: Layout,
    modules: dict[str, nn.Module],
    calls: dict[str, int],
    shapes: dict[str, tuple] | None,
) -> None:
    """Follow the channels of ``start`` to the consuming layers; set ``d``'s BatchNorms, consumers, point, reason."""
    # the point: the end of the single-user chain of channel-wise ops (not crossing flatten / reductions)
    point = start
    while True:
        users = [u for u in point.users if not shape_query(u)]
        if len(users) != 1:
            break
        step = _step(users[0], point, layout, d.channels, modules, calls, shapes)
        if step[0] == "bn" or (step[0] == "pass" and step[1].kind == layout.kind and step[1].block == 1):
            point = users[0]
            continue
        break
    d.point = point.name
    stack, seen = [(start, layout)], {start.name}
    while stack:
        n, lay = stack.pop()
        for u in n.users:
            if shape_query(u):
                continue
            step = _step(u, n, lay, d.channels, modules, calls, shapes)
            if step[0] == "stop":
                d.reason = d.reason or step[1]
                continue
            if step[0] == "consumer":
                d.consumers[step[1]] = step[2]
                continue
            if step[0] == "bn":
                d.batchnorms.append(step[1])
            if u.name not in seen:
                seen.add(u.name)
                stack.append((u, step[1] if step[0] == "pass" else lay))
