"""TCAV vs captum 0.9 (``captum.concept.TCAV``), side by side, on an MLP and a small CNN.

Parity: captum is handed our CAVs (``GivenCAVs``, a captum ``Classifier`` that returns, for the experimental
set ``[concept, random set i]``, the unit CAV of our run i instead of training one), on the same inputs and
target; its sign-count and magnitude scores are compared with ours per concept, layer and run. Timing: each
library end to end with its own CAV fits (captum's ``DefaultClassifier``, its disk cache in a fresh temporary
directory every call; float32, which captum's classifier needs) on the same structure: ``n_random`` runs
per concept plus the random-vs-random null, so the same number of linear fits, activations and layer
gradients. Prints a table and one JSON line.

    PYTHONPATH=. python benchmarks/bench_tcav.py [--runs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_gradient import best_of

import whatmatters as wm

RANDOM_ID = 1000  # captum concept ids: concept k is k, random set i is RANDOM_ID + i


def models(n: int = 32) -> dict[str, tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor], torch.Tensor, list]]:
    """``{label: (model, inputs, concepts, random pool, layers)}``, float64, seeded."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3),
    )  # fmt: skip
    out = {}
    for label, model, shape, layers in (("mlp", mlp, (12,), ["1", "3"]), ("cnn", cnn, (3, 8, 8), ["1", "4"])):
        x = 3 * torch.randn(n, *shape, dtype=torch.float64)
        concepts = {"shifted": torch.randn(20, *shape) + 0.3, "scaled": 2 * torch.randn(20, *shape)}
        pool = torch.randn(60, *shape, dtype=torch.float64)
        out[label] = (model.double().eval(), x, {k: v.double() for k, v in concepts.items()}, pool, layers)
    return out


def captum_concepts(concepts: dict[str, torch.Tensor], pool: torch.Tensor, n_random: int, size: int):
    """captum ``Concept`` objects: ours by index, then ``n_random + 1`` random sets of ``size`` pool rows."""
    from captum.concept import Concept
    from torch.utils.data import DataLoader

    mine = [Concept(k, name, DataLoader(x, batch_size=len(x))) for k, (name, x) in enumerate(concepts.items())]
    g = torch.Generator().manual_seed(0)
    rand = [
        Concept(RANDOM_ID + i, f"random{i}", DataLoader(pool[torch.randperm(len(pool), generator=g)[:size]], size))
        for i in range(n_random + 1)
    ]
    return mine, rand


def given_cavs_classifier(cavs: dict[tuple[int, int], np.ndarray]):
    """A captum ``Classifier`` whose "training" on the set with concept ids ``(a, b)`` returns ``cavs[(a, b)]``
    (a unit vector towards ``a``) as captum's two-row weights ``[v, -v]`` for classes ``[a, b]``."""
    from captum.concept._utils.classifier import Classifier

    class GivenCAVs(Classifier):
        def __init__(self) -> None:
            self.key: tuple[int, int] | None = None

        def train_and_eval(self, dataloader, **kwargs):
            labels = torch.cat([y for _, y in dataloader]).unique().tolist()
            self.key = next(k for k in cavs if sorted(k) == sorted(labels))
            return {"accs": torch.tensor(1.0)}

        def weights(self):
            v = torch.as_tensor(cavs[self.key])
            return torch.stack([v, -v])

        def classes(self):
            return list(self.key)

    return GivenCAVs()


def captum_scores(model, x, target, layer, experimental_sets, classifier, save_path):
    """captum's ``{set key: {"sign_count", "magnitude"}}`` at one layer (its CAV cache under ``save_path``)."""
    from captum.concept import TCAV

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tcav = TCAV(model, [layer], classifier=classifier, save_path=save_path)
        scores = tcav.interpret(x, experimental_sets, target=target)
    return {key: per_layer[layer] for key, per_layer in scores.items()}


