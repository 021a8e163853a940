"""What a score costs beyond the model's own work: ``wm.explain`` time / the minimal torch work, per method.

The minimal work is written by hand for each method: one forward + one backward to the input (saliency, gradient x
input); the same with each Linear / Conv / average-pool output gradient scaled by ``|z| / (|z| + eps)``
(LRP-epsilon, on a BatchNorm-folded copy made once); the inputs and their zero reference (one shared row) in one
batch with each ReLU's and max pool's gradient replaced by its DeepLIFT multiplier (rescale rule, captum's max-pool
rule); for both of these also the plain forward + backward (rows "vs plain forward+backward"); the path points
(Gauss-Legendre, zero baseline) or noisy copies of every row, forward + backward in calls of 512 rows, their
weighted sum or mean absolute value (integrated gradients, SmoothGrad); a forward + the backward from the class
score to the CAM layer only (the Grad-CAM family); one forward to the layer + one SVD of its activations
(Eigen-CAM); one batched forward over all perturbed rows (ablation); the coalition rows of KernelSHAP (each
sample's features inside a coalition, a background row's outside), in calls of 4096 rows, and their mean per
coalition (``kernel_shap``, linear estimator: its regression is on top).
Token attribution of MiniLM (a linear head on all-MiniLM-L6-v2, 32 sentences): the tokenized sentences' word
embeddings (``steps`` scaled copies for integrated gradients) through the model, one backward to them;
captum and inseq are compared in ``bench_text_attribution.py`` / ``bench_text_generation.py``. Cases: an MLP on
256 rows, MiniLM,
ResNet-18 (torchvision's layout, random weights, ``benchmarks/nets.py``) at 96 px x 8 images and 224 px x 16
images. Both sides are timed alternately, best of ``--runs``, one torch thread by default, in
CPU time of the process (``time.process_time``: on a shared machine other processes' load does not count).

    python benchmarks/bench_overhead.py [--runs 5] [--threads 1] [--quick] [--default-target] [--only MLP]

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

import numpy as np
import torch
from nets import resnet18
from torch import nn

import whatmatters as wm
from whatmatters.explain.lrp import merge_batchnorm

TARGET = 2


def input_gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, TARGET].sum(), x)
    return grad


def reference_gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unmodified work of DeepLIFT: the inputs and their (zero, shared) reference row in one forward, one
    backward."""
    both = torch.cat([x, torch.zeros_like(x[:1])]).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(both)[: len(x), TARGET].sum(), both)
    return grad[: len(x)]


def epsilon_lrp(model: nn.Module, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LRP-epsilon's least work: one forward in which each Linear / Conv / average-pool output ``z`` will scale
    its gradient by ``|z| / (|z| + eps)`` (tensor hooks), one backward; relevance = input x gradient. ``model``
    has no BatchNorm (ours folds it into a cached copy; this reference gets a folded copy made once)."""

    def scaled(_m: nn.Module, _inp: Any, z: torch.Tensor) -> None:
        a = z.detach().abs()
        factor = a.div_(a + eps)
        z.register_hook(lambda g: g * factor)

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.AdaptiveAvgPool2d))]
    handles = [m.register_forward_hook(scaled) for m in layers]
    try:
        return x * input_gradient(model, x)
    finally:
        for h in handles:
            h.remove()


class _Times(torch.autograd.Function):
    """``y`` forward; the output gradient times ``m`` backwards (to the module input: no gradient of its own)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, m: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.m = m
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, torch.Tensor, None]:  # type: ignore[override]
        return None, ctx.m(g), None


def _rescale(x: torch.Tensor, y: torch.Tensor, k: int) -> Any:
    """DeepLIFT's multiplier of a ReLU on rows ``[k samples; one baseline]``: ``dy / dx``, the gradient where
    ``dx`` ~ 0."""
    dx, dy = x[:k] - x[k:], y[:k] - y[k:]
    small = dx.abs() < 1e-10
    m = torch.where(small, (x[:k] > 0).to(x.dtype), dy / dx.masked_fill(small, 1.0))
    return lambda g: torch.cat([g[:k] * m, torch.zeros_like(g[k:])])


def _pool(module: nn.MaxPool2d, x: torch.Tensor, y: torch.Tensor, k: int) -> Any:
    """captum's max-pool rule: each window's rise to the common maximum goes to the sample's argmax, the rest
    to the baseline's, divided by ``dx`` (the plain max-pool gradient where ``dx`` ~ 0)."""
    _, idx = nn.functional.max_pool2d(x, module.kernel_size, module.stride, module.padding, return_indices=True)
    top = torch.maximum(y[:k], y[k:])
    dx = x[:k] - x[k:]
    small = dx.abs() < 1e-10
    plane = x[:k].flatten(2)

    def m(g: torch.Tensor) -> torch.Tensor:
        gk = g[:k].flatten(2)
        up = plane.new_zeros(plane.shape).scatter_add_(2, idx[:k].flatten(2), gk * (top - y[k:]).flatten(2))
        up.scatter_add_(2, idx[k:].flatten(2).expand_as(gk), gk * (y[:k] - top).flatten(2))
        plain = plane.new_zeros(plane.shape).scatter_add_(2, idx[:k].flatten(2), gk)
        new = torch.where(small, plain.view_as(dx), up.view_as(dx) / dx.masked_fill(small, 1.0))
        return torch.cat([new, torch.zeros_like(x[k:])])

    return m


