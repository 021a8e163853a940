"""Channel importance and channel removal for plain PyTorch CNNs and MLPs (``nn.Conv1d/2d/3d``, ``nn.Linear``).

Scores (``whatmatters.compress.score(model, method, data=x)``), higher = keep:

* ``channel_l1``: L1 norm of each output filter / weight row (Li et al., 2017); no data.
* ``bn_scale``: ``|gamma|`` of the BatchNorm that directly follows the layer (network slimming, Liu et
  al., 2017); only layers followed by a BatchNorm are scored; no data.
* ``channel_taylor``: ``E_x |sum_positions a(x) * dL(x)/da(x)|`` (Molchanov et al., 2017), ``a`` being the
  channel where it enters the next layer (after BatchNorm, activation and pooling), i.e. the first-order loss
  change when the channel is removed; loss: cross-entropy to the labels when given (``data=[(x, y)]`` or a
  DataLoader of pairs), else to the predicted class (``compress.batches.default_loss``).

Result shape: one :class:`~whatmatters.core.importance.Importance` with ``unit="channel"`` and values
``(total_channels,)``, the scored layers' output channels concatenated in model order and named
``"layer:channel"``; ``extra["layers"]`` / ``extra["channels"]`` give the layers and their channel counts
(:func:`channels_by_layer` splits the values per layer). One flat vector keeps every ``Importance``
operation (``top`` over the whole model, ``rank``, ``agreement`` between methods, ``save``) and is what
``allocation="global"`` ranks; a per-layer mapping would need a second result type for no gain.

:func:`prune_channels` removes the lowest-scored output channels of each prunable layer together with the
following BatchNorm entries and the matching inputs of the consuming layer(s). Dependencies come from
``torch.fx`` symbolic tracing and one forward pass on ``example_input`` (for shapes): a layer is prunable
when its output reaches conv/linear consumers only through channel-wise operations (BatchNorm,
activations, dropout, pooling, reductions over spatial axes, and ``flatten`` in front of a ``Linear``,
where channel ``c`` is the input block ``[c*h*w, (c+1)*h*w)``). Layers whose channels are coupled to
something else (residual additions, concatenation, grouped / depthwise convolutions, model outputs,
modules whatmatters cannot see into) are kept and listed with the reason in the report. With ``calibration=``
data, the removed channels' means are folded into the consumers' biases and BatchNorm statistics re-estimated.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import fx, nn

from whatmatters.compress.api import WeightTask
from whatmatters.compress.batches import as_batches
from whatmatters.compress.channel_graph import (
    BATCHNORM,
    CONV,
    LAYERS,
    as_inputs,
    dependencies,
    n_channels,
    select_channel_layers,
    shape_query,
)
from whatmatters.compress.remove import RemovalCounts, as_parameter, check_amount, n_parameters, standardize_rows
from whatmatters.compress.structured import calibration_batches, calibration_loss, calibration_progress
from whatmatters.core.actions import Compressed
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.fractions import units_removed, whole
from whatmatters.core.importance import Importance
from whatmatters.core.registry import scorer
from whatmatters.core.state import hooks, parameter_device_dtype, preserved
from whatmatters.core.task import progress_bar


# ------------------------------------------------------------------ scores
def _result(values: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> tuple:
    names = list(values)
    flat = torch.cat([values[n].detach().float().reshape(-1).cpu() for n in names])
    labels = [f"{n}:{c}" for n in names for c in range(len(values[n]))]
    out = {"names": labels, "layers": names, "channels": [len(values[n]) for n in names], **(extra or {})}
    return flat, out


def channels_by_layer(importance: Importance) -> dict[str, torch.Tensor]:
    """Split a channel :class:`Importance` into ``{layer: (channels,) scores}`` (views of ``values``)."""
    layers, counts = _layers_of(importance)
    return dict(zip(layers, importance.values.split(counts)))


@scorer("channel_l1", verb="compress", units=("channel",), family="structured", needs="module", per_sample=False,
        aliases=("filter_l1",))  # fmt: skip
def channel_l1(task: WeightTask) -> tuple[torch.Tensor, dict]:
    """L1 norm of each output channel's weights (a conv filter or a linear row; Li et al., 2017). No data."""
    return _result({n: m.weight.detach().abs().reshape(n_channels(m), -1).sum(1) for n, m in task.layers.items()})


