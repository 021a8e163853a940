"""Weight-level sparse fine-tunes of the packaged all-MiniLM-L6-v2 classifier: LIFT and its baselines, PST and
its pruning baselines. Used by ``whatmatters tune --method lift|pst`` and ``benchmarks/bench_tune_sparse.py``.

The tuned weights are the 36 linear layers of the encoder's 6 blocks (``encoder.layer.N``); the new head always
trains in full, with its own learning rate ``head_lr``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from whatmatters.core.errors import InputError
from whatmatters.tune.finetune import (
    held_out_accuracy,
    load_split,
    lora_minilm,
    minilm_classifier,
    optimizer_step,
    train_loop,
)
from whatmatters.tune.lift import LIFT
from whatmatters.tune.pst import PST

BLOCKS = r"encoder\.layer\.\d+\."
HEAD = r"^head\."
METHODS = ("lift", "magnitude-sparse", "full", "lora", "pst", "movement", "magnitude-prune")


@dataclass
class SparseRun:
    """What a sparse fine-tune measured (bytes are peaks of ``.grad`` tensors and optimizer state)."""

    method: str
    accuracy: float
    trainable: int
    gradients: int
    optimizer_state: int
    seconds: float
    sparsity: float = 0.0
    tuner: Any = None
    losses: list[float] = field(default_factory=list)


def _zero_share(model: torch.nn.Module) -> float:
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "encoder.layer." in n]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def sparse_finetune(
    method: str = "lift",
    *,
    data: str = "20newsgroups",
    steps: int = 200,
    batch_size: int = 16,
    n_train: int = 3000,
    n_test: int = 800,
    lr: float | None = None,
    head_lr: float = 2e-3,
    max_length: int = 64,
    fraction: float = 0.05,
    rank: int | None = None,
    lora_rank: int = 13,
    sparsity: float = 0.5,
    seed: int = 0,
    progress: bool | None = None,
) -> SparseRun:
    """Fine-tune MiniLM on ``data`` with ``method``: ``lift`` / ``magnitude-sparse`` (``fraction`` of each block
    matrix, chosen by ``|W_rank|`` / ``|W|``), ``full`` (every weight), ``lora`` (rank ``lora_rank``; 13 matches
    LIFT's 5 % in trainable numbers), ``pst`` / ``movement`` / ``magnitude-prune`` (LoRA r=8 while pruning to
    ``sparsity``). ``lr`` defaults per method: full 1e-4, LIFT-style 5e-4, LoRA and PST 2e-3."""
    if method not in METHODS:
        raise InputError(f"unknown sparse tuning method {method!r}; choose one of {', '.join(METHODS)}")
    split = load_split(data, n_train, n_test, max_length, 0.0, seed)
    tuner: Any = None
    if method == "lora":
        model = lora_minilm(split.n_classes, r=lora_rank, seed=seed)
    else:
        base = minilm_classifier(split.n_classes, seed=seed)
        if method in ("lift", "magnitude-sparse"):
            score = "principal" if method == "lift" else "magnitude"
            tuner = LIFT(base, fraction=fraction, rank=rank, score=score, modules=BLOCKS, train=HEAD)
        elif method != "full":
            kind = {"pst": "pst", "movement": "movement", "magnitude-prune": "magnitude"}[method]
            tuner = PST(base, sparsity=sparsity, steps=steps, method=kind, modules=BLOCKS, train=HEAD)
        model = tuner.model if tuner is not None else base
    default_lr = {"full": 1e-4, "lift": 5e-4, "magnitude-sparse": 5e-4}.get(method, 2e-3)
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": body, "lr": default_lr if lr is None else lr}, {"params": head, "lr": head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    peak = {"gradients": 0, "optimizer_state": 0}

    def on_step(loss: torch.Tensor, batch: Any) -> None:
        if tuner is not None:
            tuner.step(opt)
            return
        optimizer_step(model, opt, peak)

    start = time.perf_counter()
    losses = train_loop(
        model, split, on_step, steps=steps, batch_size=batch_size, seed=seed, desc=f"tune {method}", progress=progress
    )
    seconds = time.perf_counter() - start
    peak = dict(tuner.peak) if tuner is not None else peak
    final = tuner.merged() if tuner is not None else model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return SparseRun(
        method,
        held_out_accuracy(final, split),
        trainable,
        peak["gradients"],
        peak["optimizer_state"],
        seconds,
        _zero_share(final) if method in ("pst", "movement", "magnitude-prune") else 0.0,
        tuner,
        losses,
    )
