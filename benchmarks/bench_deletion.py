"""Deletion curves: whatmatters ``deletion_curve`` vs Quantus ``PixelFlipping``, side by side.

A small random CNN (or, with ``--model linear``, a linear classifier, where the model's cost no longer
hides the evaluation's own) on ``n`` random 1x28x28 images with random attributions; pixels are set to the
image's minimum (Quantus' "black" baseline; ours given as a baseline callable) in order of
decreasing attribution, ``features_in_step`` pixels per step. Quantus perturbs and predicts step
by step (one model call per step); whatmatters builds all steps of all samples at once and sends
them in a few large batches. The curves must agree (Quantus' curve is ours without its first
point, f(x)). Prints a table and one JSON line.

Quantus is optional (it needs opencv); without it only our timing is printed:

    python benchmarks/bench_deletion.py [--model cnn|linear] [--n 64] [--step 16] [--runs 3] [--threads 1]

Both run with the same number of torch threads (default 1: on a shared, oversubscribed machine
multi-threaded torch ops on small tensors spend their time waiting for cores).
"""

from __future__ import annotations

import argparse
import json
import warnings

from timing import best_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["cnn", "linear"], default="cnn")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--step", type=int, default=16, help="pixels removed per step (784 must be a multiple)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each; the best is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for both")
    args = parser.parse_args()

    import numpy as np
    import torch
    from torch import nn

    import whatmatters as wm
    from whatmatters.evaluate import deletion_curve

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(128, 10),
        ).eval()
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    x = torch.rand(args.n, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
    attributions = torch.randn(args.n, 1, 28, 28)
    steps = 28 * 28 // args.step
    importance = wm.Importance(attributions, unit="pixel")

    def black(images: torch.Tensor) -> torch.Tensor:  # Quantus' "black": every image's own minimum
        return images.amin(dim=(1, 2, 3), keepdim=True).expand_as(images)

    def ours():
        return deletion_curve(model, x, importance, baseline=black, steps=steps, target=y)

    t_ours, (_, curve) = best_of(ours, args.runs)
    result = {
        "benchmark": "deletion_curve",
        "model": args.model,
        "n": args.n,
        "pixels": 784,
        "features_in_step": args.step,
        "steps": steps,
        "torch_threads": torch.get_num_threads(),
        "seconds": {"whatmatters": t_ours},
    }
    rows = [("whatmatters deletion_curve", t_ours, 1.0)]
    try:
        import quantus
    except ImportError:
        quantus = None
        result["quantus"] = "not installed"
    if quantus is not None:
        metric = quantus.PixelFlipping(
            features_in_step=args.step,
            perturb_baseline="black",
            normalise=False,
            abs=False,
            disable_warnings=True,
            display_progressbar=False,
        )

        def theirs():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return np.asarray(
                    metric(
                        model=model,
                        x_batch=x.numpy(),
                        y_batch=y.numpy(),
                        a_batch=attributions.numpy(),
                        device="cpu",
                        softmax=False,
                        batch_size=args.n,
                    )
                )

        t_q, ref = best_of(theirs, args.runs)
        # tied attributions may be ordered differently (ours at random, Quantus by its sort): compare the others
        flat = attributions.reshape(args.n, -1).sort(1).values
        tied = (flat[:, 1:] == flat[:, :-1]).any(1).numpy()
        diff = float(np.abs(curve[:, 1:].numpy() - ref)[~tied].max())
        result["samples_with_tied_attributions"] = int(tied.sum())
        result["seconds"]["quantus"] = t_q
        result["ratio_vs_quantus"] = t_ours / t_q
        result["quantus_version"] = quantus.__version__
        result["max_abs_curve_diff"] = diff
        rows.append((f"quantus PixelFlipping {quantus.__version__}", t_q, t_ours / t_q))
    print(f"{'method':<34}{'seconds':>10}{'ours / it':>12}")
    for name, seconds, ratio in rows:
        print(f"{name:<34}{seconds:>10.3f}{ratio:>12.2f}")
    if "max_abs_curve_diff" in result:
        print(
            f"curves agree: max |ours - quantus| = {result['max_abs_curve_diff']:.2e} (logits; "
            f"{result['samples_with_tied_attributions']} samples with tied attributions left out)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
