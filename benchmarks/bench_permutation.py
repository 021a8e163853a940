"""Permutation importance: whatmatters vs scikit-learn's ``permutation_importance``, side by side.

A HistGradientBoostingClassifier on ``make_classification`` data (n=5000, d=30 by default),
``n_repeats=10``. scikit-learn makes one model call per feature and repeat; whatmatters stacks all
permuted copies and makes a few large calls. Prints a table and one JSON line.

    python benchmarks/bench_permutation.py [--n 5000] [--d 30] [--repeats 10] [--runs 1]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from timing import best_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--d", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--runs", type=int, default=1, help="timed runs of each; the best is reported")
    args = parser.parse_args()

    import torch
    from sklearn.datasets import make_classification
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.inspection import permutation_importance

    import whatmatters as wm

    X, y = make_classification(n_samples=args.n, n_features=args.d, n_informative=8, random_state=0)
    model = HistGradientBoostingClassifier(random_state=0).fit(X, y)
    model.predict_proba(X[:10])  # warm up

    def ours():
        return wm.explain(model, X, "permutation", y=y, n_repeats=args.repeats, seed=0)

    def sk(n_jobs):
        return lambda: permutation_importance(model, X, y, n_repeats=args.repeats, random_state=0, n_jobs=n_jobs)

    t_ours, imp = best_of(ours, args.runs)
    t_sk, ref = best_of(sk(None), args.runs)
    t_sk2, _ = best_of(sk(2), args.runs)
    mean_ours, se_ours = imp.values.numpy(), imp.extra["stderr"]
    se_sk = ref.importances.std(1, ddof=1) / np.sqrt(args.repeats)
    z = np.abs(mean_ours - ref.importances_mean) / np.maximum(np.sqrt(se_ours**2 + se_sk**2), 1e-12)
    result = {
        "benchmark": "permutation_importance",
        "model": "HistGradientBoostingClassifier",
        "n": args.n,
        "d": args.d,
        "n_repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "seconds": {"whatmatters": t_ours, "sklearn": t_sk, "sklearn_n_jobs_2": t_sk2},
        "ratio_vs_sklearn": t_ours / t_sk,
        "ratio_vs_sklearn_n_jobs_2": t_ours / t_sk2,
        "goal_ratio": 0.5,
        "agreement": {
            "spearman": float(
                np.corrcoef(np.argsort(np.argsort(mean_ours)), np.argsort(np.argsort(ref.importances_mean)))[0, 1]
            ),
            "max_z": float(z.max()),
        },
    }
    print(f"{'method':<28}{'seconds':>10}{'ours / it':>12}")
    print(f"{'whatmatters permutation':<28}{t_ours:>10.3f}{1.0:>12.2f}")
    print(f"{'sklearn (n_jobs=None)':<28}{t_sk:>10.3f}{t_ours / t_sk:>12.2f}")
    print(f"{'sklearn (n_jobs=2)':<28}{t_sk2:>10.3f}{t_ours / t_sk2:>12.2f}")
    print(f"agreement: spearman {result['agreement']['spearman']:.3f}, max |diff| / combined stderr {z.max():.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
