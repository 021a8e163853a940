"""Concept bottlenecks vs the black-box head on the same frozen features (the shapes set, known concepts).

Features: the cached shapes CNN's pooled layer (``load_or_train("cnn")``) on fresh shapes images; concepts: the
four shapes, ``large`` and ``red`` (:mod:`whatmatters.vision.shape_concepts`); class: the shape. Per head: test
accuracy, concept accuracy (shape concepts / size and colour; CBMs only: a PCBM's scores are projections),
intervention success (circles whose prediction becomes "square" when their circle concept is set to 0 and their
square concept to 1), the share of predictions that change when the irrelevant ``red`` concept is flipped, and
the fit time. Prints a table and one JSON line.

    python benchmarks/bench_cbm.py [--n 2000] [--train 0.6]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="shapes images (train + test)")
    parser.add_argument("--train", type=float, default=0.6, help="share used to fit the heads")
    args = parser.parse_args()

    import torch

    from whatmatters.explain.bottleneck import ConceptBottleneck, embeddings, fit_cbm, fit_linear_head, fit_pcbm
    from whatmatters.vision.nets import load_or_train
    from whatmatters.vision.shape_concepts import CONCEPTS, shape_concepts
    from whatmatters.vision.shapes import make_shapes

    torch.set_num_threads(1)
    net, _ = load_or_train("cnn")
    x, y, masks = make_shapes(args.n, 32, seed=11)
    c, f = shape_concepts(x, y, masks), embeddings(net, x, "pool")
    cut = int(args.train * args.n)
    tr, te = slice(0, cut), slice(cut, None)
    fits = {
        "black box (linear)": lambda: fit_linear_head(f[tr], y[tr]),
        "CBM joint": lambda: fit_cbm(f[tr], c[tr], y[tr], concept_names=CONCEPTS, mode="joint"),
        "CBM sequential": lambda: fit_cbm(f[tr], c[tr], y[tr], concept_names=CONCEPTS, mode="sequential"),
        "CBM independent": lambda: fit_cbm(f[tr], c[tr], y[tr], concept_names=CONCEPTS, mode="independent"),
        "PCBM": lambda: fit_pcbm(f[tr], y[tr], concepts=c[tr], concept_names=CONCEPTS),
        "PCBM-h": lambda: fit_pcbm(f[tr], y[tr], concepts=c[tr], concept_names=CONCEPTS, residual=True),
    }
    circles, circle_concepts = f[te][y[te] == 0], c[te][y[te] == 0]
    rows = []
    for name, fit in fits.items():
        start = time.perf_counter()
        model = fit()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            row = {"head": name, "accuracy": float((model(f[te]).argmax(1) == y[te]).float().mean()), "fit_s": seconds}
            if isinstance(model, ConceptBottleneck):
                hit = ((model.concept_scores(f[te]) > 0.5).float() == c[te]).float().mean(0)
                row["concept_acc_shape"], row["concept_acc_size_colour"] = float(hit[:4].mean()), float(hit[4:].mean())
            if hasattr(model, "intervene"):
                moved = model.intervene(circles, {"circle": 0, "square": 1}).argmax(1)
                row["intervention_to_square"] = float((moved == 1).float().mean())
                recoloured = model.intervene(circles, {"red": 1 - circle_concepts[:, 5]}).argmax(1)
                row["changed_by_red_flip"] = float((recoloured != model(circles).argmax(1)).float().mean())
        rows.append(row)
    cols = ["accuracy", "concept_acc_shape", "concept_acc_size_colour", "intervention_to_square",
            "changed_by_red_flip", "fit_s"]  # fmt: skip
    print(f"{'head':20s}" + "".join(f"{col[:22]:>24s}" for col in cols))
    for row in rows:
        print(f"{row['head']:20s}" + "".join(f"{row[col]:24.3f}" if col in row else f"{'-':>24s}" for col in cols))
    print(json.dumps({"n_train": cut, "n_test": args.n - cut, "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
