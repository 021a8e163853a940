"""What a score costs beyond the model's own work: ``wm.explain`` time / the minimal torch work, per method.

The minimal work is written by hand for each method: one forward + one backward to the input (saliency,
gradient x input and LRP: one modified backward), the same over the inputs and their zero reference in one
batch (DeepLIFT, whose rescale rule needs the reference's activations), ``steps`` x rows of forward +
backward in one batch (integrated gradients, SmoothGrad), a forward + the backward from the class score to
the CAM layer only (the Grad-CAM family), one forward to the layer + one SVD of its activations (Eigen-CAM),
and one batched forward over all perturbed rows (ablation). Token attribution is timed against captum and
inseq in ``bench_text_attribution.py`` / ``bench_text_generation.py`` instead. Cases: an MLP on 256 rows,
ResNet-18 (torchvision's layout, random weights, ``benchmarks/nets.py``) at 96 px x 8 images and 224 px x 16
images. Both sides are timed alternately, best of ``--runs``, one torch thread by default, in
CPU time of the process (``time.process_time``: on a shared machine other processes' load does not count).

    python benchmarks/bench_overhead.py [--runs 5] [--threads 1] [--quick] [--default-target]

``--default-target`` times instead each method's default call (``target=None``: the predicted class) against
the same call with the target given, paired the same way: 1.00x means choosing the class cost nothing (it
came from the method's own forward), about 1 + forward / (method's work) a separate prediction.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from nets import resnet18
from torch import nn

import whatmatters as wm

TARGET = 2


def input_gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, TARGET].sum(), x)
    return grad


def reference_gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DeepLIFT's least work: the inputs and their (zero) reference in one forward, one backward."""
    both = torch.cat([x, torch.zeros_like(x)]).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(both)[: len(x), TARGET].sum(), both)
    return grad[: len(x)]


def first_component(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eigen-CAM's least work: the layer's activations and their first principal component (one SVD)."""
    a = layer_output(model, layer, x).flatten(2).transpose(1, 2)
    a = a - a.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(a, full_matrices=False)
    return a @ vh[:, 0, :, None]


def layer_gradient(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.setdefault("a", out))
    try:
        score = model(x)[:, TARGET].sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, seen["a"])
    return grad


def layer_output(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.setdefault("a", out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen["a"]


def batched_gradient(model: nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    return input_gradient(model, x.repeat(steps, *[1] * (x.ndim - 1)))


def forward_rows(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    variants = x.unsqueeze(1).repeat(1, d + 1, 1)
    variants[:, 1:].masked_fill_(torch.eye(d, dtype=torch.bool).unsqueeze(0), 0.0)
    with torch.no_grad():
        return model(variants.reshape(-1, d))


def paired(ours: Callable[[], Any], minimal: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Best CPU times of the two, timed alternately so that machine noise hits both alike."""
    best = [float("inf"), float("inf")]
    for _ in range(runs):
        for i, fn in enumerate((ours, minimal)):
            start = time.process_time()
            fn()
            best[i] = min(best[i], time.process_time() - start)
    return best[0], best[1]


def cases(quick: bool) -> list[tuple[str, nn.Module, torch.Tensor, str, dict, Callable[[], Any]]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    rows = torch.randn(256, 30)
    net = resnet18()
    sizes = [(96, 8)] if quick else [(96, 8), (224, 16)]
    out = []
    for name, params, minimal in [
        ("saliency", {}, lambda m, x: input_gradient(m, x)),
        ("gradient_x_input", {}, lambda m, x: input_gradient(m, x)),
        ("integrated_gradients", {"steps": 16}, lambda m, x: batched_gradient(m, x, 16)),
        ("smoothgrad", {"n_samples": 16}, lambda m, x: batched_gradient(m, x, 16)),
        ("deeplift", {}, lambda m, x: reference_gradient(m, x)),
        ("lrp_epsilon", {}, lambda m, x: input_gradient(m, x)),
        ("ablation", {"baseline": "zero"}, lambda m, x: forward_rows(m, x)),
    ]:
        out.append(("MLP 256 rows", mlp, rows, name, params, (lambda f=minimal: f(mlp, rows))))
    for size, n in sizes:
        x = torch.randn(n, 3, size, size)
        label = f"ResNet-18 {n}x{size}px"
        for name, params, minimal in [
            ("saliency", {}, lambda m, x: input_gradient(m, x)),
            ("integrated_gradients", {"steps": 8}, lambda m, x: batched_gradient(m, x, 8)),
            ("smoothgrad", {"n_samples": 8}, lambda m, x: batched_gradient(m, x, 8)),
            ("deeplift", {}, lambda m, x: reference_gradient(m, x)),
            ("grad_cam", {"layer": "layer4"}, lambda m, x: layer_gradient(m, m.layer4, x)),
            ("eigen_cam", {"layer": "layer4"}, lambda m, x: first_component(m, m.layer4, x)),
            ("lrp_epsilon", {}, lambda m, x: input_gradient(m, x)),
        ]:
            out.append((label, net, x, name, params, (lambda f=minimal, x=x: f(net, x))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="only the 96 px ResNet case")
    parser.add_argument("--default-target", action="store_true", help="target=None against the target given")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for label, model, x, method, params, minimal in cases(args.quick):

        def ours_fn(model=model, x=x, method=method, params=params, target=TARGET) -> Any:
            return wm.explain(model, x, method, target=target, **params)

        if args.default_target:
            minimal = ours_fn  # the reference: the same call with the target given
        ours, least = paired(lambda f=ours_fn: f(target=None) if args.default_target else f(), minimal, args.runs)
        rows.append({"case": label, "method": method, "ms": round(ours * 1e3, 2), "minimal_ms": round(least * 1e3, 2),
                     "ratio": round(ours / least, 2)})  # fmt: skip
        print(f"{label:22s} {method:22s} {ours * 1e3:9.2f} ms  minimal {least * 1e3:9.2f} ms  {ours / least:5.2f}x")
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
