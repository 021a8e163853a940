"""Gradient attributions: whatmatters vs captum, side by side, on an MLP (tabular) and a small CNN (images).

For integrated gradients the ratio whatmatters / captum is printed twice: both with their defaults
(captum: every (sample x step) row in one call; whatmatters: about ``ROW_ELEMENTS`` input values
per call) and both with the same ``internal_batch_size``. Every method's time is also given as a
multiple of one forward+backward pass over the same batch. Prints a table and one JSON line.

    python benchmarks/bench_gradient.py [--runs 5] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from torch import nn


def best_of(*fns, runs: int, min_seconds: float = 1.0) -> list[float]:
    """Fastest time of each function, calls interleaved so that load changes hit all alike.

    At least ``runs`` rounds; more (up to 200) until ``min_seconds`` have passed.
    """
    for fn in fns:
        fn()  # warm up
    best = [float("inf")] * len(fns)
    rounds, spent = 0, 0.0
    while rounds < runs or (spent < min_seconds and rounds < 200):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            best[i] = min(best[i], elapsed)
            spent += elapsed
        rounds += 1
    return best


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()
    return {"mlp (n=256, d=30)": (mlp, torch.randn(256, 30)), "cnn (n=32, 3x16x16)": (cnn, torch.rand(32, 3, 16, 16))}


def runners(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int, ibs: int) -> dict:
    """``{label: (whatmatters call, captum call)}`` for one model and batch."""
    from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency

    import whatmatters as wm

    def ours(method: str, **params):
        return lambda: wm.explain(model, x, method, target=target, **params)

    return {
        "ig defaults": (
            ours("integrated_gradients", steps=steps),
            lambda: IntegratedGradients(model).attribute(x, target=target, n_steps=steps),
        ),
        f"ig internal_batch_size={ibs}": (
            ours("integrated_gradients", steps=steps, internal_batch_size=ibs),
            lambda: IntegratedGradients(model).attribute(
                x, target=target, n_steps=steps, internal_batch_size=max(ibs, len(x))
            ),
        ),
        "saliency": (ours("saliency"), lambda: Saliency(model).attribute(x, target=target)),
        "gradient_x_input": (ours("gradient_x_input"), lambda: InputXGradient(model).attribute(x, target=target)),
        "smoothgrad (n_samples=50)": (
            ours("smoothgrad", n_samples=50),
            lambda: NoiseTunnel(Saliency(model)).attribute(
                x, target=target, nt_type="smoothgrad", nt_samples=50, stdevs=0.15
            ),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each; the best is reported")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--internal-batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    results = []
    for name, (model, x) in models().items():
        target = model(x).argmax(1)

        def fwd_bwd(model=model, x=x, target=target):
            leaf = x.clone().requires_grad_(True)
            torch.autograd.grad(model(leaf).gather(1, target[:, None]).sum(), leaf)

        times = {}
        t_pass = float("inf")  # the fastest pass seen in any round
        for label, (ours, theirs) in runners(model, x, target, args.steps, args.internal_batch_size).items():
            t_ours, t_theirs, t_fb = best_of(ours, theirs, fwd_bwd, runs=args.runs)
            times[label], t_pass = (t_ours, t_theirs), min(t_pass, t_fb)
        row = {"model": name, "forward_backward_s": t_pass, "methods": {}}
        for label, (t_ours, t_theirs) in times.items():
            row["methods"][label] = {
                "whatmatters_s": t_ours,
                "captum_s": t_theirs,
                "ratio": t_ours / t_theirs,
                "whatmatters_x_pass": t_ours / t_pass,
                "captum_x_pass": t_theirs / t_pass,
            }
        results.append(row)

    print(f"steps={args.steps}, torch threads={torch.get_num_threads()}; goal: integrated gradients ratio <= 1.0")
    header = f"{'model':<22}{'method':<32}{'wm s':>9}{'captum s':>10}{'ratio':>7}{'wm x pass':>11}{'captum x pass':>15}"
    print(header)
    for row in results:
        for label, r in row["methods"].items():
            print(
                f"{row['model']:<22}{label:<32}{r['whatmatters_s']:>9.4f}{r['captum_s']:>10.4f}{r['ratio']:>7.2f}"
                f"{r['whatmatters_x_pass']:>11.1f}{r['captum_x_pass']:>15.1f}"
            )
    print(
        json.dumps(
            {"benchmark": "gradient", "steps": args.steps, "threads": torch.get_num_threads(), "results": results}
        )
    )


if __name__ == "__main__":
    main()
