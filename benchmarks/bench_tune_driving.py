"""Driveability segmentation on the synthetic driving scenes: one-hot cross-entropy vs soft ordinal labels vs soft
ordinal + safety-weighted pixels, each training the same tiny U-Net from the same seed for the same steps.

    python benchmarks/bench_tune_driving.py --steps 300 --threads 1

Reports mIoU over the 3 driveability levels, the ordinal error (mean |predicted - true level|) and the error rate on
safety-critical pixels (driveable / non-driveable edges, the region ahead, obstacles), as JSON lines and a table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from whatmatters.tune.driving import OBSTACLE, TinyUNet, driving_scenes, segmentation_scores
from whatmatters.tune.losses import SafetyWeightedLoss, SoftOrdinalLoss, safety_weights

LOSSES = {
    "one-hot CE": lambda logits, levels, classes: F.cross_entropy(logits, levels),
    "soft ordinal": lambda logits, levels, classes: SoftOrdinalLoss(3)(logits, levels),
    "ordinal + safety": lambda logits, levels, classes: SafetyWeightedLoss(danger_classes=(OBSTACLE,))(
        logits, levels, classes
    ),
}


def train(name: str, steps: int, seed: int, data: tuple, test: tuple) -> dict:
    images, classes, levels = data
    torch.manual_seed(seed)
    net = TinyUNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (32,), generator=g)
        loss = LOSSES[name](net(images[idx]), levels[idx], classes[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    t_images, t_classes, t_levels = test
    with torch.no_grad():
        pred = net.eval()(t_images).argmax(1)
    critical = safety_weights(t_levels, t_classes, danger_classes=(OBSTACLE,)) > 1
    return {
        "loss": name,
        **{k: round(v, 4) for k, v in segmentation_scores(pred, t_levels, critical).items()},
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data, test = driving_scenes(2048, seed=0), driving_scenes(256, seed=1)
    rows = []
    for name in LOSSES:
        runs = [train(name, args.steps, seed, data, test) for seed in range(args.seeds)]
        row = {"loss": name, **{k: round(sum(r[k] for r in runs) / len(runs), 4) for k in runs[0] if k != "loss"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, **vars(args), "rows": rows}, f, indent=1)
    print(f"{'loss':18} {'mIoU':>6} {'ordinal err':>11} {'critical err':>12} {'seconds':>8}")
    for r in rows:
        errors = f"{r['ordinal_error']:11.4f} {r['critical_error']:12.4f}"
        print(f"{r['loss']:18} {r['miou']:6.3f} {errors} {r['seconds']:8.1f}")


if __name__ == "__main__":
    main()
