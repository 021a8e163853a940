"""Token pruning and merging in the project's ViTs: accuracy vs tokens kept vs images/s, in one run.

Models: the trained Fashion-MNIST ViT (``load_or_train("fashion_vit")``: 16 patches + CLS, 4 blocks), its
4x4-patch version (``"fashion_vit_fine"``: 49 patches + CLS, the same blocks), and the trained shapes ViT
(``load_or_train("vit")``: 64 patches, mean pooling, 2 blocks; it has no CLS token, so ``cls_attention`` does
not apply). For every share of patch tokens kept (100 / 75 / 50 / 25 %) and every
token score (``cls_attention``, ``accumulated_attention``, ``token_transition``, ``token_distinctiveness``,
``token_diversity``, ``random_tokens``):

* ``once@0``: ``prune_tokens(..., at_layers=0)``, after the first block's attention (earliest, cheapest), or,
  for ``token_distinctiveness`` and ``token_diversity`` (they read no attention), before it: then every block
  runs on the kept tokens; ``random_tokens/once@0 before attention`` is random at that same place;
* ``once``: ``prune_tokens(..., schedule="once")`` at the default block ``n // 4``;
* ``progressive``: ``prune_tokens(..., schedule="progressive")`` at the default blocks (every ``n // 4``-th
  from ``n // 4``), each keeping ``keep ** (1 / len)``;
* ``tome``: ``merge_tokens(keep=...)`` at the same blocks as ``progressive`` (equal token budget).

Accuracy on ``--n-test`` test images; images/s from CPU time (``time.process_time``) with one torch thread,
the fastest of ``--repeats`` passes over the test set in batches of ``--batch``: end to end, and for the
transformer part alone (blocks, final norm and head on precomputed patch embeddings; the convolutional patch
embedding, which token pruning cannot make cheaper, is about half of these small models' time). The unpruned
model is timed first and last (the two figures show the run's noise); speed-ups are against their mean.
Random rows run with ``--random-seeds`` seeds: their accuracy is the mean, with the seeds' range in the JSON
(``accuracy_seeds``) and the table; their speed is the first seed's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from whatmatters.compress import merge_tokens, prune_tokens
from whatmatters.compress.vit_tokens import vit_layout
from whatmatters.vision.nets import ShapesViT, load_or_train

BUDGETS = (1.0, 0.75, 0.5, 0.25)
SCORES = (
    "cls_attention",
    "accumulated_attention",
    "token_transition",
    "token_distinctiveness",
    "token_diversity",
    "random_tokens",
)


def test_data(arch: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if arch.startswith("fashion_vit"):
        from whatmatters.vision.pretrained import load_fashion_mnist

        return load_fashion_mnist("test", n)
    from whatmatters.vision.shapes import make_shapes

    x, y, _ = make_shapes(n, 32, 1)  # the held-out split load_or_train reports (seed + 1)
    return x, y


def embed(model: ShapesViT, x: torch.Tensor) -> torch.Tensor:
    """The tokens ``ShapesViT.forward`` hands to its first block."""
    tokens = model.patch_embed(x).flatten(2).transpose(1, 2)
    if model.cls_token is not None:
        tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], dim=1)
    return tokens + model.pos_embed


def transformer(model: ShapesViT, tokens: torch.Tensor) -> torch.Tensor:
    """Blocks, final norm and head of ``ShapesViT.forward``."""
    out = model.norm(model.blocks(tokens))
    return model.head(out[:, 0] if model.cls_token is not None else out.mean(1))


def images_per_s(fn: Callable[[int], torch.Tensor], n: int, batch: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Images per CPU second of ``fn(start)`` over batches (fastest of ``repeats`` passes) and its outputs."""
    times, outs = [], []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.process_time()
            outs = [fn(i) for i in range(0, n, batch)]
            times.append(time.process_time() - start)
    return n / min(times), torch.cat(outs)


