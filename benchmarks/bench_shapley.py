"""Shapley estimators vs shap at an equal number of coalition evaluations.

Error = mean over explained samples of ||phi_hat - phi||_2 / ||phi||_2, against exact Shapley values
(whatmatters' shapley_exact, which equals shap's ExactExplainer to 1e-6: tests/test_shapley.py).
Every estimator gets `--evals` coalition evaluations per sample (shap counts max_evals / nsamples the
same way; ours count the empty and full coalitions too). Prints a table and JSON.

    python benchmarks/bench_shapley.py --evals 200 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--evals", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import shap
    from sklearn.datasets import make_classification
    from sklearn.neural_network import MLPClassifier

    import whatmatters as wm

    X, y = make_classification(n_samples=600, n_features=10, n_informative=6, random_state=0)
    model = MLPClassifier((32, 32), max_iter=800, random_state=0).fit(X, y)

    def f(a: np.ndarray) -> np.ndarray:
        return model.predict_proba(a)[:, 1]

    background, xs = X[:60], X[200 : 200 + args.samples]
    exact = wm.explain(f, xs, "shapley_exact", background=background).numpy()

    def error(est: np.ndarray) -> float:
        return float(np.mean(np.linalg.norm(est - exact, axis=1) / np.linalg.norm(exact, axis=1)))

    masker = shap.maskers.Independent(background, max_samples=100)
    runs = {
        "whatmatters kernel_shap": lambda s: wm.explain(
            f, xs, "kernel_shap", background=background, max_evals=args.evals, seed=s
        ).numpy(),
        "whatmatters shapley_sampling": lambda s: wm.explain(
            f, xs, "shapley_sampling", background=background, max_evals=args.evals, seed=s
        ).numpy(),
        "shap PermutationExplainer": lambda s: (
            shap.explainers.PermutationExplainer(f, masker, seed=s)(xs, max_evals=args.evals, silent=True).values
        ),
        "shap KernelExplainer": lambda s: np.asarray(
            shap.KernelExplainer(f, background, seed=s).shap_values(xs, nsamples=args.evals, silent=True)
        ),
    }
    results = {}
    for name, run in runs.items():
        errors, seconds = [], []
        for seed in range(args.seeds):
            np.random.seed(seed)  # shap's KernelExplainer draws from numpy's global generator
            start = time.perf_counter()
            est = run(seed)
            seconds.append(time.perf_counter() - start)
            errors.append(error(est))
        results[name] = {
            "error": float(np.mean(errors)),
            "error_sd": float(np.std(errors)),
            "seconds": float(np.median(seconds)),
        }
    for ours, ref in (
        ("whatmatters kernel_shap", "shap KernelExplainer"),
        ("whatmatters shapley_sampling", "shap PermutationExplainer"),
    ):
        results[ours]["error_ratio_vs_" + ref] = results[ours]["error"] / results[ref]["error"]
        results[ours]["time_ratio_vs_" + ref] = results[ours]["seconds"] / results[ref]["seconds"]
    print(f"{'estimator':32s} {'rel. error':>11s} {'sd':>7s} {'seconds':>8s}")
    for name, r in results.items():
        print(f"{name:32s} {100 * r['error']:10.2f}% {100 * r['error_sd']:6.2f}% {r['seconds']:8.3f}")
    print(json.dumps({"evals": args.evals, "features": 10, "samples": args.samples, "results": results}, indent=1))


if __name__ == "__main__":
    main()
