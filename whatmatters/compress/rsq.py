"""``whatmatters.compress.rsq``: Rotate, Scale, then Quantize (Sung et al., 2025, arXiv 2503.01820).

1. **Rotate**: random Hadamard rotations folded into the weights (:func:`~whatmatters.compress.rotation.rotate`,
   QuaRot-style; the model's function is unchanged, outliers are spread over all channels).
2. **Scale**: each calibration token's contribution to every layer Hessian is weighted by its importance,
   ``H = 2/n Σ r_t x_t x_tᵀ``, so the quantization error is minimised mostly on the tokens that matter.
   ``tokens="attention"`` (the paper's AttnCon): the attention each token receives, summed over layers,
   heads and queries (:func:`~whatmatters.compress.tokens.attention_received`, on the original model:
   rotation leaves attention as it was); ``"first"``: decreasing with position (the paper's First-N
   finding: early tokens matter); ``"uniform"``: plain GPTQ on the rotated model; or a tensor of scores
   ``(n_sequences, seq_len)``. Scores are min-max scaled per sequence into ``[r_min, r_max]``.
3. **Quantize**: GPTQ with those Hessians (:func:`~whatmatters.compress.gptq.gptq`), real packed weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from whatmatters.compress.batches import Batch, as_batches
from whatmatters.compress.gptq import gptq
from whatmatters.compress.packed import check_bits
from whatmatters.compress.rotation import rotate
from whatmatters.compress.tokens import attention_received
from whatmatters.core.actions import Compressed
from whatmatters.core.errors import InputError

TOKEN_SCORES = ("attention", "first", "uniform")


def _ids(batch: Batch) -> torch.Tensor:
    ids = batch.kwargs.get("input_ids", batch.args[0] if batch.args else None)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.ndim != 2:
        raise InputError("RSQ calibrates on token ids: give an integer tensor (n, seq_len) (e.g. lm_windows) or texts")
    return ids


def scale_per_sequence(scores: torch.Tensor, mask: torch.Tensor | None, r_min: float, r_max: float) -> torch.Tensor:
    """Scores ``(b, L)`` min-max scaled per row (padding left out) into ``[r_min, r_max]``; 0 on padding."""
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    lo = scores.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    hi = scores.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    unit = ((scores - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return (r_min + (r_max - r_min) * unit) * valid


def token_weights(
    model: nn.Module, batches: list[Batch], tokens: str | torch.Tensor, r_min: float, r_max: float
) -> list[Batch]:
    """The batches with ``weights``: each token's importance scaled into ``[r_min, r_max]``."""
    if isinstance(tokens, torch.Tensor):
        n = sum(_ids(b).shape[0] for b in batches)
        width = max(_ids(b).shape[1] for b in batches)
        if tokens.ndim != 2 or tokens.shape[0] != n or tokens.shape[1] < width:
            raise InputError(
                f"tokens scores must be (n_sequences, seq_len) = ({n}, {width}), got {tuple(tokens.shape)}"
            )
        if not torch.isfinite(tokens.float()).all():
            raise InputError("tokens scores contain NaN or infinity")
        parts = tokens.float().split([_ids(b).shape[0] for b in batches])
    out = []
    for i, batch in enumerate(batches):
        ids, mask = _ids(batch), batch.mask
        if isinstance(tokens, torch.Tensor):
            scores = parts[i][:, : ids.shape[1]].to(ids.device)
        elif tokens == "attention":
            scores = attention_received(model, ids, mask)[0].to(ids.device)
        elif tokens == "first":
            scores = -torch.arange(ids.shape[1], dtype=torch.float32, device=ids.device).expand(ids.shape)
        else:
            scores = torch.zeros(ids.shape, device=ids.device)
        weights = scale_per_sequence(scores, mask, r_min, r_max) if tokens != "uniform" else None
        out.append(Batch(batch.args, batch.kwargs, batch.labels, weights))
    return out


def rsq(
    model: nn.Module,
    bits: int = 4,
    *,
    data: Any = None,
    tokenizer: Any = None,
    tokens: str | torch.Tensor = "attention",
    r_min: float = 1.0,
    r_max: float = 3.0,
    rotation: bool = True,
    seed: int = 0,
    group_size: int | None = 128,
    layers: str | Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    progress: bool | None = None,
    **options: Any,
) -> Compressed:
    """A copy of a Llama-style causal LM rotated and quantized by GPTQ on importance-scaled tokens (``model``
    is untouched).

    Args:
        bits: 2, 3, 4 or 8. ``data``: calibration token ids (e.g. ``lm_windows(...)``) or texts with ``tokenizer``.
        tokens: ``"attention"`` (AttnCon), ``"first"``, ``"uniform"`` or a score tensor ``(n_sequences, seq_len)``.
        r_min, r_max: the range token weights are scaled into per sequence (``0 <= r_min <= r_max``, ``r_max > 0``).
        rotation: fold random Hadamard rotations in first (``False``: only the token scaling).
        seed: the random signs of the Hadamard matrices.
        options: passed to :func:`~whatmatters.compress.gptq.gptq` (``sym``, ``act_order``, ``damp``, ``block_size``).

    Returns:
        ``Compressed(model, GPTQReport)`` with ``method="rsq"``; the quantized model has an untied ``lm_head``
        (the rotation makes it differ from the embedding) and RMSNorm scales of 1.
    """
    check_bits(bits)
    if isinstance(tokens, str) and tokens not in TOKEN_SCORES:
        raise InputError(f"tokens must be one of {TOKEN_SCORES} or a score tensor, got {tokens!r}")
    if not isinstance(tokens, (str, torch.Tensor)):
        raise InputError(f"tokens must be one of {TOKEN_SCORES} or a score tensor, got {type(tokens).__name__}")
    ok = all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in (r_min, r_max))
    if not ok or not 0 <= r_min <= r_max or not r_max > 0 or r_max == float("inf"):
        raise InputError(f"token weights need 0 <= r_min <= r_max, r_max > 0 and finite; got {r_min!r}, {r_max!r}")
    if data is None:
        raise InputError("RSQ needs calibration data: pass data=token ids (e.g. lm_windows(...)) or texts")
    start = time.perf_counter()
    batches = as_batches(data, tokenizer, batch_size=batch_size, max_length=max_length)
    weighted = token_weights(model, batches, tokens, float(r_min), float(r_max))
    rotated, kinds = rotate(model, seed=seed) if rotation else (model, {})
    new, report = gptq(rotated, bits, data=weighted, group_size=group_size, layers=layers, progress=progress, **options)
    report.method = "rsq"
    report.seconds = time.perf_counter() - start
    report.extra = {"rotation": kinds, "tokens": tokens if isinstance(tokens, str) else "tensor", "r": (r_min, r_max)}
    return Compressed(new, report)
