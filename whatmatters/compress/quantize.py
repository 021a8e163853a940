"""``whatmatters.compress.quantize``: mixed-precision bit allocation from layer scores, and fake quantization.

Two steps, as in LRP-QViT (Ranjan & Savakis, 2024, arXiv 2401.11243):

1. :func:`allocate_bits` turns one score per layer (LRP relevance, Fisher, magnitude, ...) into a bit
   width per layer under an average-bit budget weighted by parameter count;
2. :func:`quantize` returns a fake-quantized copy of the model: per-output-channel symmetric weight
   quantization of every chosen ``Linear`` / ``Conv`` layer, and optionally activation quantization of
   their inputs (per-tensor ranges from calibration data; post-LayerNorm activations channel-wise with
   percentile clipping, the "clipped channel-wise" quantizer of the paper).

:func:`layer_scores` computes the layer scores compared in ``benchmarks/bench_quantize.py``.

Allocation rule. The paper text available here states the goal (more relevant layers get more bits
at a fixed average) but not a closed-form rule we could verify, so the rule is the classic
rate-distortion one, documented here: a layer quantized to ``b`` bits adds output noise of power
``~ 4**-b`` (each bit halves the step), weighted by the layer's score ``s``. All layers start at the
lowest choice; the upgrade (one layer to its next choice) with the largest
``s * (4**-b - 4**-b_next) / (b_next - b)`` (distortion removed per extra bit of each weight; the cost
``n * (b_next - b)`` bit-parameters and the gain both scale with the layer size ``n``) is applied while it
fits the budget, then smaller upgrades that still fit. At the optimum a layer with a 4x larger score
gets about one bit more. Equal scores give uniform bits when the budget is one of the choices.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from whatmatters.compress.batches import as_batches, call_model
from whatmatters.compress.linear import HEAD_PATTERN, conv1d_type, match_layers
from whatmatters.core.actions import Compressed
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.fractions import whole
from whatmatters.core.importance import Importance
from whatmatters.core.state import hooks, preserved

CHOICES: tuple[int, ...] = (2, 3, 4, 6, 8)
MIN_BITS, MAX_BITS = 2, 16
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ------------------------------------------------------------------ layers
def _is_quantizable(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, (nn.Linear, *_CONVS)) or (conv1d is not None and isinstance(module, conv1d))


def quantizable_layers(model: nn.Module, layers: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """``Linear`` / ``Conv`` / transformers ``Conv1D`` layers by name, in model order.

    ``layers=None``: all of them except output heads (``lm_head``, ``head``, ``classifier``, ...);
    otherwise regular expression(s) searched in the module names, each of which must match a layer.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"quantization needs a PyTorch nn.Module, got {type(model).__name__}")
    found = {n: m for n, m in model.named_modules() if n and _is_quantizable(m)}
    if not found:
        raise ModelError(f"{type(model).__name__} has no Linear or Conv layer to quantize")
    if layers is None:
        chosen = {n: m for n, m in found.items() if not HEAD_PATTERN.search(n)}
        return chosen or found
    return match_layers(found, layers, "Linear/Conv layers")


def _out_dim(module: nn.Module) -> int:
    """The weight axis of the output channels (1 for transformers' transposed ``Conv1D``)."""
    return 0 if isinstance(module, (nn.Linear, *_CONVS)) else 1


def _n_weights(module: nn.Module) -> int:
    return module.weight.numel()


# --------------------------------------------------------------- allocation
def _check_bits(value: Any, what: str) -> int:
    return whole(value, what, minimum=MIN_BITS, maximum=MAX_BITS, meaning="a number of bits")


def _check_choices(choices: Sequence[int]) -> tuple[int, ...]:
    if isinstance(choices, (int, str)) or not len(choices):
        raise InputError(f"choices must be a non-empty sequence of bit widths such as (2, 3, 4, 6, 8), got {choices!r}")
    return tuple(sorted({_check_bits(c, "every bit choice") for c in choices}))


