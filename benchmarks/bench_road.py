"""ROAD and gradient-noise stability on the shapes CNN; ROAD's imputation side by side with Quantus.

Part 1: ROAD MoRF / LeRF (accuracy curves, 10 % ... 90 %, noise 0.01 of the data range) for
saliency, integrated gradients, Grad-CAM, CF-CAM, LRP, occlusion and a random map, with seconds.
Part 2: the imputation of the same images and pixel sets (noise 0) by whatmatters' one batched
sparse solve and by Quantus' ``noisy_linear_imputation`` called per image and fraction (as its
``ROAD`` does): seconds, ratio (above 1: whatmatters faster) and the largest difference.
Part 3: ``gradient_noise`` of Grad-CAM, CF-CAM, Grad-CAM++ and Layer-CAM at three noise levels,
as relative L2 change and as 1 - Spearman.

Quantus is not in the main environment; part 2 runs where it is importable, e.g.::

    PYTHONPATH=. /tmp/qenv/bin/python benchmarks/bench_road.py [--n 32 --repeats 3 --json out.json]

(``/tmp/qenv``: ``python -m venv /tmp/qenv && /tmp/qenv/bin/pip install torch quantus scikit-learn
pandas pyarrow rich typer``). Prints one JSON object, then tables. Times are medians of
``--repeats`` runs, with one torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import torch

import whatmatters as wm
from whatmatters.evaluate.road import DEFAULT_FRACTIONS, noisy_linear_imputation, removal_counts, road_lerf, road_morf
from whatmatters.evaluate.robustness import gradient_noise
from whatmatters.vision.nets import load_or_train
from whatmatters.vision.shapes import make_shapes

METHODS = ["saliency", "integrated_gradients", "grad_cam", "cf_cam", "lrp", "occlusion", "random"]
CAMS = ["grad_cam", "cf_cam", "grad_cam_plus_plus", "layer_cam"]
SIGMAS = [0.1, 0.5, 2.0]


def _median_time(fn: Any, repeats: int) -> tuple[Any, float]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _importance(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, method: str) -> wm.Importance:
    if method == "random":
        values = torch.rand(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(0))
        return wm.Importance(values, unit="pixel", method="random")
    params = {"window": 4} if method == "occlusion" else {}
    return wm.explain(model, x, method=method, target=y, **params)


def road_table(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        imp, t_explain = _median_time(lambda m=method: _importance(model, x, y, m), repeats)
        morf, t_morf = _median_time(lambda i=imp: road_morf(model, x, i, y=y), repeats)
        lerf, t_lerf = _median_time(lambda i=imp: road_lerf(model, x, i, y=y), repeats)
        rows.append(
            {
                "method": method,
                "road_morf": morf.value,
                "road_lerf": lerf.value,
                "lerf_minus_morf": lerf.value - morf.value,
                "morf_curve": [round(float(v), 4) for v in morf.mean_curves()["morf"][1]],
                "lerf_curve": [round(float(v), 4) for v in lerf.mean_curves()["lerf"][1]],
                "seconds_explain": t_explain,
                "seconds_morf": t_morf,
                "seconds_lerf": t_lerf,
            }
        )
    return rows


def imputation_vs_quantus(x: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Same images and pixel sets (random order per image), noise 0: whatmatters vs Quantus."""
    n, _, h, w = x.shape
    frac = np.array(DEFAULT_FRACTIONS)
    order = torch.rand(n, h * w, generator=torch.Generator().manual_seed(1)).argsort(1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(h * w).expand(n, -1))
    counts = torch.from_numpy(removal_counts(h * w, frac))
    removed = (ranks.unsqueeze(1) < counts.view(1, -1, 1)).reshape(-1, h, w)
    images = x.double().repeat_interleave(len(frac), dim=0)
    ours, t_ours = _median_time(lambda: noisy_linear_imputation(images, removed, noise=0.0), repeats)
    out: dict[str, Any] = {"images": int(images.shape[0]), "seconds_whatmatters": t_ours}
    try:
        from quantus.functions.perturb_func import noisy_linear_imputation as quantus_nli
    except ImportError:
        out["quantus"] = "not installed"
        return out
    arrays = images.numpy()
    index = [np.nonzero(m.reshape(-1))[0] for m in removed.numpy()]

    def reference() -> np.ndarray:
        return np.stack([quantus_nli(a, i, noise=0.0) for a, i in zip(arrays, index)])

    ref, t_ref = _median_time(reference, repeats)
    out.update(
        {
            "quantus": __import__("quantus").__version__,
            "seconds_quantus": t_ref,
            "ratio_quantus_over_whatmatters": t_ref / t_ours,
            "max_abs_difference": float(np.abs(ours - ref).max()),
        }
    )
    return out


def noise_table(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n_repeats: int) -> list[dict[str, Any]]:
    rows = []
    for method in CAMS:
        imp = wm.explain(model, x, method=method, target=y)
        row: dict[str, Any] = {"method": method}
        start = time.perf_counter()
        for sigma in SIGMAS:
            for distance in ("relative_l2", "spearman"):
                res = gradient_noise(model, x, imp, sigma=sigma, n_repeats=n_repeats, distance=distance)
                row[f"{distance}@{sigma}"] = res.value
        row["seconds_total"] = time.perf_counter() - start
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--noise-repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the JSON to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_or_train("cnn")
    x, y, _ = make_shapes(args.n, seed=2024)  # not the training seed
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).double().mean())
    result = {
        "setup": {"model": "shapes CNN (load_or_train('cnn'))", "images": args.n, "size": 32, "accuracy": accuracy},
        "road": road_table(model, x, y, args.repeats),
        "imputation": imputation_vs_quantus(x, args.repeats),
        "gradient_noise": noise_table(model, x, y, args.noise_repeats),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(f"\nROAD on {args.n} shapes images (accuracy {accuracy:.3f}); MoRF lower is better, LeRF higher")
    print(f"{'method':22s} {'MoRF':>7s} {'LeRF':>7s} {'LeRF-MoRF':>9s} {'explain s':>9s} {'MoRF s':>7s} {'LeRF s':>7s}")
    for r in result["road"]:
        print(
            f"{r['method']:22s} {r['road_morf']:7.3f} {r['road_lerf']:7.3f} {r['lerf_minus_morf']:9.3f} "
            f"{r['seconds_explain']:9.3f} {r['seconds_morf']:7.3f} {r['seconds_lerf']:7.3f}"
        )
    imp = result["imputation"]
    if "seconds_quantus" in imp:
        print(
            f"\nimputation of {imp['images']} images (noise 0): whatmatters {imp['seconds_whatmatters']:.3f} s, "
            f"Quantus {imp['seconds_quantus']:.3f} s, ratio {imp['ratio_quantus_over_whatmatters']:.1f}x, "
            f"max |diff| {imp['max_abs_difference']:.2e}"
        )
    else:
        print(f"\nimputation of {imp['images']} images: whatmatters {imp['seconds_whatmatters']:.3f} s (no Quantus)")
    print("\ngradient_noise (lower is more stable): relative L2 | 1 - Spearman")
    print(f"{'method':22s} " + " ".join(f"{'s=' + str(s):>17s}" for s in SIGMAS))
    for r in result["gradient_noise"]:
        cells = " ".join(f"{r[f'relative_l2@{s}']:8.2e}|{r[f'spearman@{s}']:8.2e}" for s in SIGMAS)
        print(f"{r['method']:22s} {cells}")


if __name__ == "__main__":
    main()
