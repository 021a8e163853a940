"""WAGLE unlearning on SmolLM2-135M-Instruct: forget one Python-docs topic, keep the others.

Forget set: windows of one documentation topic; retain set: windows of other (even) topics; utility:
perplexity on held-out windows of the odd topics. Same loss (gradient difference), steps and learning
rate for every row; WAGLE and the random mask update the same number of weights (``--share`` of the
linear weights of the selected blocks); "full" updates all of them.

Run: ``python benchmarks/bench_unlearn.py`` (a few minutes on a busy 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch

from whatmatters.compress import lm_windows, unlearn
from whatmatters.text.pretrained import load_smollm2, load_texts


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    logits = model(ids, use_cache=False).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return float(nll.exp())


def unlearning_data(n: int = 4, seq_len: int = 64, topic: int = 10) -> tuple[Any, dict[str, torch.Tensor]]:
    """SmolLM2 and its forget / retain / held-out windows (one topic vs even vs odd other topics)."""
    model, tok = load_smollm2()
    docs = load_texts("python-docs")
    return model, {
        "forget": lm_windows(docs[topic : topic + 1], tok, n_sequences=n, seq_len=seq_len, seed=0),
        "retain": lm_windows(docs[20::2], tok, n_sequences=n, seq_len=seq_len, seed=0),
        "held_out": lm_windows(docs[21::2], tok, n_sequences=n, seq_len=seq_len, seed=1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--share", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--layers", default=r"layers\.(2[4-9])\.", help="blocks that may change")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, data = unlearning_data()
    rows = [{"method": "original", "forget_ppl": perplexity(model, data["forget"]),
             "held_out_ppl": perplexity(model, data["held_out"]), "seconds": 0.0}]  # fmt: skip
    for method in ("wagle", "random", "full"):
        t0 = time.perf_counter()
        new, report = unlearn(model, forget=data["forget"], retain=data["retain"], method=method, share=args.share,
                              steps=args.steps, lr=args.lr, layers=args.layers, progress=False)  # fmt: skip
        rows.append({"method": method, "forget_ppl": perplexity(new, data["forget"]),
                     "held_out_ppl": perplexity(new, data["held_out"]), "updated": report.n_updated,
                     "seconds": time.perf_counter() - t0})  # fmt: skip
        print(rows[-1], flush=True)
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU", "settings": vars(args),
              "rows": rows}  # fmt: skip
    print(json.dumps(result, indent=1))
    print("\n| method | weights updated | forget perplexity | held-out perplexity | seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r.get('updated', '-')} | {r['forget_ppl']:.1f} | {r['held_out_ppl']:.1f} | "
              f"{r['seconds']:.0f} |")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