@scorer("bn_scale", verb="compress", units=("channel",), family="structured", needs="module", per_sample=False,
        aliases=("network_slimming",))  # fmt: skip
def bn_scale(task: WeightTask) -> tuple[torch.Tensor, dict]:
    """``|gamma|`` of the BatchNorm directly after each layer (network slimming, Liu et al., 2017). No data.

    Only layers whose output goes to one affine BatchNorm (and nowhere else) are scored; ``extra["batchnorm"]``
    names each one's BatchNorm.
    """
    gm, _ = dependencies(task.model, list(task.layers))
    modules = dict(gm.named_modules())
    values, bns = {}, {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in task.layers:
            continue
        users = [u for u in node.users if not shape_query(u)]
        if len(users) == 1 and users[0].op == "call_module":
            bn = modules[users[0].target]
            if isinstance(bn, BATCHNORM) and bn.affine and bn.num_features == n_channels(modules[node.target]):
                values[node.target] = bn.weight.detach().abs()
                bns[node.target] = users[0].target
    if not values:
        raise ModelError(
            "bn_scale needs layers followed directly by an affine BatchNorm, and none of the selected layers is; "
            "use 'channel_l1' or 'channel_taylor'"
        )
    order = [n for n in task.layers if n in values]
    return _result({n: values[n] for n in order}, {"batchnorm": bns})


class _Masked(fx.Interpreter):
    """Runs the traced model multiplying a per-sample channel mask ``(n, C)`` into the output of given nodes."""

    def __init__(self, gm: fx.GraphModule, points: dict[str, tuple[int, str]], masks: list[torch.Tensor]) -> None:
        super().__init__(gm)
        self.points, self.masks = points, masks

    def run_node(self, node: fx.Node) -> Any:
        out = super().run_node(node)
        where = self.points.get(node.name)
        if where is not None:
            mask = self.masks[where[0]].to(out.dtype)
            shape = [mask.shape[0]] + [1] * (out.ndim - 1)
            shape[1 if where[1] == "first" else -1] = mask.shape[1]
            out = out * mask.reshape(shape)
        return out


@scorer("channel_taylor", verb="compress", units=("channel",), family="structured", needs="module",
        per_sample=False, aliases=("molchanov",))  # fmt: skip
def channel_taylor(task: WeightTask) -> tuple[torch.Tensor, dict]:
    """First-order Taylor importance ``E_x |sum_positions a * dL/da|`` of each output channel (Molchanov et al., 2017).

    ``a`` is the channel where it enters the next layer (``extra["points"]`` names the graph node): there
    removing the channel equals zeroing it, so the score estimates the loss change of removal. Per-sample
    gradients come from a ones mask per sample and channel (one backward pass per batch; the loss is a batch
    mean, so gradients are multiplied by the batch size).
    """
    model = task.model
    batches = calibration_batches(task, "gradients")
    for b in batches:
        if b.kwargs or not b.args:
            raise InputError(
                "channel_taylor needs input tensors: pass data=images, data=[(images, labels)] or a DataLoader of "
                "(images, labels) pairs (integer labels given alone are read as token ids)"
            )
    gm, deps = dependencies(model, list(task.layers))
    names = list(task.layers)
    points = {deps[n].point: (i, deps[n].point_layout) for i, n in enumerate(names)}
    device, _ = parameter_device_dtype(model)
    totals = [torch.zeros(deps[n].channels, dtype=torch.float64, device=device) for n in names]
    count = 0
    for p in model.parameters():
        p.requires_grad_(False)  # restored by score()'s preserved()
    model.eval()
    for batch in progress_bar(batches, len(batches), "channel gradients", calibration_progress(task)):
        batch = batch.to(device)
        b = batch.size
        masks = [torch.ones(b, deps[n].channels, device=device, requires_grad=True) for n in names]
        with torch.enable_grad():
            output = _Masked(gm, points, masks).run(*batch.args)
            grads = torch.autograd.grad(calibration_loss(task, output, batch), masks, allow_unused=True)
        for total, g in zip(totals, grads):
            if g is not None:
                total += (g.detach().double() * b).abs().sum(0)
        count += b
    values = {n: (t / max(count, 1)).float() for n, t in zip(names, totals)}
    return _result(values, {"points": {n: deps[n].point for n in names}})


# ----------------------------------------------------------------- removal
@dataclass
class ChannelReport(RemovalCounts):
    """What ``prune_channels`` did: channels per layer, removed indices, skipped layers and why, parameters."""

    method: str
    allocation: str
    amount: float
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)  # prunable layer -> (before, after)
    removed: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> reason it was kept whole
    n_parameters_before: int = 0
    n_parameters_after: int = 0
    compensated: list[str] = field(default_factory=list)  # consumers whose bias took the removed channels' means
    biases_created: list[str] = field(default_factory=list)  # consumers that had no bias before compensation
    recalibrated: list[str] = field(default_factory=list)  # BatchNorms whose running statistics were re-estimated

    def to_frame(self):
        """A pandas DataFrame, one row per scored layer: channels before / after and, if kept whole, why."""
        import pandas as pd

        rows = [{"layer": n, "before": b, "after": a, "skipped": ""} for n, (b, a) in self.channels.items()]
        rows += [{"layer": n, "before": None, "after": None, "skipped": r} for n, r in self.skipped.items()]
        return pd.DataFrame(rows).set_index("layer")

    def __repr__(self) -> str:
        return (
            f"ChannelReport(method={self.method!r}, allocation={self.allocation!r}, amount={self.amount:g}, "
            f"removed {self.n_removed} channels from {len(self.channels)} layers, {len(self.skipped)} layers skipped, "
            f"parameters {self.n_parameters_before:,} -> {self.n_parameters_after:,} ({self.parameter_ratio:.3f}), "
            f"{len(self.compensated)} biases compensated, {len(self.recalibrated)} BatchNorms recalibrated)"
        )


