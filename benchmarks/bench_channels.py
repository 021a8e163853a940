"""Channel removal on the shapes CNN: test accuracy, parameters and CPU latency per channel score.

``load_or_train("cnn")`` (ShapesCNN, five conv + BatchNorm + ReLU blocks) is pruned with ``prune_channels`` at
25 % and 50 % of the channels of every prunable conv (uniform allocation; the classifier is the model output and
stays) using random scores (mean of 3 seeds), ``channel_l1``, ``bn_scale`` and ``channel_taylor`` (calibration:
256 training images with their labels). No fine-tuning. Each pruned structure is evaluated plain, with mean
compensation (``compensate``), with BatchNorm recalibration (``recalibrate_bn``) and with both, calibrated on
the same 256 images. Accuracy on ``make_shapes(1000, seed=123)``;
latency: median of repeated forward passes of a batch of 64 images, 1 thread. Ratios are to the dense model.

Run: ``python benchmarks/bench_channels.py [--out FILE] [--repeats N] [--allocation global]
[--calibration none compensate recalibrate_bn both]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from whatmatters.compress import score
from whatmatters.compress.channels import prune_channels
from whatmatters.compress.remove import n_parameters
from whatmatters.core.importance import Importance
from whatmatters.vision.nets import load_or_train
from whatmatters.vision.shapes import make_shapes


def log(msg: str) -> None:
    print(f"[bench_channels] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.cat([model(c).argmax(1) for c in x.split(250)]).eq(y).float().mean())


@torch.no_grad()
def latency(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        model(x)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_like(imp: Importance, seed: int) -> Importance:
    g = torch.Generator().manual_seed(seed)
    return Importance(values=torch.rand(imp.values.shape, generator=g), unit="channel", names=imp.names,
                      per_sample=False, method="random", extra=dict(imp.extra))  # fmt: skip


VARIANTS = {"none": (False, False), "compensate": (True, False), "recalibrate_bn": (False, True), "both": (True, True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30, help="timed forward passes per model")
    ap.add_argument("--allocation", default="uniform", choices=["uniform", "global"])
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--calibration", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="which calibration variants to run")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, _ = load_or_train("cnn")
    model.eval()
    tx, ty, _ = make_shapes(1000, 32, seed=123)
    cx, cy, _ = make_shapes(6000, 32, seed=0)
    cx, cy = cx[:256], cy[:256]  # the first 256 training images
    batch = tx[:64]
    example = tx[:2]

    dense_acc = accuracy(model, tx, ty)
    dense_params = n_parameters(model)
    dense_lat = latency(model, batch, args.repeats)
    log(f"dense: accuracy {dense_acc:.3f}, {dense_params} parameters, {dense_lat * 1e3:.2f} ms")

    scores: dict[str, Importance] = {}
    seconds: dict[str, float] = {}
    for method in ("channel_l1", "bn_scale", "channel_taylor"):
        t0 = time.perf_counter()
        scores[method] = score(model, method, data=[(cx, cy)] if method == "channel_taylor" else None)
        seconds[method] = time.perf_counter() - t0

    rows = []
    for amount in (0.25, 0.5):
        for method in ("random", "channel_l1", "bn_scale", "channel_taylor"):
            imps = [random_like(scores["channel_l1"], s) for s in range(3)] if method == "random" else [scores[method]]
            for variant in args.calibration:
                compensate, recalibrate = VARIANTS[variant]
                accs, params, lats, skipped = [], [], [], {}
                for imp in imps:
                    pruned, report = prune_channels(
                        model, imp, amount, allocation=args.allocation, example_input=example,
                        calibration=cx if variant != "none" else None, compensate=compensate,
                        recalibrate_bn=recalibrate,
                    )  # fmt: skip
                    accs.append(accuracy(pruned, tx, ty))
                    params.append(report.n_parameters_after)
                    lats.append(latency(pruned, batch, args.repeats))
                    skipped = report.skipped
                row = {
                    "method": method,
                    "removed": amount,
                    "calibration": variant,
                    "accuracy": statistics.mean(accs),
                    "accuracy_per_seed": accs if method == "random" else None,
                    "parameters": int(statistics.mean(params)),
                    "latency_ms": statistics.median(lats) * 1e3,
                    "accuracy_ratio": statistics.mean(accs) / dense_acc,
                    "parameter_ratio": statistics.mean(params) / dense_params,
                    "latency_ratio": statistics.median(lats) / dense_lat,
                    "score_seconds": seconds.get(method),
                    "skipped": skipped,
                }
                rows.append(row)
                log(f"{method} {amount:.0%} {variant}: accuracy {row['accuracy']:.3f}")

    result = {
        "model": "ShapesCNN load_or_train('cnn')",
        "allocation": args.allocation,
        "test_images": len(tx),
        "calibration_images": len(cx),
        "calibration_variants": args.calibration,
        "latency": f"median of {args.repeats} passes, batch {len(batch)}, 1 thread",
        "dense": {"accuracy": dense_acc, "parameters": dense_params, "latency_ms": dense_lat * 1e3},
        "rows": rows,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(f"\ndense: accuracy {dense_acc:.3f}, {dense_params:,} parameters, {dense_lat * 1e3:.2f} ms / batch of 64")
    print(f"{'method':<16}{'removed':>8}{'calibration':>16}{'accuracy':>10}{'acc ratio':>11}{'params':>9}"
          f"{'param ratio':>13}{'latency ms':>12}{'lat ratio':>11}")  # fmt: skip
    for r in rows:
        print(
            f"{r['method']:<16}{r['removed']:>8.0%}{r['calibration']:>16}{r['accuracy']:>10.3f}{r['accuracy_ratio']:>11.3f}{r['parameters']:>9,}"
            f"{r['parameter_ratio']:>13.3f}{r['latency_ms']:>12.2f}{r['latency_ratio']:>11.3f}"
        )


if __name__ == "__main__":
    main()
