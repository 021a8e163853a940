"""Loss-based sample reweighting vs uniform training on Fashion-MNIST with injected symmetric label noise.

    python benchmarks/bench_tune_reweight.py --noise 0,0.2,0.4 --seeds 3 --epochs 30 --threads 2

A share of the training labels (``--noise``) is replaced by a uniformly random *other* class; every run trains the
same MLP (784-512-512-10, Adam 1e-3, batch 128) from the same seed on the same noisy labels, and the clean test
accuracy (10,000 test images, after the last epoch, no early stopping) is reported as mean ± std over the seeds:

* ``uniform``: ``losses.mean()``;
* ``bands``: ``weighted_loss(losses)`` with the defaults (easiest 25 % x0.5, medium x1.5, hardest 10 % x0.1);
* ``small_loss``: ``weighted_loss(losses, scheme="small_loss", drop=drop_schedule(step, drop=D, warmup=W))``;
* ``small_loss_sampler``: uniform loss on batches drawn by ``LossWeightedSampler(scheme="small_loss")``, whose
  ``drop`` follows the same ramp per epoch (losses recorded from each batch as it trains).

Prints one JSON line per run and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.tune.reweight import LossWeightedSampler, drop_schedule, weighted_loss
from whatmatters.vision.pretrained import load_fashion_mnist


def noisy_labels(labels: torch.Tensor, share: float, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels`` with a ``share`` of them (drawn at random) moved to a uniformly random other class; the flip mask."""
    g = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(len(labels), generator=g)[: round(share * len(labels))]
    y = labels.clone()
    y[flipped] = (labels[flipped] + torch.randint(1, n_classes, (len(flipped),), generator=g)) % n_classes
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[flipped] = True
    return y, mask


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def train(run: str, x, y, test, args, seed: int) -> dict:
    torch.manual_seed(seed)
    net = mlp()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(seed + 1)
    n, steps_per_epoch = len(y), len(y) // args.batch
    warmup = args.warmup * steps_per_epoch
    sampler = LossWeightedSampler(n, scheme="small_loss", seed=seed, drop=0.0) if run == "small_loss_sampler" else None
    losses_of: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
        "uniform": lambda losses, step: losses.mean(),
        "bands": lambda losses, step: weighted_loss(losses),
        "small_loss": lambda losses, step: weighted_loss(
            losses, scheme="small_loss", drop=drop_schedule(step, drop=args.drop, warmup=warmup)
        ),
        "small_loss_sampler": lambda losses, step: losses.mean(),
    }
    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.options["drop"] = drop_schedule(epoch * steps_per_epoch, drop=args.drop, warmup=warmup)
            order = torch.tensor(list(sampler))[: steps_per_epoch * args.batch].view(-1, args.batch)
        else:
            order = torch.randperm(n, generator=g)[: steps_per_epoch * args.batch].view(-1, args.batch)
        for idx in order:
            losses = F.cross_entropy(net(x[idx]), y[idx], reduction="none")
            if sampler is not None:
                sampler.update(idx, losses)
            loss = losses_of[run](losses, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (net.eval()(test[0]).argmax(1) == test[1]).float().mean().item()
    return {"run": run, "seed": seed, "accuracy": round(accuracy, 4), "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--noise", default="0,0.2,0.4", help="shares of training labels flipped, comma-separated")
    ap.add_argument("--runs", default="uniform,bands,small_loss,small_loss_sampler")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--drop", type=float, default=0.3, help="small_loss: share dropped after the warm-up")
    ap.add_argument("--warmup", type=int, default=5, help="small_loss: epochs over which drop ramps up from 0")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = load_fashion_mnist("train", n=args.n_train)
    test = load_fashion_mnist("test")
    results: dict[tuple[float, str], list[float]] = {}
    for noise in [float(s) for s in args.noise.split(",")]:
        for seed in range(args.seeds):
            y, _ = noisy_labels(labels, noise, 10, seed)
            for run in args.runs.split(","):
                row = {"noise": noise, **train(run, images, y, test, args, seed)}
                print(json.dumps(row), flush=True)
                results.setdefault((noise, run), []).append(row["accuracy"])
    noises = sorted({k[0] for k in results})
    print("\n| run | " + " | ".join(f"{z:.0%} noise" for z in noises) + " |")
    print("|---" * (len(noises) + 1) + "|")
    for run in args.runs.split(","):
        cells = []
        for z in noises:
            acc = results[(z, run)]
            std = statistics.stdev(acc) if len(acc) > 1 else 0.0
            cells.append(f"{statistics.mean(acc):.3f} ± {std:.3f}")
        print(f"| {run} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
