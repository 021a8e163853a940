"""Occlusion: whatmatters vs captum ``Occlusion``, side by side, on the shapes CNN (and EfficientNet-Lite0).

captum is timed twice: with its default ``perturbations_per_eval=1`` (one model call per window)
and with ``perturbations_per_eval`` set so that its calls hold as many rows as ours. Both give the
same maps (checked here: max |difference| printed). Times are also given as multiples of one
forward pass over the batch. Prints a table and one JSON line.

    python benchmarks/bench_occlusion.py [--runs 3] [--batch 16] [--efficientnet]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch


def best_of(*fns, runs: int) -> list[float]:
    """Fastest time of each function over ``runs`` interleaved rounds (after one warm-up call each)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def cases(args: argparse.Namespace) -> list[tuple[str, torch.nn.Module, torch.Tensor, int, int]]:
    from whatmatters.vision.nets import ShapesCNN
    from whatmatters.vision.shapes import make_shapes

    torch.manual_seed(0)
    x, _, _ = make_shapes(args.batch, 32, seed=5)
    out = [(f"shapes cnn (n={args.batch}, 3x32x32)", ShapesCNN().eval(), x, 4, 2)]
    if args.efficientnet:
        from whatmatters.vision.pretrained import load_efficientnet_lite0

        model, prep = load_efficientnet_lite0()
        import skimage.data as skdata

        photos = prep([skdata.chelsea(), skdata.coffee()])
        out.append(("efficientnet-lite0 (n=2, 3x224x224)", model, photos, 32, 32))
    return out


def run_case(args: argparse.Namespace, name: str, model: torch.nn.Module, x: torch.Tensor, win: int, stride: int):
    """Time whatmatters and captum (default and matched rows per call) and one forward pass on one case."""
    from captum.attr import Occlusion

    import whatmatters as wm

    c = x.shape[1]
    with torch.no_grad():
        target = model(x).argmax(1)
    per_eval = max(1, args.rows // len(x))  # captum's rows per call = len(x) * perturbations_per_eval

    def ours():
        return wm.explain(model, x, "occlusion", target=target, window=win, stride=stride, batch_size=args.rows)

    def captum(ppe: int):
        return Occlusion(model).attribute(
            x,
            sliding_window_shapes=(c, win, win),
            strides=(c, stride, stride),
            target=target,
            baselines=0.0,
            perturbations_per_eval=ppe,
        )

    def forward():
        with torch.no_grad():
            model(x)

    first = ours()
    diff = float((first.values * c - captum(per_eval).sum(1)).abs().max())
    t_ours, t_default, t_matched, t_fwd = best_of(
        ours, lambda: captum(1), lambda: captum(per_eval), forward, runs=args.runs
    )
    return {
        "case": name,
        "window": win,
        "stride": stride,
        "windows_per_image": first.extra["windows"],
        "max_abs_diff_vs_captum": diff,
        "forward_s": t_fwd,
        "whatmatters_s": t_ours,
        "captum_default_s": t_default,
        "captum_perturbations_per_eval": per_eval,
        "captum_matched_s": t_matched,
        "ratio_vs_captum_default": t_ours / t_default,
        "ratio_vs_captum_matched": t_ours / t_matched,
        "whatmatters_x_forward": t_ours / t_fwd,
        "captum_matched_x_forward": t_matched / t_fwd,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each; the best is reported")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=256, help="rows per model call (ours: batch_size)")
    parser.add_argument("--efficientnet", action="store_true", help="also EfficientNet-Lite0 on two photos")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results = [run_case(args, *case) for case in cases(args)]
    print(f"torch threads={torch.get_num_threads()}, rows per call={args.rows}; ratio = whatmatters / captum")
    print(
        f"{'case':<38}{'win/str':>8}{'windows':>8}{'wm s':>9}{'captum s':>10}{'ratio':>7}"
        f"{'captum(ppe) s':>15}{'ratio':>7}{'wm x fwd':>10}{'max diff':>10}"
    )
    for r in results:
        matched = r["captum_matched_s"]
        print(
            f"{r['case']:<38}{r['window']:>4}/{r['stride']:<3}{r['windows_per_image']:>8}{r['whatmatters_s']:>9.3f}"
            f"{r['captum_default_s']:>10.3f}{r['ratio_vs_captum_default']:>7.2f}{matched:>15.3f}"
            f"{r['ratio_vs_captum_matched']:>7.2f}{r['whatmatters_x_forward']:>10.1f}{r['max_abs_diff_vs_captum']:>10.2e}"
        )
    print(json.dumps({"benchmark": "occlusion", "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
