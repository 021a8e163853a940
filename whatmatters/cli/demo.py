"""A worked example: a small torch MLP on scikit-learn's breast cancer data, scored and compared by several methods.

``whatmatters demo`` (or :func:`run_demo`) trains the model in about a second, explains its
"malignant" output on the held-out samples with every preferred method that is registered, evaluates
them with :func:`whatmatters.evaluate.benchmark` and writes ``report.html``, one Parquet file of
scores per method, the model (``model.pt``) and the held-out data (``data.csv``) to a folder.
The data ships with scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Tried in this order; those not registered are skipped. Gradient methods run because the model is a torch MLP.
PREFERRED = (
    "integrated_gradients",
    "gradient_x_input",
    "ablation",
    "permutation",
    "kernel_shap",
    "shapley_sampling",
    "kan*",
    "lime",
    "smoothgrad",
    "saliency",
    "dhondt",
)
QUICK = ("ablation", "integrated_gradients", "gradient_x_input", "saliency", "permutation")
TARGET = 0  # class 0 of load_breast_cancer is "malignant"
# Path methods start from the training mean, the same reference the deletion/insertion curves use.
METHOD_PARAMS = {"integrated_gradients": {"baseline": "mean"}}


class MLP(nn.Module):
    """Standardizes its inputs with the training mean and scale, then two hidden ReLU layers; outputs logits."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, hidden: int = 32, n_classes: int = 2) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("scale", scale.float())
        d = len(mean)
        self.net = nn.Sequential(
            nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.scale)


def train_mlp(x: torch.Tensor, y: torch.Tensor, *, epochs: int = 300, seed: int = 0) -> MLP:
    """Full-batch Adam with weight decay on cross-entropy; returns the model in eval mode."""
    x = x.float()
    with torch.random.fork_rng():  # seeded initialization; the global random state is left as it was
        torch.manual_seed(seed)
        model = MLP(x.mean(0), x.std(0).clamp_min(1e-8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    return model.eval()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch ops on ``n`` intra-op threads, then restore the previous count.

    The demo's matrices are tiny: one thread is fastest, and several threads spin-wait badly on a
    busy machine (100x slower measured with 2 threads under load).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_methods(quick: bool = False, limit: int | None = None) -> list[str]:
    """Preferred feature-attribution methods that are registered here (those needing model internals excluded)."""
    from whatmatters.core.registry import get_method, methods

    available = set(methods(unit="feature", verb="explain"))
    wanted: list[str] = []
    for name in QUICK if quick else PREFERRED:
        if name == "kan*":  # a KAN scorer: KAN-L1 (pykan's attribution) if registered, else any
            kans = sorted(m for m in available if m.startswith("kan"))
            wanted += ["kan_l1"] if "kan_l1" in kans else kans[:1]
        else:
            wanted.append(name)
    chosen = [m for m in wanted if m in available and get_method(m).needs != "module"]
    limit = limit if limit is not None else (3 if quick else 8)
    return chosen[:limit]


@dataclass
class DemoResult:
    benchmark: Any
    report: Path
    folder: Path
    scores: dict[str, Path]
    accuracy: float
    seconds: float


def run_demo(
    out: str | Path = "whatmatters-demo",
    *,
    quick: bool = False,
    methods: list[str] | None = None,
    seed: int = 0,
    console: Any = None,
) -> DemoResult:
    """Train, explain, evaluate and report; see the module docstring. Returns the paths and the benchmark."""
    with torch_threads(1):
        return _run(Path(out), quick, methods, seed, console)


def _run(folder: Path, quick: bool, methods: list[str] | None, seed: int, console: Any) -> DemoResult:
    import pandas as pd
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    from whatmatters.core.errors import MethodError
    from whatmatters.evaluate.benchmark import benchmark
    from whatmatters.report.html import write_report

    start = time.perf_counter()
    say = console.print if console is not None else (lambda *a, **k: None)
    folder.mkdir(parents=True, exist_ok=True)

    data = load_breast_cancer(as_frame=True)
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.2, stratify=data.target, random_state=seed
    )
    if quick:
        x_test, y_test = x_test.iloc[:24], y_test.iloc[:24]
    model = train_mlp(
        torch.tensor(x_train.to_numpy()), torch.tensor(y_train.to_numpy()), epochs=150 if quick else 300, seed=seed
    )
    with torch.no_grad():
        predicted = model(torch.tensor(x_test.to_numpy(), dtype=torch.float32)).argmax(1).numpy()
    accuracy = float((predicted == y_test.to_numpy()).mean())
    say(
        f"trained an MLP on {len(x_train)} breast cancer samples: held-out accuracy {accuracy:.3f} "
        f"({len(x_test)} samples)",
        markup=False,
    )

    chosen = methods if methods is not None else pick_methods(quick)
    if not chosen:
        raise MethodError("no feature-attribution method is registered; whatmatters.methods() lists them")
    say(f"scoring {x_test.shape[1]} features with {', '.join(chosen)}", markup=False)
    result = benchmark(
        model,
        x_test,
        chosen,
        y=y_test.to_numpy(),
        target=TARGET,
        background=x_train,
        seed=seed,
        method_params={m: p for m, p in METHOD_PARAMS.items() if m in chosen},
        progress=console is not None and not quick,
    )

    scores = {}
    for name, imp in result.importances.items():
        if name != result.reference:
            scores[name] = imp.save(folder / f"{name}.parquet")
    torch.save(model, folder / "model.pt")
    pd.concat([x_test, y_test.rename("target")], axis=1).to_csv(folder / "data.csv", index=False)
    report = write_report(
        result,
        folder / "report.html",
        title="whatmatters demo: what matters for an MLP's 'malignant' output (breast cancer)",
        data=x_test,
        model=model,
    )
    return DemoResult(result, report, folder, scores, accuracy, time.perf_counter() - start)
