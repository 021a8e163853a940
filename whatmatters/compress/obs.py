"""Optimal Brain Surgeon sweeps over one weight matrix: GPTQ quantization and SparseGPT pruning.

Both follow Frantar & Alistarh's reference code (IST-DASLab ``gptq`` / ``sparsegpt``). With the layer
Hessian ``H = 2/n X Xᵀ`` of the calibration inputs, dampened by ``damp * mean(diag H)``, columns are
processed left to right; each column is quantized (or its masked weights set to 0) and the error,
divided by the diagonal of the upper Cholesky factor ``U`` of ``H⁻¹``, is spread over the columns not yet
processed. Updates are lazy: inside a block of columns they go to the block only, and the block's
errors update the rest of the matrix in one matrix product.

Differences from the reference, on purpose: a quantization group's scale and zero point are computed from
its up-to-date weights (the block size is a multiple of the group size, or divides it, so every group
start sees all earlier updates; the reference reads stale in-block values when ``groupsize < blocksize``),
and an unstructured SparseGPT block prunes exactly ``floor(sparsity * size)`` weights (the reference's
``<=`` threshold can take one more on ties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from whatmatters.core.errors import ModelError


@dataclass
class Sweep:
    """The result for one ``(out, in)`` weight: new float ``weight`` and, when quantized, ``codes`` ``(out, in)``,
    ``scales`` / ``zeros`` ``(out, groups)`` and ``g_idx`` ``(in,)``; ``loss``: the OBS proxy error
    ``sum (w - q)² / (2 U_ii²)``."""

    weight: torch.Tensor
    loss: float
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None


def quant_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``scale`` and integer ``zero`` of ``w`` ``(rows, k)`` on the range ``[min(w, 0), max(w, 0)]``
    (the reference quantizer: symmetric ranges are ``± max |w|`` with zero ``2**(bits-1)``)."""
    maxq = 2**bits - 1
    lo = w.amin(1).clamp_max(0)
    hi = w.amax(1).clamp_min(0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else (-lo / scale).round()
    return scale, zero


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return ((w / scale).round() + zero).clamp(0, 2**bits - 1)


def round_to_nearest(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> Sweep:
    """Group-wise round-to-nearest with the same quantizer as GPTQ (the baseline GPTQ is compared with)."""
    w = weight.detach().float()
    rows, cols = w.shape
    n_groups = -(-cols // group_size)
    # zero padding fills a short last group: ranges always include 0, so it changes no scale
    groups = nn.functional.pad(w, (0, n_groups * group_size - cols)).reshape(rows * n_groups, group_size)
    scale, zero = quant_params(groups, bits, sym)
    codes = to_codes(groups, scale[:, None], zero[:, None], bits)
    deq = (scale[:, None] * (codes - zero[:, None])).reshape(rows, -1)[:, :cols]
    g_idx = torch.arange(cols, device=w.device) // group_size
    codes = codes.reshape(rows, -1)[:, :cols]
    return Sweep(deq, float("nan"), codes, scale.reshape(rows, n_groups), zero.reshape(rows, n_groups), g_idx)


def inverse_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of the dampened ``H⁻¹`` and the dead inputs (``H_ii = 0``: never active)."""
    h = hessian.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * h.diagonal().mean())
    try:
        h = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(h, upper=True), dead
    except torch.linalg.LinAlgError:
        raise ModelError(
            "the calibration Hessian is not positive definite even after dampening; raise damp= "
            "(e.g. 0.1) or give more calibration data"
        ) from None


def block_width(block_size: int, group_size: int | None) -> int:
    """Columns per lazy block, aligned with the quantization groups (see the module docstring)."""
    if group_size is None:
        return block_size
    if group_size <= block_size:
        return block_size // group_size * group_size
    return math.gcd(group_size, block_size)


def sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    sym: bool = True,
    act_order: bool = False,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    damp: float = 0.01,
    block_size: int = 128,
) -> Sweep:
    """GPTQ (``bits``) and/or SparseGPT (``sparsity`` or ``n_m`` = ``(kept, of)``) on ``weight`` ``(out, in)``.

    ``group_size``: inputs per quantization group (``None``: one group per row); ``act_order``: process
    inputs by decreasing ``H_ii`` (groups are then contiguous in that order: ``g_idx`` maps inputs to groups).
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32  # float64 in, float64 sweep
    w, h = weight.detach().to(dtype).clone(), hessian.to(dtype)
    rows, cols = w.shape
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    u, dead = inverse_factor(h, damp)
    w[:, dead] = 0
    gs = group_size or cols
    width = block_width(block_size, gs if bits else None)
    if n_m is not None:  # N:M groups never straddle blocks
        width = max(width // n_m[1], 1) * n_m[1]
    out = torch.zeros_like(w)
    codes = torch.zeros_like(w) if bits else None
    n_groups = -(-cols // gs)  # the last group is shorter when gs does not divide the inputs (as the reference)
    scales = torch.zeros(rows, n_groups, device=w.device, dtype=dtype) if bits else None
    zeros = torch.zeros_like(scales) if bits else None
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    scale = zero = None
    for i1 in range(0, cols, width):
        i2 = min(i1 + width, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        d = u1.diagonal()
        errors = torch.zeros_like(w1)
        mask = torch.zeros_like(w1, dtype=torch.bool)
        if sparsity:
            k = int(w1.numel() * sparsity)
            mask.view(-1)[torch.topk((w1 / d).square().flatten(), k, largest=False).indices] = True
        for i in range(i2 - i1):
            col = i1 + i
            if n_m is not None and i % n_m[1] == 0:
                saliency = (w1[:, i : i + n_m[1]] / d[i : i + n_m[1]]).square()
                mask.scatter_(1, i + torch.topk(saliency, n_m[1] - n_m[0], 1, largest=False).indices, True)
            col_w = w1[:, i]
            q = col_w.masked_fill(mask[:, i], 0)
            if bits:
                if col % gs == 0:  # up-to-date values of the group (aligned blocks: see block_width)
                    scale, zero = quant_params(torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :gs], bits, sym)
                    scales[:, col // gs], zeros[:, col // gs] = scale, zero
                codes[:, col] = to_codes(q, scale, zero, bits)
                q = scale * (codes[:, col] - zero)
            out[:, col] = q
            err = (col_w - q) / d[i]
            loss += err.square().sum().double() / 2
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    g_idx = torch.arange(cols, device=w.device) // gs
    if perm is not None:
        inv = torch.argsort(perm)
        out, g_idx = out[:, inv], g_idx[inv]
        codes = codes[:, inv] if codes is not None else None
    return Sweep(out.to(weight.dtype), float(loss), codes, scales, zeros, g_idx)
