"""TabEBM augmentation on small bundled tables: downstream accuracy with / without / SMOTE-like, and fidelity.

For each data set (breast cancer, wine, iris) and training size, stratified splits of ``--train`` rows; the rest
is the test set. Synthetic rows: as many as the real ones, per class. Downstream: a scaled logistic regression
and a random forest. Fidelity of the synthetic rows against the real training rows: the mean per-column
Kolmogorov-Smirnov statistic and the mean absolute difference of the correlation matrices (lower is better).
SMOTE-like: each synthetic row interpolates between a random real row and one of its 5 nearest neighbours
of the same class. Prints a table and one JSON line.

    python benchmarks/bench_curate_tabebm.py [--train 50 100] [--splits 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def smote_like(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, k: int = 5):
    xs, ys = [], []
    for c in np.unique(y):
        rows = x[y == c]
        d = ((rows[:, None] - rows[None]) ** 2).sum(-1)
        near = np.argsort(d, 1)[:, 1 : k + 1]
        base = rng.integers(len(rows), size=len(rows))
        other = near[base, rng.integers(near.shape[1], size=len(rows))]
        xs.append(rows[base] + rng.random((len(rows), 1)) * (rows[other] - rows[base]))
        ys.append(np.full(len(rows), c))
    return np.concatenate(xs), np.concatenate(ys)


def fidelity(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    from scipy.stats import ks_2samp

    ks = np.mean([ks_2samp(real[:, j], fake[:, j]).statistic for j in range(real.shape[1])])
    corr = np.nan_to_num(np.abs(np.corrcoef(real, rowvar=False) - np.corrcoef(fake, rowvar=False))).mean()
    return float(ks), float(corr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--splits", type=int, default=2)
    args = parser.parse_args()
    import torch
    from sklearn.datasets import load_breast_cancer, load_iris, load_wine
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from whatmatters.curate import augment

    torch.set_num_threads(1)
    models = {
        "logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
        "forest": lambda: RandomForestClassifier(n_estimators=200, random_state=0),
    }
    rows = []
    for name, load in (("breast_cancer", load_breast_cancer), ("wine", load_wine), ("iris", load_iris)):
        x, y = load(return_X_y=True)
        for size in args.train:
            acc = {m: {g: [] for g in ("none", "smote_like", "tabebm")} for m in models}
            fid = {g: [] for g in ("smote_like", "tabebm")}
            seconds = []
            for split in range(args.splits):
                xtr, xte, ytr, yte = train_test_split(x, y, train_size=size, stratify=y, random_state=split)
                start = time.perf_counter()
                syn = {"tabebm": augment(xtr, ytr, seed=split)}
                seconds.append(time.perf_counter() - start)
                syn["smote_like"] = smote_like(xtr, ytr, np.random.default_rng(split))
                for g, (xs, _) in syn.items():
                    fid[g].append(fidelity(xtr, xs))
                for m, make in models.items():
                    acc[m]["none"].append(make().fit(xtr, ytr).score(xte, yte))
                    for g, (xs, ys) in syn.items():
                        acc[m][g].append(make().fit(np.vstack([xtr, xs]), np.concatenate([ytr, ys])).score(xte, yte))
            row = {"data": name, "train": size, "tabebm_seconds": float(np.mean(seconds))}
            for m in models:
                for g, values in acc[m].items():
                    row[f"{m}_{g}"] = float(np.mean(values))
            for g, values in fid.items():
                row[f"ks_{g}"], row[f"corr_{g}"] = (float(v) for v in np.mean(values, 0))
            rows.append(row)
    print(f"{args.splits} splits per row; accuracy: none / SMOTE-like / TabEBM; fidelity: KS and |corr diff|")
    print("| data | train rows | logistic | forest | KS SMOTE-like / TabEBM | corr SMOTE-like / TabEBM | TabEBM s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lg = " / ".join(f"{r[f'logistic_{g}']:.3f}" for g in ("none", "smote_like", "tabebm"))
        rf = " / ".join(f"{r[f'forest_{g}']:.3f}" for g in ("none", "smote_like", "tabebm"))
        print(f"| {r['data']} | {r['train']} | {lg} | {rf} | {r['ks_smote_like']:.3f} / {r['ks_tabebm']:.3f} | "
              f"{r['corr_smote_like']:.3f} / {r['corr_tabebm']:.3f} | {r['tabebm_seconds']:.1f} |")  # fmt: skip
    print(json.dumps({"benchmark": "curate_tabebm", "splits": args.splits, "rows": rows}))


if __name__ == "__main__":
    main()
