"""LIME, DeepLIFT family, GradientSHAP, guided methods, layer and neuron attribution vs captum, side by side.

On an MLP (tabular) and a small CNN (images), float32, each method runs in whatmatters and in captum on equal
inputs in one process: for LIME with the same perturbation vectors and kernel (captum: one sample at a time,
its ``perturbations_per_eval``, default 1, and also 64), for GradientSHAP with the same draws (captum's draws
reproduced and handed to our ``expected_gradients``; the timed whatmatters call is the scorer drawing its
own). Prints a table (max relative difference, seconds, ratio whatmatters / captum) and one JSON line.
CNN with average pooling: with max pooling behind a ReLU, captum 0.9's DeepLift is not complete (issues
#1104, #1276), so a difference there would be captum's.

Layer rows (second hidden layer / second convolution, 20 steps, same rule) compare with captum's
LayerGradientXActivation, LayerIntegratedGradients, LayerConductance, InternalInfluence, NeuronConductance and
NeuronIntegratedGradients.

    PYTHONPATH=. python benchmarks/bench_explain_menu.py [--runs 3] [--threads 1] [--only layer]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_gradient import best_of

import whatmatters as wm
from whatmatters.core.task import make_task
from whatmatters.explain.gradient_shap import expected_gradients
from whatmatters.explain.lime import grid_segments


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)).eval()
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip
    return {"mlp (n=64, d=30)": (mlp, torch.randn(64, 30)), "cnn (n=16, 3x16x16)": (cnn, torch.rand(16, 3, 16, 16))}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())


def lime_pair(model, x, target, n_samples, per_eval):
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    mask = None if x.ndim == 2 else grid_segments(x.shape[-2], x.shape[-1], 16)
    k = x.shape[1] if mask is None else 16
    z = torch.rand((len(x), n_samples, k), generator=torch.Generator().manual_seed(0)) < 0.5
    ours = {"n_samples": n_samples, "baseline": "zero"} | ({} if mask is None else {"n_segments": 16})

    def theirs():
        out = []
        for i in range(len(x)):

            def perturb(_inp, rows=z[i], **_kw):
                for row in rows:
                    yield row[None].long()

            fm = None if mask is None else mask[None, None].expand(1, *x.shape[1:])
            lime = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0), perturb_func=perturb)
            out.append(
                lime.attribute(x[i : i + 1], target=int(target[i]), n_samples=n_samples, feature_mask=fm,
                               perturbations_per_eval=per_eval)
            )  # fmt: skip
        return torch.cat(out)

    return (lambda: wm.explain(model, x, "lime", target=target, **ours).values), theirs


def gradient_shap_check(model, x, target, bg, m, sd):
    """Max relative difference with captum on the same draws."""
    from captum.attr import GradientShap

    n = len(x)
    np.random.seed(3)
    torch.manual_seed(3)
    ref = GradientShap(model).attribute(x, baselines=bg, target=target, n_samples=m, stdevs=sd)
    np.random.seed(3)
    torch.manual_seed(3)
    index = np.random.choice(len(bg), n * m)
    noise = torch.normal(0, torch.tensor(sd).repeat((n * m, *x.shape[1:])))
    alphas = torch.tensor(np.random.uniform(0.0, 1.0, n * m), dtype=x.dtype)
    noisy = (x.repeat_interleave(m, 0) + noise).view(n, m, *x.shape[1:])
    ours = expected_gradients(make_task(model, x, target), noisy, bg[index].view(n, m, *x.shape[1:]), alphas.view(n, m))
    return rel(ours, ref)


def runners(model, x, target, bg):
    from captum import attr

    def ours(method, **params):
        return lambda: wm.explain(model, x, method, target=target, **params).values

    rows = {
        "deeplift": (ours("deeplift"), lambda: attr.DeepLift(model).attribute(x, target=target)),
        "deeplift_shap (20 baselines)": (
            ours("deeplift_shap", background=bg),
            lambda: attr.DeepLiftShap(model).attribute(x, baselines=bg, target=target),
        ),
        "gradient_shap (n_samples=50)": (
            ours("gradient_shap", background=bg, n_samples=50),
            lambda: attr.GradientShap(model).attribute(x, baselines=bg, target=target, n_samples=50),
        ),
        "guided_backprop": (ours("guided_backprop"), lambda: attr.GuidedBackprop(model).attribute(x, target=target)),
        "deconvolution": (ours("deconvolution"), lambda: attr.Deconvolution(model).attribute(x, target=target)),
        "lime (256 samples, per_eval=1)": lime_pair(model, x, target, 256, 1),
        "lime (256 samples, per_eval=64)": lime_pair(model, x, target, 256, 64),
    }
    rows.update(layer_runners(model, x, target))
    if x.ndim == 4:
        rows["guided_grad_cam"] = (
            ours("guided_grad_cam", layer="4"),
            lambda: attr.GuidedGradCam(model, model[4]).attribute(x, target=target),
        )
    return rows


def layer_runners(model, x, target):
    """Layer and neuron attribution: the second hidden layer (MLP) or second convolution (CNN), 20 steps."""
    from captum import attr

    name, neuron = ("2", 7) if x.ndim == 2 else ("3", (3, 2, 2))
    layer = model.get_submodule(name)

    def ours(method, **params):
        return lambda: wm.explain(model, x, method, target=target, layer=name, **params).values

    path = {"n_steps": 20}
    return {
        "layer gradient_x_input": (
            ours("gradient_x_input"),
            lambda: attr.LayerGradientXActivation(model, layer).attribute(x, target=target),
        ),
        "layer integrated_gradients": (
            ours("integrated_gradients", steps=20),
            lambda: attr.LayerIntegratedGradients(model, layer).attribute(x, target=target, **path),
        ),
        "layer_conductance": (
            ours("layer_conductance", steps=20),
            lambda: attr.LayerConductance(model, layer).attribute(x, target=target, **path),
        ),
        "internal_influence": (
            ours("internal_influence", steps=20),
            lambda: attr.InternalInfluence(model, layer).attribute(x, target=target, **path),
        ),
        "neuron_conductance": (
            ours("neuron_conductance", steps=20, neuron=neuron),
            lambda: attr.NeuronConductance(model, layer).attribute(
                x, neuron_selector=neuron, target=target, method="gausslegendre", **path
            ),
        ),
        "neuron integrated_gradients": (
            ours("integrated_gradients", steps=20, neuron=neuron),
            lambda: attr.NeuronIntegratedGradients(model, layer).attribute(x, neuron_selector=neuron, **path),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed rounds; the best of each is reported")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=0.5, help="keep timing each pair at least this long")
    parser.add_argument("--only", default="", help="run only the methods whose label matches this regular expression")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results = []
    for name, (model, x) in models().items():
        target = model(x).argmax(1)
        bg = torch.rand(20, *x.shape[1:], generator=torch.Generator().manual_seed(5)) - (0.5 if x.ndim == 2 else 0)
        for label, (mine, theirs) in runners(model, x, target, bg).items():
            if not re.search(args.only, label):
                continue
            if label.startswith("gradient_shap"):
                diff = gradient_shap_check(model, x, target, bg, 50, 0.0)
            else:
                diff = rel(mine(), theirs())
            t_ours, t_theirs = best_of(mine, theirs, runs=args.runs, min_seconds=args.min_seconds)
            results.append(
                {"model": name, "method": label, "max_rel_diff": diff, "whatmatters_s": t_ours,
                 "captum_s": t_theirs, "ratio": t_ours / t_theirs}
            )  # fmt: skip
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, float32; goal: ratio <= 0.5")
    print(f"{'model':<22}{'method':<34}{'max rel diff':>13}{'wm s':>9}{'captum s':>10}{'ratio':>7}")
    for r in results:
        print(
            f"{r['model']:<22}{r['method']:<34}{r['max_rel_diff']:>13.1e}{r['whatmatters_s']:>9.4f}"
            f"{r['captum_s']:>10.4f}{r['ratio']:>7.2f}"
        )
    import captum

    print(json.dumps({"benchmark": "explain_menu", "captum": captum.__version__, "results": results}))


if __name__ == "__main__":
    main()