ChannelPruned = Compressed  # the result: (model, ChannelReport)


def _layers_of(importance: Any) -> tuple[list[str], list[int]]:
    if not isinstance(importance, Importance):
        raise InputError(
            "importance must be a channel Importance from whatmatters.compress.score(model, 'channel_l1' | 'bn_scale' "
            f"| 'channel_taylor', ...), got {type(importance).__name__}"
        )
    if importance.unit != "channel" or importance.per_sample:
        raise InputError(
            f"prune_channels needs a unit='channel' importance (not per sample), got unit={importance.unit!r}"
            f"{', per sample' if importance.per_sample else ''}; score with 'channel_l1', 'bn_scale' or "
            "'channel_taylor'"
        )
    layers, counts = importance.extra.get("layers"), importance.extra.get("channels")
    if not isinstance(layers, list) or not isinstance(counts, list) or len(layers) != len(counts):
        raise InputError("the channel importance lacks extra['layers'] / extra['channels']; score the model again")
    counts = [int(c) for c in counts]
    if tuple(importance.values.shape) != (sum(counts),):
        raise InputError(
            f"the channel importance has values of shape {tuple(importance.values.shape)} but its layers hold "
            f"{sum(counts)} channels"
        )
    return [str(n) for n in layers], counts


def plan(scores: dict[str, torch.Tensor], amount: float, allocation: str) -> dict[str, torch.Tensor]:
    """Boolean ``removed`` mask per layer: the lowest scores (ties by position), at least one channel kept per layer.

    ``"uniform"``: ``round(amount * C)`` of every layer's ``C`` channels (at most ``C - 1``); ``"global"``:
    the ``round(amount * total)`` lowest scores over all layers, never a layer's best channel.
    """
    if allocation == "uniform":
        out = {}
        for name, v in scores.items():
            k = min(units_removed(amount, len(v), "channels of a layer"), len(v) - 1)
            mask = torch.zeros(len(v), dtype=torch.bool)
            mask[torch.sort(v.double(), stable=True).indices[:k]] = True
            out[name] = mask
        return out
    names = list(scores)
    flat = torch.cat([scores[n].double() for n in names])
    counts = [len(scores[n]) for n in names]
    k = min(units_removed(amount, len(flat), "channels"), len(flat) - len(names))
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0)
    best = torch.stack([torch.sort(scores[n].double(), stable=True).indices[-1] for n in names]) + starts
    ranked = flat.clone()
    ranked[best] = float("inf")
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[torch.sort(ranked, stable=True).indices[:k]] = True
    return dict(zip(names, mask.split(counts)))


