"""Rashomon importance cloud on scikit-learn's breast-cancer data: rank ranges over near-equally good models.

Fits ``--models`` random forests (seeds, ``max_depth`` / ``max_features`` / ``min_samples_leaf`` drawn at
random, bootstrap samples of the 70 % training split), keeps those within ``--tolerance`` (log loss) of the
best on the 30 % held out, and measures permutation importance (``neg_log_loss``, ``--repeats`` shuffles)
and the pairwise interactions of the 10 top features on every kept model. A pure-noise column is added to
check that it never ranks near the top. The single best model's own ranking is compared with the set:
how many of its top 5 features are in every kept model's top 5. Fits run with joblib on ``--jobs``
processes; the time of 1 vs ``--jobs`` processes is printed as a ratio from one run.

    PYTHONPATH=. python benchmarks/bench_rashomon.py [--models 30 --tolerance 0.02 --out benchmarks/out/rashomon.html]

Prints the rank-range table (markdown), then one JSON object; writes the HTML report and the cloud plot (PNG).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=30)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15, help="rows of the printed table")
    parser.add_argument("--out", default="benchmarks/out/rashomon.html")
    parser.add_argument("--png", default="benchmarks/out/rashomon_cloud.png")
    args = parser.parse_args()

    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier

    from whatmatters.evaluate import rashomon
    from whatmatters.report import plots, write_report
    from whatmatters.report.rashomon import cloud_plot, rank_plot

    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    X["pure noise"] = np.random.default_rng(0).normal(size=len(X))
    grid = {"max_depth": [3, 5, 8, None], "max_features": ["sqrt", 0.3, 0.6], "min_samples_leaf": [1, 3, 5]}
    kwargs = dict(
        n_models=args.models,
        tolerance=args.tolerance,
        params=grid,
        loss="log_loss",
        n_repeats=args.repeats,
        scoring="neg_log_loss",
    )
    seconds = {}
    clouds = {}
    for jobs in sorted({1, args.jobs}):
        start = time.perf_counter()
        clouds[jobs] = rashomon(RandomForestClassifier(n_estimators=100), X, y, n_jobs=jobs, **kwargs)
        seconds[jobs] = time.perf_counter() - start
    cloud = clouds[args.jobs]
    same = bool(np.array_equal(clouds[1].values.numpy(), cloud.values.numpy()))

    ranges = cloud.rank_ranges()  # top: a quarter of the features, at most 10 (8 here)
    top = int(next(c for c in ranges.columns if c.endswith("_share"))[3:-6])
    losses, kept = cloud.info["losses"], cloud.info["kept"]
    best = int(np.argmin(losses[kept]))
    best_top5 = set(np.argsort(-cloud.values[best].numpy(), kind="stable")[:5])
    in_all = [j for j in best_top5 if (cloud.ranks()[:, j] <= 5).all()]
    in_most = [j for j in best_top5 if (cloud.ranks()[:, j] <= 5).double().mean() >= 0.9]

    cols = ["importance_median", "importance_min", "importance_max", "rank_min", "rank_median", "rank_max"]
    print(
        f"\n{len(kept)} of {args.models} random forests within {args.tolerance} of the best held-out log loss "
        f"({losses.min():.4f}; kept range {losses[kept].min():.4f}-{losses[kept].max():.4f})"
    )
    print("| feature | " + " | ".join(cols) + f" | top{top} share | unstable |")
    print("|" + "---|" * (len(cols) + 3))
    for name, row in ranges.head(args.rows).iterrows():
        values = [f"{row[c]:.4f}" if c.startswith("importance") else f"{row[c]:g}" for c in cols]
        flag = "yes" if row["unstable"] else ""
        print(f"| {name} | " + " | ".join(values) + f" | {row[f'top{top}_share']:.2f} | {flag} |")
    noise = ranges.loc["pure noise"]
    print(f"| pure noise | ... rank {noise['rank_min']:g}-{noise['rank_max']:g} (median {noise['rank_median']:g}) |")
    print(cloud.interactions().head(5).to_string())

    write_report(cloud, args.out, title="whatmatters: Rashomon importance cloud, breast cancer")
    fig = plots.new_figure(11.5, 6.4)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    cloud_plot(cloud, ax=left, k=16)
    rank_plot(cloud, ax=right, k=16)
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    Path(args.png).write_bytes(plots.figure_to_png(fig, dpi=80))

    summary = {
        "candidates": args.models,
        "kept": len(kept),
        "tolerance": args.tolerance,
        "best_log_loss": float(losses.min()),
        "kept_log_loss": [float(losses[kept].min()), float(losses[kept].max())],
        "unstable": cloud.unstable(),
        "top": top,
        "noise_rank_min": float(noise["rank_min"]),
        "best_model_top5_in_every_top5": len(in_all),
        "best_model_top5_in_90pct_top5": len(in_most),
        "top_pair": cloud.interactions().head(1).to_dict("records"),
        "seconds": {str(k): round(v, 2) for k, v in seconds.items()},
        "stage_seconds": {str(j): {k: round(v, 2) for k, v in c.info["seconds"].items()} for j, c in clouds.items()},
        "fit_ratio": clouds[args.jobs].info["seconds"]["fit"] / clouds[1].info["seconds"]["fit"],
        "parallel_equals_sequential": same,
        "report": args.out,
        "png": args.png,
    }
    print(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
