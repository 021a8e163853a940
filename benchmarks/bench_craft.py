"""CRAFT on a Fashion-MNIST CNN: deletion curve of the top concepts vs random ones, timings, NMF vs scikit-learn.

A small CNN is trained here (a few epochs on 10 000 training images), then ``explain(method="craft")`` builds a
concept bank for one class from test images of it. Printed: the class score as 0..k concepts are removed (the
layer rebuilt without them) in CRAFT's order and in random orders (mean of ``--orders``), the time of each
stage, and the torch NMF against scikit-learn's ``NMF(solver="mu")`` on the same crop activations (same start,
same iterations: the same factors; the time ratio). ``--report`` writes the HTML report with the concept gallery.

    python benchmarks/bench_craft.py [--images 32] [--concepts 8] [--report craft.html]
"""

from __future__ import annotations

import argparse
import json
import time

from timing import best_of


def train_cnn(n_train: int, epochs: int):
    import torch
    from torch import nn

    from whatmatters.vision.pretrained import load_fashion_mnist

    x, y = load_fashion_mnist("train", n_train)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for b in torch.cat([torch.randperm(len(x)) for _ in range(epochs)]).split(128):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32, help="test images of the class")
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--target", type=int, default=7, help="Fashion-MNIST class (7: sneaker)")
    parser.add_argument("--orders", type=int, default=20, help="random removal orders averaged")
    parser.add_argument("--report", default=None, help="write the HTML report here")
    args = parser.parse_args()

    import sklearn
    import torch
    from sklearn.decomposition import NMF

    import whatmatters as wm
    from whatmatters.explain.craft import concept_outputs
    from whatmatters.explain.nmf import nmf
    from whatmatters.vision.pretrained import load_fashion_mnist

    torch.set_num_threads(1)  # as scikit-learn's NMF here; also steadier on a shared machine
    start = time.perf_counter()
    model = train_cnn(10_000, 4)
    train_s = time.perf_counter() - start
    xt, yt = load_fashion_mnist("test", 5000)
    accuracy = float((model(xt).argmax(1) == yt).float().mean())
    images = xt[yt == args.target][: args.images]
    k = args.concepts
    start = time.perf_counter()
    imp = wm.explain(model, images, "craft", target=args.target, layer="7", n_concepts=k, crop_size=14, stride=7)
    craft_s = time.perf_counter() - start

    def removal(order):
        keep = torch.ones(k + 1, k)
        keep[:, order] = (torch.arange(k + 1)[:, None] <= torch.arange(k)[None, :]).float()
        return concept_outputs(model, images, imp, keep).mean(0)

    top = removal(torch.arange(k))
    g = torch.Generator().manual_seed(0)
    random = torch.stack([removal(torch.randperm(k, generator=g)) for _ in range(args.orders)]).mean(0)

    # the NMF alone, ours vs scikit-learn's, on the crop activations CRAFT factorized (same start and iterations)
    from whatmatters.core.task import make_task
    from whatmatters.explain.craft import crop_activations, cut_crops
    from whatmatters.explain.layer_sites import layer_site

    task = make_task(model, images, args.target)
    crops, _ = cut_crops(images, 14, 7)
    acts = crop_activations(task, layer_site(task, "7"), crops, False, 4096).mean((2, 3)).double()
    init = (
        torch.rand(len(acts), k, generator=g, dtype=torch.float64),
        torch.rand(k, acts.shape[1], generator=g, dtype=torch.float64),
    )
    ours_s, (_u, h) = best_of(lambda: nmf(acts, k, iters=200, tol=0, start=init), 3)
    ref = NMF(k, solver="mu", init="custom", max_iter=200, tol=0)
    ref_s, _w = best_of(lambda: ref.fit_transform(acts.numpy(), W=init[0].numpy().copy(), H=init[1].numpy().copy()), 3)
    gap = float((h - torch.from_numpy(ref.components_)).abs().max() / h.abs().max())

    result = {
        "machine": "CPU", "torch": torch.__version__, "sklearn": sklearn.__version__,
        "model_accuracy": round(accuracy, 3), "train_s": round(train_s, 1), "images": len(images), "concepts": k,
        "crops": len(crops), "craft_s": round(craft_s, 2),
        "importance": [round(v, 4) for v in imp.values.tolist()],
        "reconstruction_error": round(imp.extra["reconstruction_error"], 4),
        "deletion_top": [round(v, 3) for v in top.tolist()], "deletion_random": [round(v, 3) for v in random.tolist()],
        "auc_top": round(float(top.mean()), 3), "auc_random": round(float(random.mean()), 3),
        "nmf_ours_s": round(ours_s, 4), "nmf_sklearn_s": round(ref_s, 4), "nmf_time_ratio": round(ours_s / ref_s, 3),
        "nmf_max_relative_gap": gap,
    }  # fmt: skip
    print(f"accuracy {accuracy:.3f}; CRAFT on {len(images)} images, {len(crops)} crops, {k} concepts: {craft_s:.2f} s")
    print("concepts removed  " + " ".join(f"{j:6d}" for j in range(k + 1)))
    print("top first         " + " ".join(f"{v:6.2f}" for v in top.tolist()))
    print("random order      " + " ".join(f"{v:6.2f}" for v in random.tolist()))
    print(f"NMF (200 MU iterations): ours {ours_s * 1e3:.1f} ms, scikit-learn {ref_s * 1e3:.1f} ms, gap {gap:.1e}")
    if args.report:
        from whatmatters.report import write_report

        write_report(imp, args.report, title="CRAFT on Fashion-MNIST", data=images, model=model)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
