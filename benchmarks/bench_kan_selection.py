"""KAN feature selection against classical selectors (the protocol of arXiv:2509.23366, scaled down).

For every dataset and seed: a stratified 75/25 train/test split; every selector scores the
features on the (standardized) training rows only; the top 20 %, 40 % and 60 % of features are
kept; the downstream model is fitted on the kept training columns and scored on the test rows:
macro F1 (classification) or R² (regression). Reported: the mean over the three retention levels
and the seeds, per dataset and selector, plus seconds per selector.

Selectors: kan_l1, kan_l2, kan_si, kan_ko (whatmatters, one KAN fit shared by the four);
LASSO (LassoCV for regression, L1 logistic regression C=0.1 for classification, mean |coef|
over classes); random forest impurity importance (100 trees); mutual information; SVM-RFE
(linear SVM, one feature eliminated per step); and a random ranking as the floor. "all" is the
downstream model on every feature.

Downstream models (the same for every selector): ``rf`` = random forest, 100 trees;
``linear`` = logistic regression / ridge on standardized columns.

    python benchmarks/bench_kan_selection.py               # 3 seeds, both downstream models
    python benchmarks/bench_kan_selection.py --seeds 1 --json out.json

Prints a markdown table per downstream model (datasets x selectors), a seconds table, and JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

SELECTORS = ["kan_l1", "kan_l2", "kan_si", "kan_ko", "lasso", "rf", "mi", "svm_rfe", "random"]
LEVELS = (0.2, 0.4, 0.6)


def datasets() -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    from sklearn import datasets as ds

    out = {}
    for name, loader in [("breast_cancer", ds.load_breast_cancer), ("wine", ds.load_wine), ("digits", ds.load_digits)]:
        X, y = loader(return_X_y=True)
        out[name] = (X.astype(np.float64), y, "classification")
    X, y = ds.make_classification(
        n_samples=600, n_features=30, n_informative=6, n_redundant=4, n_repeated=0, random_state=0
    )
    out["make_classification"] = (X, y, "classification")
    X, y = ds.load_diabetes(return_X_y=True)
    out["diabetes"] = (X, y, "regression")
    X, y = ds.make_friedman1(n_samples=500, n_features=20, noise=1.0, random_state=0)
    out["friedman1"] = (X, y, "regression")
    return out


def baseline_scores(name: str, X: np.ndarray, y: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """One score per feature from a classical selector (higher = keep), fitted on standardized training data."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
    from sklearn.feature_selection import RFE, mutual_info_classif, mutual_info_regression
    from sklearn.linear_model import LassoCV, LogisticRegression
    from sklearn.svm import LinearSVC, LinearSVR

    clf = kind == "classification"
    if name == "lasso":
        if not clf:
            return np.abs(LassoCV(cv=5, random_state=seed).fit(X, y).coef_)
        model = LogisticRegression(l1_ratio=1.0, solver="saga", C=0.1, max_iter=3000, tol=1e-3, random_state=seed)
        return np.abs(model.fit(X, y).coef_).mean(0)
    if name == "rf":
        forest = (RandomForestClassifier if clf else RandomForestRegressor)(n_estimators=100, random_state=seed)
        return forest.fit(X, y).feature_importances_
    if name == "mi":
        return (mutual_info_classif if clf else mutual_info_regression)(X, y, random_state=seed)
    if name == "svm_rfe":
        svm = LinearSVC(C=1.0, dual="auto", max_iter=5000) if clf else LinearSVR(C=1.0, dual="auto", max_iter=5000)
        ranking = RFE(svm, n_features_to_select=1, step=1).fit(X, y).ranking_
        return (ranking.max() + 1 - ranking).astype(float)  # positive: select_features ranks by |score|
    if name == "random":
        return np.random.default_rng(seed).random(X.shape[1])
    raise ValueError(name)


def downstream(model: str, kind: str, seed: int):
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
    from sklearn.linear_model import LogisticRegression, Ridge

    if model == "rf":
        return (RandomForestClassifier if kind == "classification" else RandomForestRegressor)(
            n_estimators=100, random_state=seed
        )
    return LogisticRegression(max_iter=3000) if kind == "classification" else Ridge(alpha=1.0)


def evaluate(model: str, kind: str, seed: int, Xtr, ytr, Xte, yte) -> float:
    from sklearn.metrics import f1_score, r2_score

    pred = downstream(model, kind, seed).fit(Xtr, ytr).predict(Xte)
    return float(f1_score(yte, pred, average="macro") if kind == "classification" else r2_score(yte, pred))


