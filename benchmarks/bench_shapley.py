"""Shapley estimators vs shap at an equal number of coalition evaluations, on 10 features.

Ground truth: exact Shapley values of the interventional game v_x(S) = mean_b f(x_S, b_rest) over the
background rows b (whatmatters' shapley_exact, checked here against shap's ExactExplainer).

Error (the same for every estimator): mean over the explained samples of ||phi_hat - phi||_2 / ||phi||_2,
averaged over seeds. Budget: `--evals` coalition values v(S) per sample. shap's PermutationExplainer
counts max_evals the same way and uses (evals // (2d + 1)) * (2d + 1) of them; KernelExplainer gets
nsamples = evals (plus v(full), and v(empty) once for all samples); ours count empty and full
too and never exceed the budget. The "evals" column shows what each really used. Every evaluation costs
one pass over the background, so equal evaluations are equal model rows.

Models: make_classification (6 informative, 2 redundant) with an MLP and a gradient-boosting classifier
(explained: predict_proba of class 1), make_friedman1 with a gradient-boosting regressor and an MLP.

    python benchmarks/bench_shapley.py                      # 200 evaluations, 4 models, 3 seeds
    python benchmarks/bench_shapley.py --evals 100,200,400 --seeds 5 --samples 40
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")  # fair single-thread timings on a shared machine
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import torch

D = 10


def models(names: list[str]) -> dict:
    """name -> (explained function, data, tree model for the ground truth or None)."""
    from sklearn.datasets import make_classification, make_friedman1
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    out = {}
    xc, yc = make_classification(2000, D, n_informative=6, n_redundant=2, random_state=0)
    xr, yr = make_friedman1(2000, D, noise=0.5, random_state=0)
    for name in names:
        if name == "classification_mlp":
            m = MLPClassifier(hidden_layer_sizes=(64, 64), max_iter=500, random_state=0).fit(xc, yc)
            out[name] = (lambda a, m=m: m.predict_proba(a)[:, 1], xc, None)
        elif name == "classification_gbm":
            m = GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=0).fit(xc, yc)
            out[name] = (lambda a, m=m: m.predict_proba(a)[:, 1], xc, None)
        elif name == "friedman_gbm":
            m = GradientBoostingRegressor(n_estimators=200, max_depth=4, random_state=0).fit(xr, yr)
            out[name] = (m.predict, xr, None)
        elif name == "friedman_mlp":
            m = MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=1000, random_state=0).fit(xr, yr)
            out[name] = (m.predict, xr, None)
        elif name == "friedman20_gbm":  # 20 features: exact values from TreeSHAP (raw output, exact)
            x20, y20 = make_friedman1(2000, 20, noise=0.5, random_state=0)
            m = GradientBoostingRegressor(n_estimators=200, max_depth=4, random_state=0).fit(x20, y20)
            out[name] = (m.predict, x20, m)
        else:
            raise SystemExit(f"unknown model {name!r}")
    return out


def relative_error(est: np.ndarray, exact: np.ndarray) -> float:
    """Mean over samples of ||est - exact||_2 / ||exact||_2."""
    return float(np.mean(np.linalg.norm(est - exact, axis=1) / np.linalg.norm(exact, axis=1)))


def estimators(f, xs: np.ndarray, background: np.ndarray, budget: int, d: int, batch_size: int | None) -> dict:
    """name -> run(seed) -> (values, coalition evaluations used per sample)."""
    import shap

    import whatmatters as wm

    def ours(method: str, **kw):
        def run(seed: int):
            imp = wm.explain(
                f,
                xs,
                method,
                background=background,
                max_background=len(background),
                max_evals=budget,
                seed=seed,
                batch_size=batch_size,
                **kw,
            )
            return imp.numpy(), imp.extra["evaluations"]

        return run

    def shap_permutation(seed: int):
        np.random.seed(seed)
        masker = shap.maskers.Independent(background, max_samples=len(background))
        explainer = shap.explainers.PermutationExplainer(f, masker, seed=seed)
        used = budget // (2 * d + 1) * (2 * d + 1)
        return explainer(xs, max_evals=budget, silent=True).values, used

    def shap_kernel(seed: int):
        np.random.seed(seed)  # KernelExplainer draws from numpy's global generator
        explainer = shap.KernelExplainer(f, background, seed=seed)
        return np.asarray(explainer.shap_values(xs, nsamples=budget, silent=True)), budget + 1

    return {
        "whatmatters kernel_shap (interaction, default)": ours("kernel_shap"),
        "whatmatters kernel_shap (linear)": ours("kernel_shap", estimator="linear"),
        "whatmatters shapley_sampling (control variate, default)": ours("shapley_sampling"),
        "whatmatters shapley_sampling (plain)": ours("shapley_sampling", control_variate=False),
        "shap PermutationExplainer": shap_permutation,
        "shap KernelExplainer": shap_kernel,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evals", default="200", help="comma-separated budgets (coalition values per sample)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--background", type=int, default=100)
    parser.add_argument(
        "--models",
        default="classification_mlp,classification_gbm,friedman_gbm,friedman_mlp",
        help="also available: friedman20_gbm (20 features, ground truth from TreeSHAP)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rows per model call for ours (default: library's)"
    )
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    import shap

    import whatmatters as wm

    budgets = [int(b) for b in args.evals.split(",")]
    report: dict = {
        "batch_size": args.batch_size,
        "samples": args.samples,
        "background": args.background,
        "seeds": args.seeds,
    }
    report["error"] = "mean over samples of ||phi_hat - phi||_2 / ||phi||_2 vs exact Shapley values, mean over seeds"
    report["results"] = {}
    rows = []
    for model_name, (f, x, tree) in models(args.models.split(",")).items():
        rng = np.random.default_rng(0)
        background = x[rng.choice(len(x), args.background, replace=False)]
        xs = x[rng.choice(len(x), args.samples, replace=False)]
        start = time.perf_counter()
        if tree is None:
            kw = {"background": background, "max_background": args.background}
            exact = wm.explain(f, xs, "shapley_exact", **kw).numpy()
            check = shap.explainers.ExactExplainer(f, shap.maskers.Independent(background, max_samples=len(background)))
            parity = float(np.abs(check(xs[:3]).values - exact[:3]).max())
        else:
            imp = wm.explain(tree, xs, "tree_shap", background=background, max_background=args.background)
            exact, parity = imp.numpy(), imp.extra["efficiency_gap"]
        exact_seconds = time.perf_counter() - start

        for budget in budgets:
            runs = estimators(f, xs, background, budget, x.shape[1], args.batch_size)
            res = {}
            for name, run in runs.items():
                errors, seconds, used = [], [], 0
                for seed in range(args.seeds):
                    start = time.perf_counter()
                    est, used = run(seed)
                    seconds.append(time.perf_counter() - start)
                    errors.append(relative_error(est, exact))
                res[name] = {
                    "error": float(np.mean(errors)),
                    "error_sd_over_seeds": float(np.std(errors)),
                    "seconds": float(np.median(seconds)),
                    "evals_used": int(used),
                }
            for name, r in res.items():
                for ref in ("shap PermutationExplainer", "shap KernelExplainer"):
                    short = ref.split()[1]
                    r[f"error_ratio_vs_{short}"] = r["error"] / res[ref]["error"]
                    r[f"time_ratio_vs_{short}"] = r["seconds"] / res[ref]["seconds"]
                rows.append((model_name, budget, name, r))
            truth = "tree_shap efficiency gap" if tree is not None else "max |shapley_exact - shap ExactExplainer|"
            report["results"].setdefault(
                model_name, {"features": x.shape[1], "exact_seconds": exact_seconds, "truth_check": {truth: parity}}
            )
            report["results"][model_name][str(budget)] = res

    header = f"{'model':20s} {'evals':>5s} {'estimator':55s} {'rel.err':>8s} {'used':>5s} {'sec':>6s}"
    header += f" {'err/Perm':>9s} {'err/Kern':>9s} {'t/Perm':>7s} {'t/Kern':>7s}"
    print(header)
    for model_name, budget, name, r in rows:
        print(
            f"{model_name:20s} {budget:5d} {name:55s} {100 * r['error']:7.2f}% {r['evals_used']:5d} "
            f"{r['seconds']:6.2f} {r['error_ratio_vs_PermutationExplainer']:9.2f} "
            f"{r['error_ratio_vs_KernelExplainer']:9.2f} {r['time_ratio_vs_PermutationExplainer']:7.2f} "
            f"{r['time_ratio_vs_KernelExplainer']:7.2f}"
        )
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
