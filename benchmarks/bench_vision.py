"""Image explanations on the synthetic shapes set: methods x metrics x seconds, with an HTML report of overlays.

Every registered image method (``whatmatters.methods(unit="pixel")``) explains ``--images`` test images of
:func:`whatmatters.vision.shapes.make_shapes` (object masks known) with the cached ShapesCNN
(:func:`whatmatters.vision.nets.load_or_train`; trained once, a couple of minutes, if not cached), at the
true class. Every registered pixel metric (``whatmatters.evaluate.metrics(unit="pixel")``: deletion and
insertion AUC, max-sensitivity, randomization, ROAD and gradient-noise stability once registered, ...) runs
through :func:`whatmatters.benchmark`; the ground-truth metrics (relevance mass, pointing game,
precision@k) are computed against the object masks (repeated over the colour channels for methods that
score ``(C, H, W)``). A ``random`` row scores pixels at random.

Cost: ``seconds`` is the benchmark's single ``explain`` call; ``median_s`` the median wall time of
``--repeats`` further calls, each followed by three forward + backward passes of the model on the same
batch; ``x_fwd_bwd`` is the method's median process CPU time over the median CPU time of those passes
(measured under the same load, so steadier than wall-clock ratios on a shared machine; the wall-clock
ratios are in the JSON). ``--pair a,b`` (default ``cf_cam,grad_cam``) compares two methods sample by
sample on every metric (mean difference, standard error, share of samples where ``a`` wins); ``--methods``
runs only the named methods (the rows of the others do not depend on them). Run::

    PYTHONPATH=. python benchmarks/bench_vision.py [--images 64 --repeats 3 --out benchmarks/out/vision_report.html]
    PYTHONPATH=. python benchmarks/bench_vision.py --vit   # also the ShapesViT (trained once if not cached)

Prints a table, then one JSON object (``--json PATH`` writes it, curves included, to a file). Uses one
thread (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import whatmatters as wm
from whatmatters.evaluate import benchmark
from whatmatters.evaluate.metrics import get_metric, metrics
from whatmatters.report.html import write_report
from whatmatters.vision.nets import load_or_train
from whatmatters.vision.shapes import make_shapes


def clock(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def forward_backward(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """One forward + backward pass (to the input) of the target outputs on the batch."""

    def step() -> None:
        inp = x.detach().clone().requires_grad_(True)
        model(inp).gather(1, target[:, None]).sum().backward()
        model.zero_grad(set_to_none=True)

    return step


def method_costs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, label: str, args: Any) -> dict[str, float]:
    """Median wall and CPU time of ``repeats`` explain calls, each followed by 3 forward+backward passes
    (the baseline, measured under the same machine load); ``x_fwd_bwd`` is the ratio of CPU medians."""
    step = forward_backward(model, x, y)
    ours, base = [], []
    for _ in range(args.repeats):
        ours.append(clock(lambda: wm.explain(model, x, label, y, seed=args.seed)))
        base.extend(clock(step) for _ in range(3))
    wall, cpu = (statistics.median(v) for v in zip(*ours))
    base_wall, base_cpu = (statistics.median(v) for v in zip(*base))
    return {"median_s": wall, "x_fwd_bwd": cpu / base_cpu, "x_fwd_bwd_wall": wall / base_wall}


def paired(model: Any, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, result: Any, pair: list[str], seed: int):
    """Per-sample comparison of two methods on every metric of the table: mean difference (a - b), its
    standard error over samples, and the share of samples where ``a`` scores better."""
    a, b = (result.importances[p] for p in pair)
    out = {}
    for name, (_, higher) in result.metric_info.items():
        if name in ("seconds", "median_s", "x_fwd_bwd"):
            continue
        entry = get_metric(name)
        kwargs = {k: v for k, v in {"target": y, "seed": seed}.items() if k in entry.accepted}
        try:
            sa, sb = (
                entry(model, x, imp, **kwargs, **({"relevant": masks} if entry.needs else {}))
                .scores.double()
                .reshape(-1)
                for imp in (a, b)
            )
        except Exception as err:
            out[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        ok = ~(sa.isnan() | sb.isnan())
        d = (sa - sb)[ok]
        better = (d > 0) if higher else (d < 0)
        out[name] = {
            pair[0]: float(sa[ok].mean()),
            pair[1]: float(sb[ok].mean()),
            "difference": float(d.mean()),
            "standard_error": float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("nan"),
            f"share_{pair[0]}_better": float(better.double().mean()),
            "share_tied": float((d == 0).double().mean()),
            "higher_is_better": higher,
        }
    return out


def run_model(arch: str, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    model, info = load_or_train(arch, verbose=True)
    x, y, masks = make_shapes(args.images, seed=args.seed)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).double().mean())
    methods = wm.methods(unit="pixel")
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods))
        if unknown:
            raise SystemExit(f"not registered pixel methods: {unknown}; choose from {methods}")
        methods = [m for m in methods if m in args.methods]
    pixel_metrics = metrics(unit="pixel")  # the ground-truth ones use relevant=masks
    if args.skip_metric:
        pixel_metrics = [m for m in pixel_metrics if m not in args.skip_metric]
    start = time.perf_counter()
    step = forward_backward(model, x, y)
    step()  # warm-up
    base = [clock(step) for _ in range(20)]
    result = benchmark(
        model, x, methods, pixel_metrics, target=y, relevant=masks, seed=args.seed, progress=sys.stderr.isatty()
    )
    costs = {
        label: method_costs(model, x, y, label, args)
        for label in result.table.index
        if label != result.reference and label in result.importances
    }
    table = result.table
    at = table.columns.get_loc("seconds") + 1
    for i, column in enumerate(["median_s", "x_fwd_bwd"]):
        table.insert(at + i, column, [costs.get(label, {}).get(column, float("nan")) for label in table.index])
        result.metric_info[column] = ("cost", False)
    pair = [p.strip() for p in args.pair.split(",")] if args.pair else []
    pair = pair if all(p in result.importances for p in pair) else []  # a method of the pair was not run
    comparison = paired(model, x, y, masks, result, pair, args.seed) if len(pair) == 2 else {}
    meta = {
        "model": arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_accuracy_cached": info.get("test_accuracy"),
        "accuracy_on_these_images": accuracy,
        "images": args.images,
        "size": int(x.shape[-1]),
        "threads": torch.get_num_threads(),
        "forward_backward_s": statistics.median(w for w, _ in base),
        "forward_backward_cpu_s": statistics.median(c for _, c in base),
        "x_fwd_bwd_wall": {label: c["x_fwd_bwd_wall"] for label, c in costs.items()},
        "paired": comparison,
        "repeats": args.repeats,
        "metrics": pixel_metrics,
        "total_s": time.perf_counter() - start,
    }
    title = f"whatmatters: image explanations of the shapes {arch.upper()} ({args.images} images)"
    out = Path(args.out) if arch == "cnn" else Path(args.out).with_name(Path(args.out).stem + f"_{arch}.html")
    write_report(result, out, title=title, data=x, model=model)
    meta["report"] = str(out)
    return result, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed explain calls per method (median)")
    parser.add_argument("--seed", type=int, default=123, help="seed of the test images (training used seed 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vit", action="store_true", help="also benchmark the ShapesViT")
    parser.add_argument("--pair", default="cf_cam,grad_cam", help="two methods compared sample by sample")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="run only these methods (default: every pixel method)"
    )
    parser.add_argument("--skip-metric", action="append", default=[], help="leave out a metric (repeatable)")
    parser.add_argument("--out", default="benchmarks/out/vision_report.html", help="the HTML report (CNN)")
    parser.add_argument("--json", default=None, help="also write the full JSON (with curves) to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {}
    for arch in ["cnn", "vit"] if args.vit else ["cnn"]:
        result, meta = run_model(arch, args)
        print(
            f"\nShapes{arch.upper()} ({meta['parameters']:,} parameters, "
            f"accuracy {meta['accuracy_on_these_images']:.3f} on these {meta['images']} images), "
            f"{meta['threads']} thread(s); forward+backward "
            f"{meta['forward_backward_s'] * 1000:.1f} ms; report: {meta['report']}"
        )
        print(result)
        if meta["paired"]:
            a, b = args.pair.split(",")
            print(f"\n{a} - {b}, sample by sample (mean difference ± standard error; share of samples {a} is better)")
            for name, c in meta["paired"].items():
                if "error" in c:
                    print(f"  {name}: {c['error']}")
                    continue
                arrow = "↑" if c["higher_is_better"] else "↓"
                print(
                    f"  {name} {arrow}: {c[a]:.4g} vs {c[b]:.4g}, difference {c['difference']:+.4g} ± "
                    f"{c['standard_error']:.2g}; {a} better on {c[f'share_{a}_better']:.0%}, tied on "
                    f"{c['share_tied']:.0%}"
                )
        runs[arch] = {"meta": meta, **result.to_dict()}
    summary = {
        arch: {"meta": r["meta"], "table": r["table"], "metric_info": r["metric_info"], "reference": r["reference"]}
        for arch, r in runs.items()
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