def run(seeds: int, models: list[str]) -> dict:
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from whatmatters import Importance
    from whatmatters.explain import kan
    from whatmatters.explain.select import score_features, select_features

    results: dict = {"protocol": {}, "datasets": {}}
    for dname, (X, y, kind) in datasets().items():
        per = {m: {s: [] for s in [*SELECTORS, "all"]} for m in models}
        seconds: dict[str, list[float]] = {s: [] for s in [*SELECTORS, "kan_fit"]}
        kan_val = []
        for seed in range(seeds):
            Xtr, Xte, ytr, yte = train_test_split(
                X, y, test_size=0.25, random_state=seed, stratify=y if kind == "classification" else None
            )
            scaler = StandardScaler().fit(Xtr)
            Xtr_s, Xte_s = scaler.transform(Xtr), scaler.transform(Xte)
            scores = {}
            kan.clear_cache()
            for sel in SELECTORS:
                start = time.perf_counter()
                if sel.startswith("kan_"):
                    imp = score_features(Xtr_s, ytr, sel, seed=seed)
                    elapsed = time.perf_counter() - start
                    if not imp.extra["fit_cached"]:
                        seconds["kan_fit"].append(imp.extra["fit_seconds"])
                        kan_val.append(imp.extra["validation_score"])
                        elapsed -= imp.extra["fit_seconds"]  # scoring only; the fit is counted once
                    scores[sel] = imp
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        vals = baseline_scores(sel, Xtr_s, ytr, kind, seed)
                    elapsed = time.perf_counter() - start
                    scores[sel] = Importance(values=torch.as_tensor(vals, dtype=torch.float64), per_sample=False)
                seconds[sel].append(elapsed)
            for m in models:
                per[m]["all"].append([evaluate(m, kind, seed, Xtr_s, ytr, Xte_s, yte)] * len(LEVELS))
                for sel, imp in scores.items():
                    row = []
                    for level in LEVELS:
                        kept = select_features(imp, keep=level).indices
                        row.append(evaluate(m, kind, seed, Xtr_s[:, kept], ytr, Xte_s[:, kept], yte))
                    per[m][sel].append(row)
            print(f"  {dname} seed {seed} done", file=sys.stderr, flush=True)
        fit = float(np.mean(seconds.pop("kan_fit")))
        results["datasets"][dname] = {
            "task": kind,
            "metric": "f1_macro" if kind == "classification" else "r2",
            "shape": list(X.shape),
            "kan_validation_score": float(np.mean(kan_val)),
            "kan_fit_seconds": fit,
            "seconds": {s: float(np.mean(v)) + (fit if s.startswith("kan_") else 0.0) for s, v in seconds.items()},
            "scoring_seconds": {s: float(np.mean(v)) for s, v in seconds.items()},
            "scores": {
                m: {
                    s: {
                        "mean": float(np.mean(v)),
                        "per_level": np.mean(v, 0).tolist(),
                        "per_seed": np.mean(v, 1).tolist(),
                    }
                    for s, v in per[m].items()
                }
                for m in models
            },
        }
    results["protocol"] = {
        "seeds": seeds,
        "levels": list(LEVELS),
        "split": "75/25, stratified for classification; selectors fit on the training rows only",
        "downstream": {"rf": "RandomForest, 100 trees", "linear": "LogisticRegression / Ridge(alpha=1)"},
        "kan": "whatmatters defaults: widths [d, 8, out], grid 5, cubic, 200 Adam steps, lr 1e-2, "
        "L1 penalty 0.01, 20 % held out",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    return results


def tables(results: dict, models: list[str]) -> str:
    lines = []
    names = list(results["datasets"])
    cols = [*SELECTORS, "all"]
    for m in models:
        lines.append(f"\n### Downstream: {results['protocol']['downstream'][m]} (mean of 20/40/60 % retention)\n")
        lines.append("| dataset (metric) | " + " | ".join(cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        ranks = []
        for d in names:
            res = results["datasets"][d]
            vals = [res["scores"][m][s]["mean"] for s in cols]
            best = max(vals[:-1])
            cells = [
                f"**{v:.3f}**" if math.isclose(v, best) and i < len(SELECTORS) else f"{v:.3f}"
                for i, v in enumerate(vals)
            ]
            lines.append(f"| {d} ({res['metric']}) | " + " | ".join(cells) + " |")
            order = np.argsort(np.argsort(-np.array(vals[:-1]), kind="stable"), kind="stable") + 1
            ranks.append(order)
        mean_rank = np.mean(ranks, 0)
        lines.append("| mean rank (1 = best) | " + " | ".join(f"{r:.1f}" for r in mean_rank) + " | |")
    lines.append("\n### Seconds per selector (mean per split; kan_* include the shared fit)\n")
    lines.append("| dataset | KAN fit | KAN val. score | " + " | ".join(SELECTORS) + " |")
    lines.append("|---" * (len(SELECTORS) + 3) + "|")
    for d in names:
        res = results["datasets"][d]
        sec = " | ".join(f"{res['seconds'][s]:.2f}" for s in SELECTORS)
        lines.append(f"| {d} | {res['kan_fit_seconds']:.2f} | {res['kan_validation_score']:.3f} | {sec} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--downstream", choices=["rf", "linear", "both"], default="both")
    parser.add_argument("--json", help="also write the JSON results to this file")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    models = ["rf", "linear"] if args.downstream == "both" else [args.downstream]
    start = time.perf_counter()
    results = run(args.seeds, models)
    results["total_seconds"] = time.perf_counter() - start
    print(tables(results, models))
    print(f"\ntotal: {results['total_seconds']:.0f} s\n")
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
