"""CAM family: whatmatters vs pytorch-grad-cam, side by side in one run, on a ResNet-18.

pytorch-grad-cam needs torchvision, which stays out of the main environment; run from a separate
virtual environment with both libraries::

    python -m venv /tmp/venv-gradcam
    /tmp/venv-gradcam/bin/pip install torch torchvision grad-cam pandas scipy scikit-learn rich pyarrow typer
    /tmp/venv-gradcam/bin/pip install -e . --no-deps
    /tmp/venv-gradcam/bin/python benchmarks/bench_cam.py [--batch 16 --size 224 --score-images 2 --score-size 112]

Prints one JSON object, then a table. Times are the best of ``--repeats`` runs after one warm-up
call, the two libraries interleaved, as wall clock and as process CPU time (the CPU ratios are steadier on a shared
machine). Ratios below 1 mean whatmatters is faster. ``ours/base`` is a method's time as a multiple
of one forward + full backward pass of the model on the same batch.
Score-CAM runs on fewer, smaller images (``n x 512`` masked forward passes); its cost is also given as
a multiple of forwarding ``n x C`` images with no masking at all (the floor for the method).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

LAYER = "layer4.1"


class Timer:
    """Best wall-clock and best process CPU time over the calls timed so far."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, fn: Callable[[], Any], repeats: int = 1) -> Timer:
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            self.cpu.append(time.process_time() - cpu)
            self.wall.append(time.perf_counter() - wall)
        return self

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def best_cpu(self) -> float:
        return min(self.cpu)


def _row(method: str, ours: Timer, theirs: Timer | None, base: Timer, **more: Any) -> dict[str, Any]:
    """Times of one method, and its ratios to the reference and to a baseline (wall and CPU)."""
    row: dict[str, Any] = {
        "method": method,
        "whatmatters_s": ours.best,
        "whatmatters_cpu_s": ours.best_cpu,
        "pytorch_grad_cam_s": theirs.best if theirs else None,
        "pytorch_grad_cam_cpu_s": theirs.best_cpu if theirs else None,
        "ratio": ours.best / theirs.best if theirs else None,
        "ratio_cpu": ours.best_cpu / theirs.best_cpu if theirs else None,
        "vs_base": ours.best / base.best,
        "vs_base_cpu": ours.best_cpu / base.best_cpu,
        "reference_vs_base": theirs.best / base.best if theirs else None,
        "reference_vs_base_cpu": theirs.best_cpu / base.best_cpu if theirs else None,
    }
    row.update(more)
    return row


