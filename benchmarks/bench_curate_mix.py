"""Domain mixture weights (DoReMi) and GAIS-style instance selection: what they find, and kNN graph speed.

1. DoReMi on a synthetic three-domain mixture (easy / learnable-but-underfit / random labels): the averaged
   domain weights and the time of the proxy run.
2. GAIS on scikit-learn's bundled tabular sets with ``--noise`` of the training labels flipped: precision of the
   top-m scores at finding the flipped rows (random gives the noise rate) and the clean test accuracy of a
   logistic regression trained on the most consistent half, a random half and all rows.
3. The kNN graph on ``--rows`` random clustered rows: whatmatters' blocked exact kNN and LSH kNN against
   scikit-learn's ``NearestNeighbors`` (brute force, one thread), as times and ratios in one run; LSH recall.

    PYTHONPATH=. python benchmarks/bench_curate_mix.py [--noise 0.2] [--rows 20000]   # from the repository root
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def doremi_row() -> None:
    from tests.test_curate_mixture import mixture, net, reference
    from whatmatters import curate

    x, y, domains = mixture(n=1000)
    ref = reference(x, y, steps=300)
    imp = curate.doremi(net(2), ref, x, y, domains, steps=200, batch_size=96, progress=False)
    shown = ", ".join(f"{n} {float(v):.3f}" for n, v in zip(imp.names, imp.values))
    print(f"DoReMi (3 x 1,000 rows, 200 proxy steps): weights {shown}; {imp.seconds:.2f} s")


def gais_rows(noise: float) -> None:
    from sklearn.datasets import load_breast_cancer, load_digits, load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from whatmatters import curate

    print(f"\nGAIS, {noise:.0%} labels flipped | rows | precision (random) | LR acc: GAIS half | random half | all")
    for load in (load_breast_cancer, load_wine, load_digits):
        x, y = load(return_X_y=True)
        x, x_test, y, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
        rng = np.random.default_rng(0)
        flip = rng.random(len(y)) < noise
        classes = int(y.max()) + 1
        y = y.copy()
        y[flip] = (y[flip] + rng.integers(1, classes, flip.sum())) % classes
        start = time.perf_counter()
        imp = curate.score(data=x, y=y, method="gais", k=10)
        seconds = time.perf_counter() - start
        precision = flip[np.argsort(-imp.numpy())[: flip.sum()]].mean()

        def accuracy(rows, x=x, y=y, x_test=x_test, y_test=y_test):
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            return model.fit(x[rows], y[rows]).score(x_test, y_test)

        kept = curate.select(imp, 0.5, strategy="top", largest=False).indices.numpy()
        rand = np.mean([accuracy(curate.select(imp, 0.5, strategy="random", seed=s).indices.numpy()) for s in range(5)])
        name = load.__name__.removeprefix("load_")
        print(
            f"{name:14s} | {len(y):5d} | {precision:.3f} ({flip.mean():.3f}) | {accuracy(kept):.3f} | "
            f"{rand:.3f} (mean of 5) | {accuracy(np.arange(len(y))):.3f} | scored in {seconds:.2f} s"
        )


def knn_rows(rows: int) -> None:
    from sklearn.neighbors import NearestNeighbors

    from whatmatters.curate.graph import exact_knn, lsh_knn

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(50, 32, generator=g) * 4
    x = centres[torch.randint(50, (rows,), generator=g)] + torch.randn(rows, 32, generator=g)
    k = 10
    start = time.perf_counter()
    _, reference = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", n_jobs=1).fit(x).kneighbors(x)
    sk = time.perf_counter() - start
    start = time.perf_counter()
    exact = exact_knn(x, k, progress=False)
    ex = time.perf_counter() - start
    agree = (exact.indices.numpy() == reference[:, 1:]).mean()
    print(f"\nkNN graph, {rows:,} x 32 rows, k={k} (one thread)")
    print(f"sklearn NearestNeighbors brute: {sk:.2f} s")
    print(f"whatmatters exact (blocked):    {ex:.2f} s  ({sk / ex:.2f}x sklearn; same neighbours: {agree:.4f})")
    for tables in (8, 16):
        start = time.perf_counter()
        approx = lsh_knn(x, k, tables=tables, progress=False)
        ls = time.perf_counter() - start
        recall = (approx.indices[:, :, None] == exact.indices[:, None, :]).any(2).double().mean()
        print(
            f"whatmatters LSH, {tables:2d} tables:     {ls:.2f} s  "
            f"({sk / ls:.2f}x sklearn; recall of exact: {recall:.3f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--rows", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    doremi_row()
    gais_rows(args.noise)
    knn_rows(args.rows)


if __name__ == "__main__":
    main()
