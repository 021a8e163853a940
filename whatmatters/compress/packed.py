"""Real low-bit weights: integer codes packed into ``int32`` words and :class:`QuantLinear`, a linear layer
that stores them with per-group scales and zero points and dequantizes on the fly in ``forward``.

Codes of ``bits`` bits are packed row by row as one little-endian bit stream (value ``j`` of a row takes
bits ``j*bits .. j*bits+bits-1``), so 2/4/8-bit rows hold ``32 / bits`` values per word and 3-bit rows
straddle words; the packed weight takes ``ceil(in * bits / 32)`` words per output row.
:func:`save_quantized` / :func:`load_quantized` write and read a model holding such layers with safetensors.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import torch
from torch import nn

from whatmatters.core.errors import InputError, ModelError

BITS = (2, 3, 4, 8)
_METADATA_KEY = "whatmatters.quantized_layers"


def check_bits(bits: object, what: str = "bits") -> int:
    """``bits`` as an int in :data:`BITS`, else an ``InputError``."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or int(bits) not in BITS:
        raise InputError(f"{what} must be one of {BITS} for packed integer weights, got {bits!r}")
    return int(bits)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` ``(rows, n)`` in ``[0, 2**bits)`` into ``int32`` words ``(rows, ceil(n*bits/32))``."""
    rows, n = codes.shape
    words = -(-n * bits // 32)
    if 32 % bits == 0:  # whole values per word: one shift per value
        per = 32 // bits
        padded = nn.functional.pad(codes.long(), (0, words * per - n))
        packed = (padded.view(rows, words, per) << torch.arange(0, 32, bits, device=codes.device)).sum(-1)
        return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    shifts = torch.arange(bits, device=codes.device)
    stream = ((codes.long().unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    stream = nn.functional.pad(stream, (0, words * 32 - n * bits))
    packed = (stream.view(rows, words, 32) << torch.arange(32, device=codes.device)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``(rows, n)`` codes of :func:`pack` (``int32``), in one vectorized pass."""
    rows = packed.shape[0]
    if 32 % bits == 0:  # whole values per word: one shift per value
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(rows, -1)[:, :n]
    stream = (packed.unsqueeze(-1) >> torch.arange(32, device=packed.device, dtype=torch.int32)) & 1
    stream = stream.reshape(rows, -1)[:, : n * bits].view(rows, n, bits)
    return (stream << torch.arange(bits, device=packed.device, dtype=torch.int32)).sum(-1, dtype=torch.int32)


class QuantLinear(nn.Module):
    """A linear layer with ``bits``-bit weights: ``W[o, i] = scales[o, g] * (code[o, i] - zeros[o, g])``
    with ``g = g_idx[i]`` (the quantization group of input ``i``; groups need not be contiguous after
    act-order). Buffers: ``qweight`` (packed ``int32``), ``scales`` (float), ``zeros`` (``uint8``), ``g_idx``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        n_groups: int,
        *,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, check_bits(bits)
        words = -(-in_features * bits // 32)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        bias: torch.Tensor | None,
    ) -> QuantLinear:
        """A layer holding ``codes`` ``(out, in)``, ``scales`` / ``zeros`` ``(out, groups)`` and ``g_idx`` ``(in,)``."""
        out_features, in_features = codes.shape
        layer = cls(
            in_features, out_features, bits, scales.shape[1], bias=bias is not None, dtype=scales.dtype,
            device=codes.device,
        )  # fmt: skip
        layer.qweight.copy_(pack(codes, bits))
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        layer.g_idx.copy_(g_idx)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float weight ``(out, in)`` in the dtype of ``scales``."""
        g = self.g_idx.long()
        zeros = self.zeros.to(self.scales.dtype)[:, g]
        return self.scales[:, g] * (self.codes().to(self.scales.dtype) - zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantize().to(x.dtype), bias)

    def layout(self) -> dict[str, int]:
        return {"in": self.in_features, "out": self.out_features, "bits": self.bits, "groups": self.scales.shape[1]}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"groups={self.scales.shape[1]}, bias={self.bias is not None}"
        )


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ModelError("saving quantized models needs safetensors: pip install 'whatmatters[hf]'") from None
    return safetensors


def save_quantized(model: nn.Module, path: str | Path) -> int:
    """Write ``model`` (holding :class:`QuantLinear` layers) to a safetensors file; returns its size in bytes.

    Packed weights stay packed; shared (tied) tensors are written once. Read it back with
    :func:`load_quantized` into a model of the same architecture.
    """
    save_model = _safetensors().torch.save_model
    layers = {n: m.layout() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ModelError("the model holds no QuantLinear layer; quantize it with whatmatters.compress.gptq first")
    path = Path(path)
    save_model(model, str(path), metadata={_METADATA_KEY: json.dumps(layers)})
    return path.stat().st_size


def load_quantized(model: nn.Module, path: str | Path) -> nn.Module:
    """``model`` (a float model of the architecture that was saved, e.g. ``from_config``) with the layers
    named in the file replaced by :class:`QuantLinear` and every tensor loaded from ``path``; changed in place
    and returned."""
    safetensors = _safetensors()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no file {str(path)!r}; give the path save_quantized wrote")
    with safetensors.safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(_METADATA_KEY)
    if raw is None:
        raise InputError(f"{path} was not written by save_quantized (no {_METADATA_KEY} metadata)")
    for name, spec in json.loads(raw).items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
        except AttributeError:
            raise ModelError(f"the model has no layer {name!r}; load into the architecture that was saved") from None
        ref = next(old.parameters(), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        bias = getattr(old, "bias", None) is not None
        layer = QuantLinear(spec["in"], spec["out"], spec["bits"], spec["groups"], bias=bias, dtype=dtype)
        setattr(parent, child, layer.to(ref.device if ref is not None else "cpu"))
    safetensors.torch.load_model(model, str(path), strict=True)
    return model