def _fmt(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--score-images", type=int, default=2)
    parser.add_argument("--score-size", type=int, default=112)
    parser.add_argument("--chunk", type=int, default=32, help="masked images per model call in Score-CAM (both)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-score", action="store_true", help="skip Score-CAM (the slow part)")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args()

    import contextlib
    import io

    import torchvision
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import whatmatters as wm

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    layer = model.get_submodule(LAYER)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    with torch.no_grad():
        target = model(x).argmax(1)
    targets = [ClassifierOutputTarget(int(t)) for t in target]

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        model(x).gather(1, target[:, None]).sum().backward()
        model.zero_grad(set_to_none=True)

    forward_backward()  # warm-up
    fwd, fwd_bwd = Timer(), Timer()
    for _ in range(args.repeats):
        fwd(forward)
        fwd_bwd(forward_backward)

    reference = {
        "grad_cam": GradCAM,
        "grad_cam_plus_plus": GradCAMPlusPlus,
        "xgrad_cam": XGradCAM,
        "layer_cam": LayerCAM,
        "eigen_cam": EigenCAM,
        "cf_cam": None,
    }
    rows: list[dict[str, Any]] = []
    for name, cls in reference.items():
        seen: dict[str, Any] = {}

        def ours(name: str = name, seen: dict[str, Any] = seen) -> None:
            imp = wm.explain(model, x, name, target=target, layer=LAYER)
            seen["scorer_s"] = min(seen.get("scorer_s", float("inf")), imp.seconds)
            seen["extra"] = imp.extra

        def theirs(cls: Any = cls) -> None:
            with cls(model=model, target_layers=[layer]) as cam:
                cam(input_tensor=x, targets=targets)

        if cls is not None:  # warm-up: lazy library loads (LAPACK, scikit-learn) are not timed
            theirs()
        ours()
        t_ours, t_theirs = Timer(), Timer() if cls else None
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            if t_theirs is not None:
                t_theirs(theirs)
            t_ours(ours)
        more = {"clusters": seen["extra"]["clusters"]} if name == "cf_cam" else {}
        rows.append(
            _row(name, t_ours, t_theirs, fwd_bwd, images=args.batch, size=args.size, scorer_s=seen["scorer_s"], **more)
        )

    if not args.no_score:
        # Score-CAM: n x C masked images through the model, against plainly forwarding n x C images.
        xs = torch.randn(args.score_images, 3, args.score_size, args.score_size, generator=gen)
        with torch.no_grad():
            ts = model(xs).argmax(1)
        channels = 512
        plain = xs.repeat_interleave(channels, 0)

        def n_channel_forwards() -> None:
            with torch.no_grad():
                for i in range(0, len(plain), args.chunk):
                    model(plain[i : i + args.chunk])

        def theirs_score() -> None:
            with ScoreCAM(model=model, target_layers=[layer]) as cam:
                cam.batch_size = args.chunk
                cam(input_tensor=xs, targets=[ClassifierOutputTarget(int(t)) for t in ts])

        seen: dict[str, Any] = {}

        def ours_score() -> None:
            seen.update(wm.explain(model, xs, "score_cam", target=ts, layer=LAYER, batch_size=args.chunk).extra)

        floor, s_theirs, s_ours = Timer(), Timer(), Timer()
        with contextlib.redirect_stderr(io.StringIO()):  # pytorch-grad-cam's tqdm bars
            for _ in range(max(1, args.repeats - 1)):
                floor(n_channel_forwards)
                s_theirs(theirs_score)
                s_ours(ours_score)
        rows.append(
            _row(
                "score_cam",
                s_ours,
                s_theirs,
                floor,
                images=args.score_images,
                size=args.score_size,
                n_channel_forwards_s=floor.best,
                n_channel_forwards_cpu_s=floor.best_cpu,
                masked_images=seen.get("masked_images"),
                chunk=args.chunk,
            )
        )

    result = {
        "benchmark": "cam",
        "model": "torchvision resnet18 (random weights)",
        "layer": LAYER,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "note": "vs_base: multiple of one forward+full backward pass (Score-CAM: of plainly forwarding n x C images)",
        "forward_s": fwd.best,
        "forward_backward_s": fwd_bwd.best,
        "forward_cpu_s": fwd.best_cpu,
        "forward_backward_cpu_s": fwd_bwd.best_cpu,
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)

    print(
        f"\nResNet-18 ({torch.get_num_threads()} threads), {args.batch} images {args.size}px: forward "
        f"{fwd.best:.3f}s wall / {fwd.best_cpu:.3f}s CPU, "
        f"forward+backward {fwd_bwd.best:.3f}s / {fwd_bwd.best_cpu:.3f}s"
    )
    print("ratio = whatmatters / pytorch-grad-cam; base = forward+backward (Score-CAM: plain n x C forwards)")
    head = ["method", "ours s", "ref s", "ratio", "ratio CPU", "ours/base", "CPU", "ref/base", "CPU"]
    print(f"{head[0]:<20}" + "".join(f"{h:>11}" for h in head[1:]))
    for r in rows:
        cells = [
            _fmt(r["whatmatters_s"]),
            _fmt(r["pytorch_grad_cam_s"]),
            _fmt(r["ratio"], "x"),
            _fmt(r["ratio_cpu"], "x"),
            _fmt(r["vs_base"], "x"),
            _fmt(r["vs_base_cpu"], "x"),
            _fmt(r["reference_vs_base"], "x"),
            _fmt(r["reference_vs_base_cpu"], "x"),
        ]
        print(f"{r['method']:<20}" + "".join(f"{c:>11}" for c in cells))
    r = rows[-1]
    if r["method"] == "score_cam":
        print(
            f"(Score-CAM: {r['images']} images {r['size']}px x {channels} channels, {args.chunk} per model call; "
            f"masked images run per image: {r['masked_images']})"
        )


if __name__ == "__main__":
    main()
