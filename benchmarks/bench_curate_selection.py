"""Training on a selection: keep 50 % of Fashion-MNIST by each strategy vs a random 50 %, equal budget.

Scores come from short training runs (``curate.train_models``: 3 epochs x 2 seeds of a small MLP): EL2N and
GraNd at epoch 1, forgetting events and the final loss; embeddings for the diversity strategies are the
first 32 principal components of the pixels. Every selection trains a fresh MLP (same epochs, same seeds)
and is evaluated on the test split. Prints a table and one JSON line.

    python benchmarks/bench_curate_selection.py [--n 8000] [--keep 0.5] [--epochs 8] [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8000, help="training images (the first n of the train split)")
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each downstream training run")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from whatmatters import curate
    from whatmatters.vision.pretrained import load_fashion_mnist

    x, y = load_fashion_mnist("train", n=args.n)
    xt, yt = load_fashion_mnist("test", n=args.test)
    start = time.perf_counter()
    run = curate.train_models(mlp, x, y, epochs=3, seeds=2, lr=0.05, batch_size=128)
    scores = {
        "el2n": curate.score(run.models(epoch=1), data=x, y=y, method="el2n"),
        "grand": curate.score(run.models(epoch=1), data=x, y=y, method="grand"),
        "forgetting": curate.score(run, method="forgetting"),
        "loss": curate.score(run.models(), data=x, y=y, method="loss"),
    }
    flat = x.reshape(len(x), -1)
    _, _, v = torch.pca_lowrank(flat, q=32, center=True)
    emb = (flat - flat.mean(0)) @ v
    scoring_seconds = time.perf_counter() - start

    plans = {
        "all data (100 %)": None,
        "random": ("random", None, {}),
        "top EL2N (hardest)": ("top", "el2n", {}),
        "top GraNd (hardest)": ("top", "grand", {}),
        "top forgetting": ("top", "forgetting", {}),
        "lowest EL2N (easiest)": ("top", "el2n", {"largest": False}),
        "CCS on EL2N": ("ccs", "el2n", {}),
        "CCS on forgetting": ("ccs", "forgetting", {}),
        "k-center (PCA-32)": ("k_center", None, {}),
        "facility location (PCA-32)": ("facility_location", None, {}),
        "cluster-then-sample EL2N": ("cluster_sample", "el2n", {}),
    }
    rows = []
    for label, plan in plans.items():
        t0 = time.perf_counter()
        if plan is None:
            idx = torch.arange(len(x))
        else:
            strategy, key, params = plan
            imp = scores[key] if key else None
            idx = curate.select(imp, args.keep, strategy=strategy, embeddings=emb, **params).indices
        select_s = time.perf_counter() - t0
        trained = curate.train_models(
            mlp, x[idx], y[idx], epochs=args.epochs, seeds=args.seeds, lr=0.05, batch_size=128
        )
        accs = torch.tensor([accuracy(m, xt, yt) for m in trained.models()])
        rows.append({"selection": label, "kept": len(idx), "accuracy": float(accs.mean()), "std": float(accs.std()),
                     "select_seconds": select_s})  # fmt: skip
    print(
        f"Fashion-MNIST, {args.n} training images, keep {args.keep:.0%}, MLP {args.epochs} epochs x {args.seeds} seeds"
    )
    print(f"scores + embeddings: {scoring_seconds:.1f} s")
    print("| selection | kept | test accuracy | select s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['selection']} | {r['kept']} | {r['accuracy']:.4f} ± {r['std']:.4f} | {r['select_seconds']:.2f} |")
    print(json.dumps({"benchmark": "curate_selection", "n": args.n, "keep": args.keep, "rows": rows}))


if __name__ == "__main__":
    main()
