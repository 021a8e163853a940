"""LRP speed: whatmatters vs zennit side by side, and as a multiple of one forward+backward pass.

zennit 0.5.1 needs ``pip install --no-deps zennit`` (torchvision is replaced by a stand-in, see
make_lrp_goldens.py); ``run_all.py`` runs the same comparison for the README::

    PYTHONPATH=. python benchmarks/bench_lrp.py [--batch 16] [--repeats 5]

Model: the project's ShapesCNN (5 conv + BatchNorm + ReLU blocks, width 16) on 3 x 32 x 32 images.
Both libraries merge BatchNorm (canonize) on every call. Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from whatmatters.explain._lrp import lrp
from whatmatters.vision.nets import ShapesCNN

HERE = Path(__file__).resolve().parent


def _paired(a, b, repeats: int) -> tuple[float, float, float]:
    """Median times of ``a`` and ``b`` run alternately (robust to load changing on a shared machine),
    and the median of the per-pair ratios a/b."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    ratio = statistics.median(x / y for x, y in zip(ta, tb, strict=True))
    return statistics.median(ta), statistics.median(tb), ratio


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("make_lrp_goldens", HERE / "make_lrp_goldens.py")
    goldens = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(goldens)
    if not goldens.zennit_available():
        raise SystemExit("zennit is not installed: pip install --no-deps zennit==0.5.1")

    torch.manual_seed(0)
    model = ShapesCNN(n_classes=5, width=16).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(args.batch, 3, 32, 32).clamp(goldens.LOW, goldens.HIGH)
    targets = torch.randint(0, 5, (args.batch,))

    def fwd_bwd() -> None:
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xx).gather(1, targets[:, None]).sum(), xx)

    base = _median_time(fwd_bwd, args.repeats)
    rows = []
    for name in ["epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"]:
        ours_t, ref_t, ratio = _paired(
            lambda name=name: lrp(model, x, targets, name, low=goldens.LOW, high=goldens.HIGH),
            lambda name=name: goldens.zennit_relevance(model, x, targets, name),
            args.repeats,
        )
        ours, _ = lrp(model, x, targets, name, low=goldens.LOW, high=goldens.HIGH)
        ref = goldens.zennit_relevance(model, x, targets, name)
        corr = torch.corrcoef(torch.stack([ours.flatten(), ref.flatten()]))[0, 1].item()
        rows.append(
            {
                "composite": name,
                "whatmatters_s": ours_t,
                "zennit_s": ref_t,
                "ratio_vs_zennit": ratio,
                "x_forward_backward": ours_t / base,
                "zennit_x_forward_backward": ref_t / base,
                "correlation": corr,
            }
        )
    result = {"batch": args.batch, "threads": torch.get_num_threads(), "forward_backward_s": base, "rows": rows}
    print(json.dumps(result, indent=2))
    print(f"\nShapesCNN, batch {args.batch}, forward+backward {base * 1e3:.1f} ms, torch {torch.__version__}")
    print(f"{'composite':<22}{'ours ms':>9}{'zennit ms':>11}{'ratio':>7}{'x f+b':>7}{'zennit x f+b':>14}{'corr':>10}")
    for r in rows:
        print(
            f"{r['composite']:<22}{r['whatmatters_s'] * 1e3:>9.1f}{r['zennit_s'] * 1e3:>11.1f}"
            f"{r['ratio_vs_zennit']:>7.2f}{r['x_forward_backward']:>7.2f}{r['zennit_x_forward_backward']:>14.2f}"
            f"{r['correlation']:>10.6f}"
        )


if __name__ == "__main__":
    main()
