"""max_sensitivity: whatmatters vs Quantus' MaxSensitivity, side by side in one run, same noise.

Quantus (and the opencv it imports) stay out of the main environment; run from a virtual
environment with both libraries::

    python -m venv /tmp/venv-quantus
    /tmp/venv-quantus/bin/pip install torch quantus opencv-python-headless pandas scipy scikit-learn rich pyarrow typer
    /tmp/venv-quantus/bin/pip install -e . --no-deps
    /tmp/venv-quantus/bin/python benchmarks/bench_robustness.py [--n 16 --size 32 --samples 10 --repeats 3]

Quantus draws its own noise; here it is handed ours (a perturbation function replaying the seeded
draws of whatmatters, one perturbation per Quantus step), with ``normalise=False, abs=False`` and
its default Frobenius norms, so the scores must agree to float32 precision. Prints one JSON object,
then a table; ratios above 1 mean whatmatters is faster. Times are the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

import whatmatters as wm
from whatmatters.evaluate.robustness import max_sensitivity


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(256, 10),
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--radius", type=float, default=0.02)
    parser.add_argument("--method", default="saliency")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import quantus

    model, n, k, r = _cnn(), args.n, args.samples, args.radius
    x = torch.rand(n, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # data range exactly 1: our relative radius is Quantus' absolute one
    imp = wm.explain(model, x, method=args.method)
    targets = torch.as_tensor(imp.target).expand(n).clone()

    def ours() -> torch.Tensor:
        return max_sensitivity(model, x, imp, n_samples=k, radius=r, seed=0).scores

    draws = torch.rand((n * k, x[0].numel()), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = ((draws * 2 - 1) * r).reshape(n, k, -1).float().numpy()
    step = {"k": 0}

    def replay(arr: np.ndarray, indices=None, indexed_axes=None, **kwargs) -> np.ndarray:
        out = arr + noise[:, step["k"] % k].reshape(arr.shape)
        step["k"] += 1
        return out

    def explain_func(model, inputs, targets, **kwargs) -> np.ndarray:
        return wm.explain(model, torch.as_tensor(inputs), method=args.method, target=torch.as_tensor(targets)).numpy()

    a = imp.numpy()
    a = a[:, None] if a.ndim == 3 else a

    def theirs() -> np.ndarray:
        step["k"] = 0
        metric = quantus.MaxSensitivity(
            nr_samples=k, lower_bound=r, perturb_func=replay, normalise=False, abs=False, disable_warnings=True
        )
        out = metric(
            model=model,
            x_batch=x.numpy(),
            y_batch=targets.numpy(),
            a_batch=a,
            device="cpu",
            explain_func=explain_func,
            softmax=False,
            batch_size=n,
        )
        return np.asarray(out)

    ours(), theirs()  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        s_ours = ours()
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        s_theirs = theirs()
        t_theirs.append(time.perf_counter() - start)
    result = {
        "metric": "max_sensitivity",
        "method": args.method,
        "shape": list(x.shape),
        "n_samples": k,
        "radius": r,
        "whatmatters_s": min(t_ours),
        "quantus_s": min(t_theirs),
        "speedup": min(t_theirs) / min(t_ours),
        "max_abs_diff": float(np.abs(s_ours.numpy() - s_theirs).max()),
        "mean_score": float(s_ours.mean()),
        "quantus_version": quantus.__version__,
    }
    print(json.dumps(result))
    print(f"{'metric':<16}{'whatmatters s':>14}{'quantus s':>11}{'speedup':>9}{'max |diff|':>12}")
    print(
        f"{'max_sensitivity':<16}{result['whatmatters_s']:>14.4f}{result['quantus_s']:>11.4f}"
        f"{result['speedup']:>9.2f}{result['max_abs_diff']:>12.2e}"
    )


if __name__ == "__main__":
    main()