def parity(model, x, concepts, pool, layers, target=0, n_random=4):
    """Our TCAV and captum's given our CAVs: ``(ours, theirs)`` arrays of sign counts and magnitudes, each
    ``(concept, layer, run)``; plus our Importance."""
    imp = wm.explain(model, x, "tcav", target=target, concepts=concepts, layers=layers, random=pool, n_random=n_random)
    mine, rand = captum_concepts(concepts, pool, n_random, 20)
    shape = (len(concepts), len(layers), n_random)
    ours = (imp.extra["scores"].reshape(shape), imp.extra["magnitudes"].reshape(shape))
    theirs = (np.empty(shape), np.empty(shape))
    for j, layer in enumerate(layers):
        cavs = {
            (c.id, rand[i + 1].id): imp.extra["cavs"][c.id * len(layers) + j][i] for c in mine for i in range(n_random)
        }
        sets = [[c, rand[i + 1]] for c in mine for i in range(n_random)]
        with tempfile.TemporaryDirectory() as tmp:
            got = captum_scores(model, x, target, layer, sets, given_cavs_classifier(cavs), tmp)
        for c in mine:
            for i in range(n_random):
                score = got[f"{c.id}-{rand[i + 1].id}"]
                theirs[0][c.id, j, i] = float(score["sign_count"][0])
                theirs[1][c.id, j, i] = float(score["magnitude"][0])
    return ours, theirs, imp


def end_to_end(model, x, concepts, pool, layers, cache_root, target=0, n_random=4):
    """Two callables, each the whole TCAV with its own CAV fits: ours and captum's (same runs and null), in
    float32 (captum's ``DefaultClassifier`` fails on float64 activations: its linear model is float32). captum
    writes to a fresh cache directory under ``cache_root`` on every call (removed later, outside the timing)."""
    from captum.concept._utils.classifier import DefaultClassifier

    model, x, pool = copy.deepcopy(model).float(), x.float(), pool.float()
    concepts = {k: v.float() for k, v in concepts.items()}
    mine, rand = captum_concepts(concepts, pool, n_random, 20)
    sets = [[c, rand[i + 1]] for c in [*mine, rand[0]] for i in range(n_random)]

    def ours():
        wm.explain(model, x, "tcav", target=target, concepts=concepts, layers=layers, random=pool, n_random=n_random)

    def theirs():
        from captum.concept import TCAV

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tcav = TCAV(model, layers, classifier=DefaultClassifier(), save_path=tempfile.mkdtemp(dir=cache_root))
            tcav.interpret(x, sets, target=target)

    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import captum

    results = []
    print(f"torch {torch.__version__}, captum {captum.__version__}, threads={args.threads}")
    print("parity in float64 with the same CAVs; times in float32, each library fitting its own")
    print(f"{'model':<6}{'sign counts equal':>19}{'magnitude max rel diff':>24}{'wm s':>9}{'captum s':>10}{'ratio':>7}")
    for label, (model, x, concepts, pool, layers) in models().items():
        (s_ours, m_ours), (s_theirs, m_theirs), _ = parity(model, x, concepts, pool, layers)
        equal = f"{int((s_ours == s_theirs).sum())}/{s_ours.size}"
        diff = float(np.abs(m_ours - m_theirs).max() / np.abs(m_ours).max())
        with tempfile.TemporaryDirectory() as cache_root:
            t_ours, t_theirs = best_of(*end_to_end(model, x, concepts, pool, layers, cache_root), runs=args.runs)
        print(f"{label:<6}{equal:>19}{diff:>24.1e}{t_ours:>9.3f}{t_theirs:>10.3f}{t_ours / t_theirs:>7.2f}")
        results.append(
            {"model": label, "sign_equal": equal, "magnitude_rel": diff, "wm_s": t_ours, "captum_s": t_theirs}
        )
    print(json.dumps({"benchmark": "tcav", "captum": captum.__version__, "results": results}))


if __name__ == "__main__":
    main()