def evaluate(model: ShapesViT, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Accuracy, images/s end to end and images/s of the transformer part (fastest of ``repeats``)."""
    b, r = args.batch, args.repeats
    speed, logits = images_per_s(lambda i: model(x[i : i + b]), len(x), b, r)
    with torch.no_grad():
        tokens = embed(model, x)
    blocks_speed, logits2 = images_per_s(lambda i: transformer(model, tokens[i : i + b]), len(x), b, r)
    assert torch.equal(logits.argmax(1), logits2.argmax(1))
    return {
        "accuracy": float((logits.argmax(1) == y).float().mean()),
        "images_per_s": speed,
        "blocks_images_per_s": blocks_speed,
    }


def variants(model: torch.nn.Module, keep: float, has_cls: bool) -> dict[str, Callable[[int], Any]]:
    """Name -> ``make(seed)`` of every pruned or merged copy at ``keep`` (the seed matters to random only)."""
    out: dict[str, Callable[[int], Any]] = {}
    for method in SCORES:
        if method == "cls_attention" and not has_cls:
            continue
        out[f"{method}/once@0"] = lambda seed, m=method: prune_tokens(model, m, keep, at_layers=0, seed=seed)
        for schedule in ("once", "progressive"):
            out[f"{method}/{schedule}"] = lambda seed, m=method, s=schedule: prune_tokens(
                model, m, keep, schedule=s, seed=seed
            )
    # distinctiveness and diversity prune before the block's attention (their default); random at the same place
    out["random_tokens/once@0 before attention"] = lambda seed: prune_tokens(
        model, "random_tokens", keep, at_layers=0, before_attention=True, seed=seed
    )
    n = len(vit_layout(model).blocks)
    layers = list(range(n // 4, n, max(1, n // 4)))
    out["tome/progressive"] = lambda seed: merge_tokens(model, None, keep=keep, at_layers=layers)
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    logits = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    return float((logits.argmax(1) == y).float().mean())


def run_model(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    model, info = load_or_train(arch, verbose=True)
    x, y = test_data(arch, args.n_test)
    has_cls = vit_layout(model).n_special > 0
    base_first = evaluate(model, x, y, args)
    rows = []
    for keep in BUDGETS:
        for name, make in variants(model, keep, has_cls).items():
            pruned, report = make(0)
            row = {"method": name, "keep": keep, **evaluate(pruned, x, y, args)}
            if name.startswith("random"):
                seeds = [row["accuracy"]] + [
                    accuracy(make(seed).model, x, y, args.batch) for seed in range(1, args.random_seeds)
                ]
                row["accuracy"], row["accuracy_seeds"] = sum(seeds) / len(seeds), seeds
            row["kept_share"] = report.kept_share
            row["tokens"] = [c[2] for c in report.last_forward]
            rows.append(row)
    base_last = evaluate(model, x, y, args)
    for key in ("images_per_s", "blocks_images_per_s"):
        base = (base_first[key] + base_last[key]) / 2
        for row in rows:
            row[key.replace("images_per_s", "speedup")] = row[key] / base
    return {
        "arch": arch,
        "trained_accuracy": info.get("test_accuracy"),
        "n_test": len(x),
        "blocks": len(vit_layout(model).blocks),
        "baseline": {"first": base_first, "last": base_last},
        "rows": rows,
    }


def _spread(cell: dict[str, Any]) -> str:
    seeds = cell.get("accuracy_seeds")
    return f" ({min(seeds):.3f}-{max(seeds):.3f})" if seeds and len(seeds) > 1 else ""


def table(result: dict[str, Any]) -> str:
    keeps = BUDGETS
    head = "| method | " + " | ".join(f"{int(k * 100)} %: acc, speed-up (blocks)" for k in keeps) + " |"
    lines = [head, "|" + "---|" * (1 + len(keeps))]
    by = {}
    for r in result["rows"]:
        by.setdefault(r["method"], {})[r["keep"]] = r
    for method, cells in by.items():
        parts = [
            f"{c['accuracy']:.3f}{_spread(c)}, {c['speedup']:.2f}x ({c['blocks_speedup']:.2f}x)"
            for c in map(cells.get, keeps)
        ]
        lines.append(f"| {method} | " + " | ".join(parts) + " |")
    b = result["baseline"]
    lines.append(
        f"unpruned: accuracy {b['first']['accuracy']:.3f}; {b['first']['images_per_s']:.0f} / "
        f"{b['last']['images_per_s']:.0f} img/s end to end, {b['first']['blocks_images_per_s']:.0f} / "
        f"{b['last']['blocks_images_per_s']:.0f} img/s blocks only (first / last run)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    models = "fashion_vit,fashion_vit_fine,vit"
    parser.add_argument("--models", default=models, help=f"comma-separated, of {models}")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-seeds", type=int, default=3, help="seeds of the random rows (accuracy: mean)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_model(arch, args) for arch in args.models.split(",")]
    meta = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "timing": "CPU time (process_time), fastest of repeats",
    }
    print(json.dumps({"meta": meta, "results": results}, indent=1))
    for r in results:
        print(f"\n## {r['arch']} ({r['blocks']} blocks, {r['n_test']} test images)\n")
        print(table(r))


if __name__ == "__main__":
    main()