def _scores_dict(layer_scores: Importance | Mapping[str, float]) -> dict[str, float]:
    if isinstance(layer_scores, Importance):
        if layer_scores.names is None:
            raise InputError("layer_scores needs layer names: use an Importance with unit 'layer' and names")
        values = layer_scores.aggregate("mean_abs").values.reshape(-1)
        if len(values) != len(layer_scores.names):
            raise InputError("layer_scores must hold one score per named layer")
        return dict(zip(layer_scores.names, values.double().tolist()))
    if isinstance(layer_scores, Mapping):
        out = {}
        for name, value in layer_scores.items():
            v = float(value.reshape(-1).float().mean()) if isinstance(value, torch.Tensor) else float(value)
            out[str(name)] = v
        return out
    raise InputError(
        "layer_scores must be an Importance of unit 'layer' or a dict layer -> score, "
        f"got {type(layer_scores).__name__}"
    )


def allocate_bits(
    layer_scores: Importance | Mapping[str, float],
    budget: float = 4.0,
    choices: Sequence[int] = CHOICES,
    sizes: Mapping[str, int] | nn.Module | None = None,
) -> dict[str, int]:
    """Bits per layer: more for higher-scored layers, average (weighted by parameter count) at most ``budget``.

    Args:
        layer_scores: one non-negative score per layer: an :class:`Importance` with ``unit="layer"`` and
            names (per-sample values are averaged as ``mean_abs``), or a dict ``layer -> score``.
        budget: the average number of bits per weight, e.g. 4 or 6; at least ``min(choices)``.
        choices: the allowed bit widths.
        sizes: parameters per layer (a dict, or the model to read the layers' weight counts from);
            default: every layer counts the same.

    Returns:
        ``{layer: bits}`` in the order of ``layer_scores``. The rule (greedy rate-distortion upgrades)
        is described in the module docstring; scores are clipped at 0, all-zero scores count as equal.
    """
    scores = _scores_dict(layer_scores)
    if not scores:
        raise InputError("layer_scores is empty; give one score per layer")
    choices = _check_choices(choices)
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not math.isfinite(budget):
        raise InputError(f"budget must be a number of bits, got {budget!r}")
    if budget < choices[0]:
        raise InputError(
            f"a budget of {budget} average bits is impossible with choices {choices}: every layer needs at least "
            f"{choices[0]} bits; raise the budget or add a lower choice"
        )
    names = list(scores)
    if sizes is None:
        n = torch.ones(len(names), dtype=torch.float64)
    else:
        if isinstance(sizes, nn.Module):
            modules = dict(sizes.named_modules())
            missing = [k for k in names if k not in modules or not hasattr(modules[k], "weight")]
            if missing:
                raise InputError(
                    f"the model has no layer {missing[0]!r} with a weight (scored layers: {names[:4]} ...)"
                )
            sizes = {k: _n_weights(modules[k]) for k in names}
        missing = [k for k in names if k not in sizes]
        if missing:
            raise InputError(f"sizes has no entry for layer {missing[0]!r}; give the parameter count of every layer")
        n = torch.tensor([float(sizes[k]) for k in names], dtype=torch.float64)
        if bool((n <= 0).any()):
            raise InputError("every layer size must be a positive number of parameters")
    s = torch.tensor([scores[k] for k in names], dtype=torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise InputError("layer scores contain NaN or infinite values")
    s = s.clamp_min(0)
    s = s / s.max() if bool(s.max() > 0) else torch.ones_like(s)
    levels = torch.tensor(choices, dtype=torch.float64)
    level = torch.zeros(len(names), dtype=torch.long)  # index into choices
    top = len(choices) - 1
    capacity = budget * float(n.sum()) * (1 + 1e-12)
    used = float((n * levels[level]).sum())
    while True:
        can = level < top
        if not bool(can.any()):
            break
        nxt = level.clamp_max(top - 1) + 1
        b, b_next = levels[level], levels[nxt]
        cost = n * (b_next - b)
        ok = can & (used + cost <= capacity)
        if not bool(ok.any()):
            break
        gain = s * (4.0**-b - 4.0**-b_next) / (b_next - b)
        gain = torch.where(ok, gain, torch.full_like(gain, -1.0))
        best = int(torch.argmax(gain))  # ties: the first layer in order
        used += float(cost[best])
        level[best] += 1
    return {k: int(levels[i]) for k, i in zip(names, level.tolist())}


def average_bits(bits: Mapping[str, int], sizes: Mapping[str, int] | nn.Module) -> float:
    """Average bits per weight of an allocation, weighted by the layers' parameter counts."""
    if isinstance(sizes, nn.Module):
        modules = dict(sizes.named_modules())
        sizes = {k: _n_weights(modules[k]) for k in bits}
    total = sum(sizes[k] for k in bits)
    return sum(bits[k] * sizes[k] for k in bits) / max(total, 1)


# ------------------------------------------------------------ quantizers
def fake_quantize_weight(weight: torch.Tensor, bits: int, dim: int = 0, clip: str = "max") -> torch.Tensor:
    """Symmetric per-output-channel fake quantization of ``weight`` (a new tensor, same shape and dtype).

    Each slice along ``dim`` gets ``scale = a / (2**(bits-1) - 1)`` with ``a = max |w|`` (``clip="max"``)
    or the clipping ratio of ``max |w|`` in ``{1, 0.95, ..., 0.5}`` with the least squared error
    (``clip="mse"``); values are ``clamp(round(w / scale), -q, q) * scale`` with ``q = 2**(bits-1) - 1``
    (restricted symmetric range: 2 bits are ternary).
    """
    _check_bits(bits, "bits")
    if clip not in ("max", "mse"):
        raise InputError(f"weight clip must be 'max' or 'mse', got {clip!r}")
    q = 2 ** (bits - 1) - 1
    w = weight.detach().movedim(dim, 0)
    flat = w.reshape(w.shape[0], -1).float()
    amax = flat.abs().amax(1, keepdim=True)
    if clip == "mse":
        ratios = torch.linspace(1.0, 0.5, 11, device=flat.device).view(-1, 1, 1)
        scale = (amax * ratios / q).clamp_min(torch.finfo(torch.float32).tiny)  # (r, out, 1)
        err = ((flat / scale).round().clamp(-q, q) * scale - flat).square().sum(-1)  # (r, out)
        scale = scale.squeeze(-1).gather(0, err.argmin(0, keepdim=True)).T  # (out, 1)
    else:
        scale = (amax / q).clamp_min(torch.finfo(torch.float32).tiny)
    out = ((flat / scale).round().clamp(-q, q) * scale).reshape(w.shape).movedim(0, dim)
    return out.to(weight.dtype)


def fake_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric uniform fake quantization of ``x`` to ``[lo, hi]`` (broadcast: per tensor or per channel)."""
    levels = 2**bits - 1
    lo = torch.minimum(lo, torch.zeros_like(lo)).to(x.dtype)
    hi = torch.maximum(hi, torch.zeros_like(hi)).to(x.dtype)
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(x.dtype).tiny)
    zero = (-lo / scale).round()
    return ((x / scale).round() + zero).clamp(0, levels).sub(zero).mul(scale)


def _quant_input(module: nn.Module, inputs: tuple, *, bits: int) -> tuple:
    x = inputs[0]
    return (fake_quantize(x, module.wm_act_lo, module.wm_act_hi, bits), *inputs[1:])


def _quant_output(module: nn.Module, inputs: tuple, output: torch.Tensor, *, bits: int) -> torch.Tensor:
    return fake_quantize(output, module.wm_act_lo, module.wm_act_hi, bits)


# ------------------------------------------------------------ calibration
class _Ranges:
    """Per-tensor min/max of layer inputs and per-channel clipped ranges of LayerNorm outputs, on the fly."""

    def __init__(self, clip: float) -> None:
        self.clip = clip
        self.tensor: dict[str, list[float]] = {}
        self.channel: dict[str, list[torch.Tensor]] = {}
        self.batches: dict[str, int] = {}
        self.post_norm: dict[str, str] = {}  # layer -> the LayerNorm whose output it reads
        self.norm_out: list[tuple[torch.Tensor, str]] = []

    def norm_hook(self, name: str, _m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        self.norm_out.append((out, name))
        flat = out.detach().reshape(-1, out.shape[-1]).float()
        if len(flat) > 65536:  # torch.quantile has an input limit; a strided subsample keeps the estimate
            flat = flat[:: math.ceil(len(flat) / 65536)]
        qs = torch.quantile(flat, torch.tensor([1 - self.clip, self.clip], device=flat.device), dim=0)
        acc = self.channel.get(name)
        self.channel[name] = [qs[0], qs[1]] if acc is None else [acc[0] + qs[0], acc[1] + qs[1]]
        self.batches[name] = self.batches.get(name, 0) + 1

    def layer_hook(self, name: str, _m: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        for out, norm in self.norm_out:
            if x is out or x._base is out or (out._base is not None and x._base is out._base):
                self.post_norm[name] = norm
                return
        lo, hi = float(x.detach().min()), float(x.detach().max())
        acc = self.tensor.get(name)
        self.tensor[name] = [lo, hi] if acc is None else [min(acc[0], lo), max(acc[1], hi)]


# ----------------------------------------------------------------- action
@dataclass
class QuantizeReport:
    """What ``quantize`` did: one row per quantized layer, average bits and model size."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    activation_bits: int | None = None
    n_parameters: int = 0
    float_bits: int = 32

    @property
    def n_weights(self) -> int:
        return sum(r["n_weights"] for r in self.layers)

    @property
    def average_bits(self) -> float:
        """Weight bits averaged over the quantized layers' weights."""
        return sum(r["bits"] * r["n_weights"] for r in self.layers) / max(self.n_weights, 1)

    @property
    def size_mb(self) -> float:
        """Model size in MB (10**6 bytes): quantized weights at their bits plus one float scale per output
        channel, every other parameter at the model's float width."""
        quant = sum(r["bits"] * r["n_weights"] + self.float_bits * r["channels"] for r in self.layers)
        rest = (self.n_parameters - self.n_weights) * self.float_bits
        return (quant + rest) / 8e6

    @property
    def float_mb(self) -> float:
        return self.n_parameters * self.float_bits / 8e6

    def to_frame(self):
        """A pandas DataFrame: layer, n_weights, weight bits, activation quantizer."""
        import pandas as pd

        return pd.DataFrame(self.layers).set_index("layer")

    def __repr__(self) -> str:
        return (
            f"QuantizeReport({len(self.layers)} layers, average_bits={self.average_bits:.3f}, "
            f"activation_bits={self.activation_bits}, size={self.size_mb:.3f} MB of {self.float_mb:.3f} MB float)"
        )


Quantized = Compressed  # the result: (model, QuantizeReport)


def quantize(
    model: nn.Module,
    bits: int | Mapping[str, int],
    *,
    activations: int | None = None,
    calibration: Any = None,
    clip: float = 0.999,
    weight_clip: str = "mse",
    layers: str | Sequence[str] | None = None,
    batch_size: int = 64,
    inplace: bool = False,
) -> Quantized:
    """A fake-quantized copy of ``model`` (dequantized values in the model's dtype; ``model`` is untouched).

    Args:
        model: a PyTorch ``nn.Module`` (transformers models included).
        bits: one bit width for every selected layer, or ``{layer: bits}`` (e.g. from :func:`allocate_bits`);
            layers not named stay in floating point.
        activations: bits for the inputs of the quantized layers (None: weights only). Inputs that are a
            LayerNorm output (or a view of one) are quantized at the LayerNorm output, channel-wise with
            per-channel ``[1 - clip, clip]`` quantile ranges (clipped channel-wise quantization, averaged over
            calibration batches); other inputs per tensor with the calibration min/max. Needs ``calibration``.
        calibration: model inputs for activation ranges: a tensor ``(n, ...)``, token ids, a dict of model
            inputs or an iterable of batches (as ``whatmatters.compress.calibrate`` accepts).
        clip: the upper quantile of each post-LayerNorm channel's range, in (0.5, 1].
        weight_clip: ``"mse"`` (per channel, the clipping ratio with least squared error) or ``"max"``.
        layers: with an int ``bits``, regular expression(s) of the layers to quantize (default: every
            Linear/Conv layer except output heads).
        inplace: quantize ``model`` itself instead of a deep copy.

    Returns:
        ``Quantized(model, report)``; activation quantizers are forward (pre-)hooks on the copy reading
        non-persistent buffers ``wm_act_lo`` / ``wm_act_hi`` (the state dict keeps its keys).
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"quantize needs a PyTorch nn.Module, got {type(model).__name__}")
    if isinstance(bits, Mapping):
        if layers is not None:
            raise InputError("layers= selects layers for an int bits; with a dict, its keys are the layers")
        if not bits:
            raise InputError("bits is an empty dict; name at least one layer")
        found = {n: m for n, m in model.named_modules() if n}
        plan = {}
        for name, b in bits.items():
            if name not in found:
                import difflib

                close = difflib.get_close_matches(str(name), [n for n, m in found.items() if _is_quantizable(m)], 3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise InputError(f"the model has no layer {name!r}{hint}")
            if not _is_quantizable(found[name]):
                raise ModelError(
                    f"{name} is a {type(found[name]).__name__}; only Linear / Conv layers can be quantized"
                )
            plan[name] = _check_bits(b, f"bits of layer {name!r}")
    else:
        _check_bits(bits, "bits")
        plan = dict.fromkeys(quantizable_layers(model, layers), bits)
    if activations is not None:
        _check_bits(activations, "activations")
        if calibration is None:
            raise InputError("activation quantization needs calibration=inputs to set the activation ranges")
    if not (isinstance(clip, (int, float)) and 0.5 < clip <= 1):
        raise InputError(f"clip must be a quantile in (0.5, 1], got {clip!r}")
    if weight_clip not in ("max", "mse"):
        raise InputError(f"weight_clip must be 'max' or 'mse', got {weight_clip!r}")

    ranges = _calibrate(model, list(plan), calibration, clip, batch_size) if activations is not None else None
    out = model if inplace else copy.deepcopy(model)
    modules = dict(out.named_modules())
    rows = []
    with torch.no_grad():
        for name, b in plan.items():
            m = modules[name]
            dim = _out_dim(m)
            m.weight.copy_(fake_quantize_weight(m.weight, b, dim, weight_clip))
            rows.append(
                {
                    "layer": name,
                    "type": type(m).__name__,
                    "n_weights": m.weight.numel(),
                    "channels": m.weight.shape[dim],
                    "bits": b,
                    "activations": None,
                }
            )
    if ranges is not None:
        _attach_activation_quantizers(modules, rows, ranges, activations)
    report = QuantizeReport(
        layers=rows,
        activation_bits=activations,
        n_parameters=sum(p.numel() for p in out.parameters()),
        float_bits=torch.finfo(next(out.parameters()).dtype).bits if next(out.parameters()).is_floating_point() else 32,
    )
    return Quantized(out, report)


def _calibrate(model: nn.Module, names: list[str], data: Any, clip: float, batch_size: int) -> _Ranges:
    ranges = _Ranges(clip)
    batches = as_batches(data, batch_size=batch_size)
    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(partial(ranges.layer_hook, n)) for n in names]
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    handles += [m.register_forward_hook(partial(ranges.norm_hook, n)) for n, m in norms]
    with preserved(model, weights=False), hooks(*handles), torch.no_grad():
        model.eval()
        for batch in batches:
            ranges.norm_out.clear()
            call_model(model, batch.to(device))
        ranges.norm_out.clear()
    return ranges


def _attach_activation_quantizers(
    modules: dict[str, nn.Module], rows: list[dict[str, Any]], ranges: _Ranges, bits: int
) -> None:
    norms_used = set()
    for row in rows:
        name = row["layer"]
        norm = ranges.post_norm.get(name)
        if norm is not None:
            row["activations"] = f"channel-clipped ({norm})"
            norms_used.add(norm)
            continue
        if name not in ranges.tensor:
            raise ModelError(f"layer {name} was not called during calibration; its activation range is unknown")
        m = modules[name]
        lo, hi = ranges.tensor[name]
        device, dtype = m.weight.device, m.weight.dtype
        m.register_buffer("wm_act_lo", torch.tensor(lo, device=device, dtype=dtype), persistent=False)
        m.register_buffer("wm_act_hi", torch.tensor(hi, device=device, dtype=dtype), persistent=False)
        m.register_forward_pre_hook(partial(_quant_input, bits=bits))
        row["activations"] = "tensor"
    for norm in norms_used:
        m = modules[norm]
        count = ranges.batches[norm]
        lo, hi = (v / count for v in ranges.channel[norm])
        ref = next(iter(m.parameters()), lo)
        m.register_buffer("wm_act_lo", lo.to(ref.device, ref.dtype), persistent=False)
        m.register_buffer("wm_act_hi", hi.to(ref.device, ref.dtype), persistent=False)
        m.register_forward_hook(partial(_quant_output, bits=bits))


# ------------------------------------------------------------ layer scores


# Layer scores for allocate_bits live in compress/layer_scoring.py; imported here for old code paths.
from whatmatters.compress.layer_scoring import LAYER_SCORES as LAYER_SCORES  # noqa: E402
from whatmatters.compress.layer_scoring import layer_scores as layer_scores  # noqa: E402
