"""Adaptive token budgets (ATP-style) vs a fixed budget at the same mean, in the project's ViTs.

``prune_tokens(model, method, keep=1.0, threshold=t, min_keep=0.1)`` keeps, per image, the fewest patch
tokens whose share of the score mass reaches ``t``; a fixed ``keep`` equal to the adaptive run's mean budget is
the baseline. Images go one at a time (batch 1), so each image really runs on its own budget; accuracy on
``--n-test`` test images and images/s from CPU time (one torch thread), unpruned model timed first and last.

    python benchmarks/bench_token_pruning_adaptive.py [--n-test 500]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_token_pruning import test_data

from whatmatters.compress import prune_tokens
from whatmatters.compress.vit_tokens import vit_layout
from whatmatters.vision.nets import load_or_train

THRESHOLDS = (0.5, 0.7, 0.9)


def one_at_a_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, report=None) -> dict[str, float]:
    """Accuracy, images/s and the mean patch tokens kept, feeding the images one by one."""
    correct, kept = 0, []
    start = time.process_time()
    with torch.no_grad():
        for i in range(len(x)):
            correct += int(model(x[i : i + 1]).argmax(1).item() == int(y[i]))
            if report is not None and report.last_forward:
                block = next(c for c in report.last_forward if c[0] in report.layers)
                kept.append(block[2] - report.n_special)
    seconds = time.process_time() - start
    return {"accuracy": correct / len(x), "images_per_s": len(x) / seconds, "mean_kept": sum(kept) / max(len(kept), 1)}


def run_model(arch: str, n_test: int) -> list[dict]:
    model, _ = load_or_train(arch)
    x, y = test_data(arch, n_test)
    method = "cls_attention" if vit_layout(model).n_special else "accumulated_attention"
    first = one_at_a_time(model, x, y)
    rows = []
    for t in THRESHOLDS:
        adaptive, rep = prune_tokens(model, method, keep=1.0, threshold=t, min_keep=0.1)
        a = one_at_a_time(adaptive, x, y, rep)
        patches = rep.last_forward[0][1] - rep.n_special
        fixed, frep = prune_tokens(model, method, keep=a["mean_kept"] / patches)
        f = one_at_a_time(fixed, x, y, frep)
        rows.append({"threshold": t, "method": method, "adaptive": a, "fixed": f, "patches": patches})
    last = one_at_a_time(model, x, y)
    speed = (first["images_per_s"] + last["images_per_s"]) / 2
    for r in rows:
        for k in ("adaptive", "fixed"):
            r[k]["speedup"] = r[k]["images_per_s"] / speed
    return [{"model": arch, "unpruned": first, "unpruned_last": last, "rows": rows}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--models", default="fashion_vit,vit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [r for arch in args.models.split(",") for r in run_model(arch, args.n_test)]
    header = "model (score) | threshold | mean patches kept | adaptive acc | fixed acc (same mean) | adaptive | fixed"
    print(f"| {header} |")
    print("|---|---|---|---|---|---|---|")
    for res in results:
        base = res["unpruned"]["accuracy"]
        for r in res["rows"]:
            a, f = r["adaptive"], r["fixed"]
            print(
                f"| {res['model']} ({r['method']}; unpruned {base:.3f}) | {r['threshold']} | "
                f"{a['mean_kept']:.2f} / {r['patches']} (fixed {f['mean_kept']:.0f}) | {a['accuracy']:.3f} | "
                f"{f['accuracy']:.3f} | {a['speedup']:.2f}x | {f['speedup']:.2f}x |"
            )
    print(json.dumps({"torch": torch.__version__, "threads": 1, "n_test": args.n_test, "results": results}))


if __name__ == "__main__":
    main()