def rescale_deeplift(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DeepLIFT's least work: the inputs and their (zero, shared) reference row in one forward, in which each
    ReLU / max pool will multiply its output gradient by its multiplier (computed in the forward), one backward."""
    kept: list[torch.Tensor] = []

    def before(m: nn.Module, inp: tuple) -> tuple | None:
        kept.append(inp[0])  # an in-place ReLU gets a copy to write, so its input stays the one to route to
        return (inp[0].clone(),) if getattr(m, "inplace", False) else None

    def after(m: nn.Module, _inp: tuple, y: torch.Tensor) -> torch.Tensor:
        xi = kept.pop()
        args = (xi.detach(), y.detach(), len(x))
        rule = _pool(m, *args) if isinstance(m, nn.MaxPool2d) else _rescale(*args)
        return _Times.apply(y.detach(), xi, rule)

    hooked = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.MaxPool2d))]
    handles = [h for m in hooked for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        both = torch.cat([x, torch.zeros_like(x[:1])]).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(both)[: len(x), TARGET].sum(), both)
    finally:
        for h in handles:
            h.remove()
    return x * grad[: len(x)]


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


def chunked_gradient(model: nn.Module, x: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """Forward + backward of ``x`` in calls of ``rows`` (512 keeps a call of the MLP in cache; one call of all
    4096 rows took 1.0-1.5x as long over rounds, depending on where its memory landed)."""
    return torch.cat([input_gradient(model, x[i : i + rows]) for i in range(0, len(x), rows)])


def path_gradient(model: nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrated gradients' least work (zero baseline): the Gauss-Legendre path points of every sample, their
    gradients, the weighted sum times the input. (Ours also runs the path ends for the completeness delta.)"""
    nodes, w = np.polynomial.legendre.leggauss(steps)
    alphas, weights = torch.tensor(0.5 * (nodes + 1), dtype=x.dtype), torch.tensor(0.5 * w, dtype=x.dtype)
    path = (alphas.view(1, steps, *[1] * (x.ndim - 1)) * x.unsqueeze(1)).flatten(0, 1)
    grads = chunked_gradient(model, path)
    return x * (weights @ grads.view(len(x), steps, -1)).view_as(x)


def noisy_gradient(model: nn.Module, x: torch.Tensor, n_samples: int, noise: float = 0.15) -> torch.Tensor:
    """SmoothGrad's least work: ``n_samples`` noisy copies of every sample (one noise level per sample), their
    gradients, the mean absolute gradient."""
    sigma = noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(1, -1, *[1] * (x.ndim - 1))
    noisy = (x.unsqueeze(0) + torch.randn(n_samples, *x.shape) * sigma).flatten(0, 1)
    return chunked_gradient(model, noisy).abs().view(n_samples, *x.shape).mean(0)


def forward_rows(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    variants = x.unsqueeze(1).repeat(1, d + 1, 1)
    variants[:, 1:].masked_fill_(torch.eye(d, dtype=torch.bool).unsqueeze(0), 0.0)
    with torch.no_grad():
        return model(variants.reshape(-1, d))


def coalition_rows(
    model: nn.Module, x: torch.Tensor, evals: int, n_background: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """KernelSHAP's least work: ``evals`` coalitions per sample, each sample's features inside it and a background
    row's outside, over ``n_background`` rows; their mean per coalition; the two ends' outputs."""
    bg = x[:n_background]
    masks = torch.rand(len(x), evals, x.shape[1]) < 0.5
    rows = torch.where(masks[:, :, None, :], x[:, None, None, :], bg[None, None])
    with torch.no_grad():  # in calls of 4096 rows (one call of all of them runs out of cache: slower)
        flat = rows.reshape(-1, x.shape[1])
        out = torch.cat([model(flat[i : i + 4096])[:, TARGET] for i in range(0, len(flat), 4096)])
        ends = model(torch.cat([bg, x]))[:, TARGET]
    return out.view(len(x), evals, -1).mean(2), ends


def token_gradient(model: nn.Module, tok: Any, texts: list[str], steps: int = 1) -> torch.Tensor:
    """Token attribution's least work: the sentences tokenized, the word embeddings' output (``steps`` scaled
    copies of it for a path method) through the classifier, one backward to them."""
    enc = tok(texts, padding=True, return_tensors="pt")
    emb = model.get_input_embeddings()(enc["input_ids"]).detach()
    mask = enc["attention_mask"]
    if steps > 1:
        emb = (emb[None] * torch.linspace(0, 1, steps)[:, None, None, None]).flatten(0, 1)
        mask = mask.repeat(steps, 1)
    emb.requires_grad_(True)
    (grad,) = torch.autograd.grad(model(inputs_embeds=emb, attention_mask=mask).logits[:, TARGET].sum(), emb)
    return grad


def minilm_cases() -> list[tuple]:
    """MiniLM (all-MiniLM-L6-v2 + a linear head, 4 classes) on 32 sentences; none without the text extras."""
    try:
        from bench_text_attribution import SENTENCES

        from whatmatters.text.heads import PooledClassifier
        from whatmatters.text.pretrained import load_minilm

        encoder, tok = load_minilm()
    except Exception as err:  # transformers or the packaged model missing: the other cases still run
        print(f"no MiniLM case: {type(err).__name__}: {err}")
        return []
    torch.manual_seed(0)
    model = PooledClassifier(encoder, 4).eval()
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(32)]
    label = "MiniLM 32 sentences"
    return [
        (label, model, texts, "saliency", {"tokenizer": tok}, lambda: token_gradient(model, tok, texts)),
        (label, model, texts, "gradient_x_input", {"tokenizer": tok}, lambda: token_gradient(model, tok, texts)),
        (label, model, texts, "integrated_gradients", {"tokenizer": tok, "steps": 8},
         lambda: token_gradient(model, tok, texts, 8)),
    ]  # fmt: skip


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
    folded = merge_batchnorm(net)[0]  # made once, as ours is (a cached BatchNorm-free copy)
    sizes = [(96, 8)] if quick else [(96, 8), (224, 16)]
    out = []
    for name, params, minimal in [
        ("saliency", {}, lambda m, x: input_gradient(m, x)),
        ("gradient_x_input", {}, lambda m, x: input_gradient(m, x)),
        ("integrated_gradients", {"steps": 16}, lambda m, x: path_gradient(m, x, 16)),
        ("smoothgrad", {"n_samples": 16}, lambda m, x: noisy_gradient(m, x, 16)),
        ("deeplift", {}, lambda m, x: rescale_deeplift(m, x)),
        ("lrp_epsilon", {}, lambda m, x: epsilon_lrp(m, x)),
        ("ablation", {"baseline": "zero"}, lambda m, x: forward_rows(m, x)),
    ]:
        out.append(("MLP 256 rows", mlp, rows, name, params, (lambda f=minimal: f(mlp, rows))))
    shap = {"estimator": "linear", "max_evals": 64, "max_background": 20}
    few = rows[:32]
    out.append(("MLP 32 rows", mlp, few, "kernel_shap", shap, lambda: coalition_rows(mlp, few, 62, 20)))
    out += plain_references("MLP 256 rows", mlp, rows)
    for size, n in sizes:
        x = torch.randn(n, 3, size, size)
        label = f"ResNet-18 {n}x{size}px"
        for name, params, minimal in [
            ("saliency", {}, lambda m, x: input_gradient(m, x)),
            ("integrated_gradients", {"steps": 8}, lambda m, x: path_gradient(m, x, 8)),
            ("smoothgrad", {"n_samples": 8}, lambda m, x: noisy_gradient(m, x, 8)),
            ("deeplift", {}, lambda m, x: rescale_deeplift(m, x)),
            ("grad_cam", {"layer": "layer4"}, lambda m, x: layer_gradient(m, m.layer4, x)),
            ("eigen_cam", {"layer": "layer4"}, lambda m, x: first_component(m, m.layer4, x)),
            ("lrp_epsilon", {}, lambda _m, x: epsilon_lrp(folded, x)),
        ]:
            out.append((label, net, x, name, params, (lambda f=minimal, x=x: f(net, x))))
        out += plain_references(label, net, x)
    return out + minilm_cases()


def plain_references(label: str, model: nn.Module, x: torch.Tensor) -> list[tuple]:
    """DeepLIFT and LRP-epsilon against the unmodified forward + backward (what their rules add is in the ratio)."""
    return [
        (f"{label}, vs plain forward+backward", model, x, "deeplift", {}, lambda: reference_gradient(model, x)),
        (f"{label}, vs plain forward+backward", model, x, "lrp_epsilon", {}, lambda: input_gradient(model, x)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="only the 96 px ResNet case")
    parser.add_argument("--default-target", action="store_true", help="target=None against the target given")
    parser.add_argument("--only", default="", help="only the cases whose 'case: method' contains this text")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for label, model, x, method, params, minimal in cases(args.quick):
        if args.only not in f"{label}: {method}":
            continue

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