def _slice_layer(
    m: nn.Module, keep_out: torch.Tensor | None, keep_in: torch.Tensor | None, mean: torch.Tensor | None = None
) -> bool:
    """Keep output / input channels of a conv / linear layer; returns True when a bias was created.

    With ``mean`` (the mean of every input feature, or of every input channel of a conv), the removed inputs'
    constant contribution ``sum_kernel W[:, removed] * mean[removed]`` is first folded into the bias.
    """
    created = False
    with torch.no_grad():
        if mean is not None and keep_in is not None:
            w = m.weight
            gone = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
            gone[keep_in.to(w.device)] = False
            taps = w[:, gone].double().reshape(w.shape[0], int(gone.sum()), -1).sum(-1)
            delta = (taps @ mean.to(w.device, torch.float64)[gone]).to(w.dtype)
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), m.weight.requires_grad)
                created = True
            m.bias += delta
        w = m.weight
        if keep_out is not None:
            w = w[keep_out.to(w.device)]
            if m.bias is not None:
                m.bias = as_parameter(m.bias[keep_out.to(w.device)], m.bias)
        if keep_in is not None:
            w = w[:, keep_in.to(w.device)]
        m.weight = as_parameter(w, m.weight)
    if isinstance(m, CONV):
        m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
    else:
        m.out_features, m.in_features = m.weight.shape
    return created


def _slice_bn(bn: nn.Module, keep: torch.Tensor) -> None:
    with torch.no_grad():
        for attr in ("weight", "bias"):
            p = getattr(bn, attr)
            if p is not None:
                setattr(bn, attr, as_parameter(p[keep.to(p.device)], p))
        for attr in ("running_mean", "running_var"):
            t = getattr(bn, attr)
            if t is not None:
                setattr(bn, attr, t[keep.to(t.device)].clone())
    bn.num_features = len(keep)


