"""Feature responsiveness scores: whatmatters (batched) vs a per-person, per-feature loop, side by side.

The authors' library (``reachml``) needs IBM CPLEX, which is not available here, so the reference is
the direct implementation of the definition: for every person and feature, one model call on that
feature's feasible candidate values (the same candidates, so the scores must be identical).
whatmatters builds all feasible single-feature changes of all people at once and sends them to the
model in a few large batches. Models: a scaled logistic regression (scikit-learn) and a small torch
MLP on the breast-cancer data (bundled with scikit-learn). Prints a table and one JSON line.

    python benchmarks/bench_responsiveness.py [--n 200] [--n-values 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from timing import best_of


def loop_reference(predict_class, X: np.ndarray, grids: list[np.ndarray], desired: int) -> np.ndarray:
    """The definition, one person and feature at a time (one model call per pair)."""
    n, d = X.shape
    scores = np.zeros((n, d))
    at_target = predict_class(X) == desired
    for i in range(n):
        if at_target[i]:
            continue
        for j in range(d):
            values = grids[j][grids[j] != X[i, j]]
            if len(values) == 0:
                continue
            rows = np.repeat(X[i : i + 1], len(values), axis=0)
            rows[:, j] = values
            scores[i, j] = np.mean(predict_class(rows) == desired)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="people explained")
    parser.add_argument("--n-values", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each; the best is reported")
    args = parser.parse_args()

    import torch
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from torch import nn

    import whatmatters as wm
    from whatmatters.explain.recourse import Actionability, candidate_grid

    torch.set_num_threads(1)
    X, y = load_breast_cancer(return_X_y=True)
    X_t = torch.from_numpy(X)
    grids = [candidate_grid(Actionability(), X_t[:, j], args.n_values).numpy() for j in range(X.shape[1])]
    people = X[: args.n]

    sk_model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X, y)
    torch.manual_seed(0)
    mean, std = X.mean(0), X.std(0)
    mlp = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 2))
    optim = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    xs, ys = torch.tensor((X - mean) / std, dtype=torch.float32), torch.from_numpy(y)
    for _ in range(200):
        optim.zero_grad()
        nn.functional.cross_entropy(mlp(xs), ys).backward()
        optim.step()
    mlp.eval()

    class Standardize(nn.Module):  # the torch model scores raw features, like the pipeline
        def forward(self, x):
            return (x - torch.as_tensor(mean, dtype=x.dtype)) / torch.as_tensor(std, dtype=x.dtype)

    scaled = nn.Sequential(Standardize(), mlp).eval()

    def torch_class(rows):
        with torch.no_grad():
            return scaled(torch.as_tensor(rows, dtype=torch.float32)).argmax(1).numpy()

    cases = {"sklearn_logistic": (sk_model, sk_model.predict), "torch_mlp": (scaled, torch_class)}
    rows = []
    for name, (model, predict_class) in cases.items():

        def ours(model=model):
            return wm.explain(model, people, method="responsiveness", background=X, n_values=args.n_values, desired=1)

        def ref(predict_class=predict_class):
            return loop_reference(predict_class, people, grids, 1)

        t_ours, imp = best_of(ours, args.runs)
        t_ref, expected = best_of(ref, args.runs)
        rows.append(
            {
                "model": name,
                "people": args.n,
                "features": X.shape[1],
                "candidates": int(sum(len(g) for g in grids)),
                "model_rows": int(imp.extra["n_feasible"][~imp.extra["at_target"]].sum()),
                "loop_s": t_ref,
                "whatmatters_s": t_ours,
                "speedup": t_ref / t_ours,
                "max_abs_diff": float(np.abs(imp.numpy() - expected).max()),
                "with_recourse": int(imp.extra["has_recourse"].sum()),
                "at_target": int(imp.extra["at_target"].sum()),
            }
        )

    print(f"{'model':<18} {'people':>6} {'rows':>7} {'loop':>9} {'whatmatters':>11} {'x':>6} {'max diff':>9}")
    for r in rows:
        print(
            f"{r['model']:<18} {r['people']:>6} {r['model_rows']:>7} {r['loop_s']:>8.3f}s "
            f"{r['whatmatters_s']:>10.3f}s {r['speedup']:>6.1f} {r['max_abs_diff']:>9.2g}"
        )
    print(json.dumps({"benchmark": "responsiveness", "n_values": args.n_values, "cases": rows}))


if __name__ == "__main__":
    main()
