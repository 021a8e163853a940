"""Example scores on injected label noise: how many of the flipped labels each score ranks first.

scikit-learn's digits (1,797 images, 8x8), ``--noise`` of the labels flipped to another class; a small MLP
trained with ``curate.train_models`` (``--epochs`` x ``--seeds``). Precision = share of the top-m examples
(m = number of flipped labels) that are flipped; random ranking gives ``--noise``. Influence with test data
ranks the most negative (harmful) examples first. Also times GraNd's vectorized per-sample gradients
(``torch.func`` vmap) against a Python loop of one backward pass per example, on the same model and rows.

    python benchmarks/bench_curate_scores.py [--noise 0.1] [--epochs 6] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--loop-rows", type=int, default=400, help="rows timed for the per-example loop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits

    from whatmatters import curate

    data = load_digits()
    x, clean = torch.tensor(data.data / 16, dtype=torch.float32), torch.tensor(data.target)
    gen = torch.Generator().manual_seed(0)
    flip = torch.randperm(len(x), generator=gen)[: round(args.noise * len(x))]
    y = clean.clone()
    y[flip] = (clean[flip] + torch.randint(1, 10, (len(flip),), generator=gen)) % 10
    noisy = torch.zeros(len(x), dtype=torch.bool)
    noisy[flip] = True

    def mlp():
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    run = curate.train_models(mlp, x, y, epochs=args.epochs, seeds=args.seeds)
    test = (~noisy).nonzero().squeeze(1)[:300]  # correctly labelled examples whose loss influence explains
    plans = {
        "loss (final models)": ("loss", run.models(), {}),
        "EL2N (epoch 2, averaged over seeds)": ("el2n", run.models(epoch=2), {}),
        "GraNd (epoch 2, averaged over seeds)": ("grand", run.models(epoch=2), {}),
        "forgetting events": ("forgetting", run, {}),
        "TracIn self-influence (all checkpoints)": ("tracin", run, {}),
        "TRAK-like self-influence (final models)": ("trak", run.models(), {}),
        "TracIn on clean test data (most harmful)": ("tracin", run, {"test": True}),
        "TRAK-like on clean test data (most harmful)": ("trak", run.models(), {"test": True}),
    }
    rows = []
    for label, (method, model, opts) in plans.items():
        extra = {"test_data": x[test], "test_y": clean[test]} if opts.get("test") else {}
        start = time.perf_counter()
        imp = curate.score(model, data=x, y=y, method=method, **extra)
        seconds = time.perf_counter() - start
        top = imp.values.argsort(descending=not extra)[: len(flip)]
        rows.append({"score": label, "precision": float(noisy[top].float().mean()), "seconds": seconds})

    model = run.models()[0]
    rows_timed = x[: args.loop_rows], y[: args.loop_rows]
    start = time.perf_counter()
    ours = curate.score(model, data=rows_timed[0], y=rows_timed[1], method="grand").values
    vmap_s = time.perf_counter() - start
    start = time.perf_counter()
    loop = []
    for i in range(args.loop_rows):
        model.zero_grad()
        nn.functional.cross_entropy(model(rows_timed[0][i : i + 1]), rows_timed[1][i : i + 1]).backward()
        loop.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    loop_s = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    diff = float((ours - torch.stack(loop).double()).abs().max())

    print(f"digits, {len(flip)} of {len(x)} labels flipped (random precision {args.noise:.2f})")
    print("| score | precision of the top-m | seconds |\n|---|---|---|")
    for r in rows:
        print(f"| {r['score']} | {r['precision']:.3f} | {r['seconds']:.2f} |")
    print(f"GraNd on {args.loop_rows} rows: vmap {vmap_s:.3f} s, per-example loop {loop_s:.3f} s, "
          f"ratio {vmap_s / loop_s:.2f}x, max difference {diff:.1e}")  # fmt: skip
    out = {"benchmark": "curate_scores", "noise": args.noise, "rows": rows, "grand_vmap_s": vmap_s,
           "grand_loop_s": loop_s, "grand_ratio": vmap_s / loop_s, "grand_max_diff": diff}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