def prune_channels(
    model: nn.Module,
    importance: Importance,
    amount: float = 0.3,
    *,
    example_input: Any,
    allocation: str = "uniform",
    standardize: bool = True,
    layers: str | Sequence[str] | None = None,
    calibration: Any = None,
    compensate: bool = False,
    recalibrate_bn: bool | None = None,
    batch_size: int = 64,
) -> ChannelPruned:
    """Remove the lowest-scored output channels of a plain PyTorch CNN / MLP (a new model; ``model`` is unchanged).

    Args:
        model: the ``nn.Module`` the importance was computed for (traceable with ``torch.fx``).
        importance: a ``unit="channel"`` Importance from ``whatmatters.compress.score`` (higher = keep).
        amount: fraction of channels removed, in ``[0, 1)``, rounded to whole channels; every layer keeps one.
        example_input: a batch the model accepts (a tensor or a tuple of tensors), for the shapes behind
            ``flatten`` -> ``Linear`` and a check that the pruned model runs.
        allocation: ``"uniform"`` (the same fraction of every prunable layer) or ``"global"`` (the lowest scores
            over all prunable layers).
        standardize: with ``"global"``, compare ``(score - mean) / std`` within each layer (FLAP's adaptive
            structure search) instead of raw scores, whose scale differs between layers (filter norms grow
            with fan-in); on the shapes CNN it raises accuracy at 25 % for every score (see the README).
        layers: regular expression(s): prune only the scored layers matching them.
        calibration: inputs like ``example_input`` (a tensor of samples, or a DataLoader of tensors or
            ``(inputs, labels)`` pairs) for mean compensation and ``recalibrate_bn``.
        compensate: fold the mean of each removed channel, measured where it enters the consuming layer (after
            BatchNorm, activation, pooling; over samples and positions, in the original model in eval mode),
            into that layer's bias (created if missing), as FLAP does for transformers: ``b += W[:, removed] @
            mean`` for a Linear (per position for ``flatten``), ``b += sum_kernel W[:, removed] * mean`` for a
            conv. Exact for channels that are constant there, except where a zero-padded conv's kernel overlaps
            the border (its padding zeros also receive the mean). Opt-in: on the shapes CNN it helps one pruned
            layer at a time but lowers accuracy when every layer is pruned at once.
        recalibrate_bn: re-estimate the running statistics of every BatchNorm of the pruned model on
            ``calibration`` (one pass, BatchNorms in train mode with a cumulative average; no weight changes).
            Default: when ``calibration`` is given. Removal also shrinks the variance of the consumers' outputs,
            which the stored statistics do not know; on the shapes CNN recalibration raises accuracy for every
            score, while compensation alone often lowers it (see ``benchmarks/bench_channels.py``). After a
            recalibrated BatchNorm the compensated mean is re-estimated anyway; it matters for consumers
            without one (e.g. the classifier).
        batch_size: rows per forward pass when ``calibration`` is one tensor.

    Returns:
        ``ChannelPruned(model, report)``; ``report.skipped`` lists the scored layers kept whole and why.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"prune_channels needs a PyTorch nn.Module, got {type(model).__name__}")
    if allocation not in ("uniform", "global"):
        raise InputError(f"allocation must be 'uniform' or 'global', got {allocation!r}")
    amount = check_amount(amount, "removes a quarter of each prunable layer's channels")
    for flag, value in (("compensate", compensate), ("recalibrate_bn", recalibrate_bn), ("standardize", standardize)):
        if value is not None and not isinstance(value, bool):
            raise InputError(f"{flag} must be True or False, got {value!r}")
    recalibrate_bn = calibration is not None if recalibrate_bn is None else recalibrate_bn
    if (compensate or recalibrate_bn) and calibration is None:
        flag = "compensate=True" if compensate else "recalibrate_bn=True"
        raise InputError(f"{flag} needs calibration data: pass calibration=inputs (e.g. a few hundred training images)")
    batch_size = whole(batch_size, "batch_size")
    names, counts = _layers_of(importance)
    values = importance.values.detach().float().cpu()
    if not bool(torch.isfinite(values).all()):
        raise InputError("the channel importance holds NaN or infinite values")
    present = dict(model.named_modules())
    for name, count in zip(names, counts):
        m = present.get(name)
        if not isinstance(m, LAYERS) or n_channels(m) != count:
            what = (
                "no such layer"
                if m is None
                else f"{type(m).__name__} with {n_channels(m) if isinstance(m, LAYERS) else '?'} channels"
            )
            raise ModelError(
                f"the importance scores {count} channels of {name!r}, but this model has {what}: it was computed "
                "for another model; score this model"
            )
    scores = dict(zip(names, values.split(counts)))
    if layers is not None:
        wanted = set(select_channel_layers(model, layers))
        scores = {n: v for n, v in scores.items() if n in wanted}
        if not scores:
            raise InputError(f"layers={layers!r} selects none of the scored layers ({', '.join(names[:4])}, ...)")
    _, deps = dependencies(model, list(scores), example_input)
    batches = _calibration_batches(calibration, example_input, batch_size) if calibration is not None else []
    prunable = {n: v for n, v in scores.items() if deps[n].prunable}
    if standardize and allocation == "global":
        prunable = {n: standardize_rows(v[None])[0] for n, v in prunable.items()}
    removed = plan(prunable, amount, allocation) if prunable else {}

    before = n_parameters(model)
    keep_out = {n: (~gone).nonzero().reshape(-1) for n, gone in removed.items() if bool(gone.any())}
    keep_in: dict[str, torch.Tensor] = {}
    for name, keep in keep_out.items():
        for consumer, block in deps[name].consumers.items():
            keep_in[consumer] = (keep[:, None] * block + torch.arange(block)).reshape(-1)
    means = _input_means(model, sorted(keep_in), batches) if compensate else {}
    pruned = copy.deepcopy(model)
    created = [
        name
        for name in sorted(set(keep_out) | set(keep_in))
        if _slice_layer(pruned.get_submodule(name), keep_out.get(name), keep_in.get(name), means.get(name))
    ]
    for name, keep in keep_out.items():
        for bn in deps[name].batchnorms:
            _slice_bn(pruned.get_submodule(bn), keep)
    _check_runs(pruned, example_input)
    recalibrated = _recalibrate_bn(pruned, batches) if recalibrate_bn else []
    report = ChannelReport(
        method=importance.method,
        allocation=allocation,
        amount=amount,
        channels={n: (len(g), int((~g).sum())) for n, g in removed.items()},
        removed={n: g.nonzero().reshape(-1).tolist() for n, g in removed.items()},
        skipped={n: str(deps[n].reason) for n in scores if not deps[n].prunable},
        n_parameters_before=before,
        n_parameters_after=n_parameters(pruned),
        compensated=sorted(means),
        biases_created=created,
        recalibrated=recalibrated,
    )
    return ChannelPruned(pruned, report)


def _calibration_batches(calibration: Any, example_input: Any, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """The positional inputs of each calibration batch, checked against ``example_input``'s per-sample shapes."""
    want = [tuple(x.shape[1:]) for x in as_inputs(example_input)]
    out = []
    for batch in as_batches(calibration, batch_size=batch_size):
        if batch.kwargs or not batch.args:
            raise InputError(
                "calibration must hold input tensors the model takes positionally: a float tensor of samples "
                "(n, ...) or a DataLoader of tensors or (inputs, labels) pairs (integer tensors are read as token ids)"
            )
        got = [tuple(a.shape[1:]) for a in batch.args]
        if got != want:
            raise InputError(
                f"calibration samples have shape {got[0] if len(got) == 1 else got} but example_input's samples have "
                f"{want[0] if len(want) == 1 else want}; give calibration inputs of the shape the model is run on"
            )
        out.append(batch.args)
    return out


