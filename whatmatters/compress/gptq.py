"""``whatmatters.compress.gptq``: real low-bit weights by GPTQ (Frantar et al., 2022, arXiv 2210.17323).

Each selected linear layer is quantized with its calibration Hessian (:mod:`whatmatters.compress.obs`),
block after block on the inputs of the already-quantized blocks (:mod:`whatmatters.compress.hessian`), and
replaced by a :class:`~whatmatters.compress.packed.QuantLinear` holding packed integer codes, per-group
scales and zero points: the model is really smaller in memory and on disk
(:func:`~whatmatters.compress.packed.save_quantized`). ``method="rtn"`` is round-to-nearest with the same
quantizer and layout (the baseline).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from whatmatters.compress.hessian import check_options, prepare, reconstruct_sequentially
from whatmatters.compress.linear import weight_matrix
from whatmatters.compress.obs import Sweep, round_to_nearest, sweep
from whatmatters.compress.packed import QuantLinear, check_bits
from whatmatters.core.actions import Compressed
from whatmatters.core.errors import InputError
from whatmatters.core.fractions import whole


@dataclass
class GPTQReport:
    """What ``gptq`` did: one row per quantized layer, average bits and the bytes of the weights."""

    method: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    float_bytes: int = 0
    packed_bytes: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. RSQ's rotation and token scores

    @property
    def average_bits(self) -> float:
        n = sum(r["n_weights"] for r in self.layers)
        return sum(r["bits"] * r["n_weights"] for r in self.layers) / max(n, 1)

    def to_frame(self):
        """A pandas DataFrame: layer, shape, bits, group size, calibration tokens, OBS proxy loss, bytes."""
        import pandas as pd

        return pd.DataFrame(self.layers).set_index("layer")

    def __repr__(self) -> str:
        return (
            f"GPTQReport(method={self.method!r}, {len(self.layers)} layers, average_bits={self.average_bits:.3f}, "
            f"{self.packed_bytes / 1e6:.3f} MB packed of {self.float_bytes / 1e6:.3f} MB float, "
            f"{self.seconds:.1f} s)"
        )


def _group(size: int | None, n_in: int) -> int:
    if size is None or size == -1:
        return n_in
    size = whole(size, "group_size", minimum=1, meaning="inputs per quantization group, or None for one per row")
    return min(size, n_in)


def _plan(bits: int | Mapping[str, int], layers: dict[str, nn.Module]) -> dict[str, int]:
    if not isinstance(bits, Mapping):
        return dict.fromkeys(layers, check_bits(bits))
    unknown = [n for n in bits if n not in layers]
    if unknown:
        raise InputError(f"bits names layer {unknown[0]!r}, which is not among the selected layers {list(layers)[:4]}")
    return {n: check_bits(b, f"bits of layer {n!r}") for n, b in bits.items()}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def gptq(
    model: nn.Module,
    bits: int | Mapping[str, int] = 4,
    *,
    data: Any = None,
    tokenizer: Any = None,
    method: str = "gptq",
    group_size: int | None = 128,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    layers: str | Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    progress: bool | None = None,
) -> Compressed:
    """A copy of ``model`` whose linear layers hold real ``bits``-bit weights (``model`` is untouched).

    Args:
        bits: 2, 3, 4 or 8 for every selected layer, or ``{layer: bits}`` (e.g. from ``allocate_bits``;
            layers not named stay in floating point).
        data: calibration data (texts with ``tokenizer``, token ids such as ``lm_windows(...)``, input
            tensors, batches or a ``Calibration``); not needed for ``method="rtn"``.
        method: ``"gptq"`` (second-order error compensation) or ``"rtn"`` (round to nearest).
        group_size: consecutive inputs sharing one scale and zero point (``None`` or -1: one group per
            output row); when it does not divide the layer's inputs the last group is shorter, as in the
            reference implementation (SmolLM2's 576 inputs at 128: four groups of 128 and one of 64).
        sym: symmetric ranges (``± max |w|``, zero point ``2**(bits-1)``) or asymmetric (``[min, max]``).
        act_order: quantize inputs by decreasing Hessian diagonal (often better at 3 bits and below).
        damp: dampening added to the Hessian diagonal, as a fraction of its mean.
        block_size: columns per lazy batch update (aligned to the groups).
        layers: regular expression(s) of the layers (default: every linear layer but output heads).

    Returns:
        ``Compressed(model, GPTQReport)``: the quantized layers are :class:`QuantLinear` modules; write the
        model with ``save_quantized`` and read it back with ``load_quantized``.
    """
    if method not in ("gptq", "rtn"):
        raise InputError(f"method must be 'gptq' or 'rtn', got {method!r}")
    block_size = check_options(damp, block_size)
    selected = layers if not isinstance(bits, Mapping) or layers is not None else list(map(_exact, bits))
    if method == "gptq" and data is None:
        raise InputError("GPTQ needs calibration data: pass data=token ids (e.g. lm_windows(...)) or texts")
    start = time.perf_counter()
    calibration = data if method == "gptq" else None
    new, batches, chosen = prepare(model, calibration, tokenizer, selected, batch_size, max_length)
    plan = _plan(bits, chosen)
    groups = {n: _group(group_size, weight_matrix(chosen[n]).shape[1]) for n in plan}
    rows: list[dict[str, Any]] = []
    report = GPTQReport(method, rows)

    def quantize(name: str, layer: nn.Module, hessian: torch.Tensor | None, tokens: int) -> None:
        w = weight_matrix(layer)
        b, gs = plan[name], groups[name]
        if hessian is None:
            result: Sweep = round_to_nearest(w, b, gs, sym)
        else:
            result = sweep(w, hessian, bits=b, group_size=gs, sym=sym, act_order=act_order, damp=damp,
                           block_size=block_size)  # fmt: skip
        bias = getattr(layer, "bias", None)
        q = QuantLinear.from_codes(
            result.codes.to(torch.int32), result.scales.to(w.dtype), result.zeros.to(torch.uint8),
            result.g_idx.to(torch.int32), b, None if bias is None else bias.detach(),
        )  # fmt: skip
        parent, _, child = name.rpartition(".")
        setattr(new.get_submodule(parent), child, q)
        report.float_bytes += _bytes(w)
        report.packed_bytes += sum(_bytes(t) for t in (q.qweight, q.scales, q.zeros, q.g_idx))
        rows.append({"layer": name, "shape": tuple(w.shape), "n_weights": w.numel(), "bits": b, "group_size": gs,
                     "tokens": tokens, "loss": result.loss})  # fmt: skip

    targets = {n: chosen[n] for n in plan}
    if method == "rtn":
        for name, layer in targets.items():
            quantize(name, layer, None, 0)
    else:
        reconstruct_sequentially(new, batches, targets, quantize, description="GPTQ", progress=progress)
    report.seconds = time.perf_counter() - start
    return Compressed(new, report)


def _exact(name: str) -> str:
    import re

    return "^" + re.escape(name) + "$"
