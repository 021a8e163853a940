"""``whatmatters.compress.sparsegpt``: one-shot pruning by second-order reconstruction (Frantar & Alistarh,
2023, arXiv 2301.00774), the baseline Wanda is compared with.

Each selected layer's weights are pruned column by column with its calibration Hessian, and the error of
every pruned weight is compensated on the columns not yet processed (:mod:`whatmatters.compress.obs`);
the mask is chosen per block of ``block_size`` columns by ``w² / [H⁻¹]_ii`` (adaptive mask selection),
or among every ``M`` consecutive inputs for ``N:M``. Blocks are processed in order on the inputs of the
already-pruned blocks (:mod:`whatmatters.compress.hessian`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from whatmatters.compress.hessian import check_options, prepare, reconstruct_sequentially
from whatmatters.compress.linear import weight_matrix
from whatmatters.compress.obs import sweep
from whatmatters.compress.prune import PruneReport
from whatmatters.compress.sparsity import check_sparsity, nm_mask, parse_pattern
from whatmatters.core.actions import Compressed, n_parameters
from whatmatters.core.errors import InputError


def sparsegpt(
    model: nn.Module,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    *,
    data: Any = None,
    tokenizer: Any = None,
    damp: float = 0.01,
    block_size: int = 128,
    layers: str | Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    progress: bool | None = None,
) -> Compressed:
    """A copy of ``model`` pruned by SparseGPT (``model`` is untouched); the weights kept are updated too.

    Args:
        sparsity: share of each layer's weights set to zero, in ``[0, 1)`` (default 0.5; ``1 - N/M`` for N:M).
        pattern: ``"unstructured"`` or ``"N:M"`` (``N`` kept of every ``M`` consecutive inputs, e.g. ``"2:4"``).
        data: calibration data (token ids such as ``lm_windows(...)``, texts with ``tokenizer``, tensors,
            batches or a ``Calibration``).
        damp: dampening of the Hessian diagonal, as a fraction of its mean.
        block_size: columns per mask-selection block and lazy update.

    Returns:
        ``Compressed(model, PruneReport)`` (``method="sparsegpt"``), as :func:`whatmatters.compress.prune`.
    """
    n_m = parse_pattern(pattern)
    if n_m is not None and sparsity is not None:
        raise InputError(f"pattern {pattern!r} fixes the sparsity at 1 - N/M; leave sparsity=None")
    share = check_sparsity(0.5 if sparsity is None else sparsity) if n_m is None else 1 - n_m[0] / n_m[1]
    block_size = check_options(damp, block_size)
    if data is None:
        raise InputError("SparseGPT needs calibration data: pass data=token ids (e.g. lm_windows(...)) or texts")
    new, batches, chosen = prepare(model, data, tokenizer, layers, batch_size, max_length)
    if n_m is not None:
        for name, layer in chosen.items():  # the shape check of N:M masks, before any work
            nm_mask(torch.ones(1, weight_matrix(layer).shape[1]), *n_m, name=name)
    rows: list[dict[str, Any]] = []

    def prune(name: str, layer: nn.Module, hessian: torch.Tensor, tokens: int) -> None:
        w = weight_matrix(layer)
        result = sweep(w, hessian, sparsity=share if n_m is None else None, n_m=n_m, damp=damp, block_size=block_size)
        with torch.no_grad():
            w.copy_(result.weight)
        zeros = int((w == 0).sum())
        rows.append({"layer": name, "shape": tuple(w.shape), "n_weights": w.numel(), "target": share,
                     "pruned": zeros, "zeros": zeros, "tokens": tokens, "loss": result.loss})  # fmt: skip

    reconstruct_sequentially(new, batches, chosen, prune, description="SparseGPT", progress=progress)
    report = PruneReport("sparsegpt", pattern, "uniform", "block" if n_m is None else "-", share, rows)
    report.n_parameters = n_parameters(new)
    return Compressed(new, report)