def _input_means(model: nn.Module, consumers: Sequence[str], batches: list[tuple]) -> dict[str, torch.Tensor]:
    """Mean (float64) of every input channel of each consumer (over samples and positions; per feature for a
    Linear) on the calibration batches, from forward pre-hooks on the original model in eval mode."""
    if not consumers:
        return {}
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(consumers, 0)

    def record(name: str, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        axis = x.ndim - 1 - len(module.kernel_size) if isinstance(module, CONV) else x.ndim - 1
        total = x.sum([d for d in range(x.ndim) if d != axis], dtype=torch.float64)
        sums[name] = sums[name] + total if name in sums else total
        counts[name] += x.numel() // x.shape[axis]

    device, _ = parameter_device_dtype(model)
    handles = [model.get_submodule(n).register_forward_pre_hook(partial(record, n)) for n in consumers]
    with preserved(model, weights=False), hooks(*handles), torch.no_grad():
        model.eval()
        for args in batches:
            try:
                model(*(a.to(device) for a in args))
            except Exception as err:
                raise InputError(
                    f"the model fails on the calibration data ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200]}); give inputs the model accepts"
                ) from None
    missing = [n for n in consumers if n not in sums]
    if missing:
        raise ModelError(f"the layers {missing} were not called on the calibration data, so their inputs have no mean")
    means = {n: sums[n] / counts[n] for n in consumers}
    bad = [n for n, v in means.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(f"the calibration data gives non-finite inputs to {bad}; check it for inf / huge values")
    return means


def _recalibrate_bn(model: nn.Module, batches: list[tuple]) -> list[str]:
    """Re-estimate the running statistics of ``model``'s BatchNorms in place (cumulative average over one pass)."""
    bns = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }
    if not bns:
        return []
    device, _ = parameter_device_dtype(model)
    modes = [(m, m.training) for m in model.modules()]
    momenta = {n: m.momentum for n, m in bns.items()}
    try:
        model.eval()
        for m in bns.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the batches
            m.train()
        with torch.no_grad():
            for args in batches:
                try:
                    model(*(a.to(device) for a in args))
                except ValueError as err:
                    raise InputError(
                        f"recalibrate_bn failed ({str(err).splitlines()[0][:200]}): BatchNorm statistics need "
                        "calibration batches of more than one sample"
                    ) from None
    finally:
        for n, m in bns.items():
            m.momentum = momenta[n]
        for m, training in modes:
            m.training = training
    return list(bns)


def _check_runs(model: nn.Module, example_input: Any) -> None:
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*as_inputs(example_input))
    except Exception as err:
        raise ModelError(
            f"the pruned model fails on example_input ({type(err).__name__}: {str(err).splitlines()[0][:200]}): "
            "a channel dependency was missed; report this model, and pass layers= to leave the failing layer out"
        ) from None
    finally:
        for m, training in modes:
            m.training = training


__all__ = [
    "ChannelPruned",
    "ChannelReport",
    "channels_by_layer",
    "dependencies",
    "plan",
    "prune_channels",
    "select_channel_layers",
]
