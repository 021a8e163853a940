"""Token attribution on MiniLM (+ a linear head): whatmatters vs captum 0.9, same sentences, same numbers.

Integrated gradients (pad baseline at every non-special token, Gauss-Legendre steps) and gradient x input on
the word embeddings, ``wm.explain(model, texts, method=..., tokenizer=tok)`` against captum's
``LayerIntegratedGradients`` / ``LayerGradientXActivation`` on ``embeddings.word_embeddings`` (summed over
the embedding). captum runs all (sentence x step) rows in one call; whatmatters in calls of ``--batch-size``
rows (captum is also timed with ``internal_batch_size`` equal to it). Calls are interleaved; the fastest of
``--runs`` is kept. Prints a table and one JSON line.

    python benchmarks/bench_text_attribution.py [--sentences 32] [--steps 16] [--runs 3] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SENTENCES = [
    "the film was wonderful and moving",
    "terrible food and unbelievably slow service",
    "a quiet, thoughtful book about growing up",
    "I would not recommend this hotel to anyone",
    "the new phone is fast and the battery lasts for days",
    "customer support never answered my emails",
    "an excellent concert with a brilliant orchestra",
    "the plot was predictable and the jokes fell flat",
]


def best_of(fns: dict, runs: int) -> tuple[dict[str, float], dict]:
    """Fastest wall time of each function, calls interleaved so that load changes hit all alike."""
    best, out = dict.fromkeys(fns, float("inf")), {}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

    import whatmatters as wm
    from whatmatters.text.heads import PooledClassifier
    from whatmatters.text.pretrained import load_minilm

    encoder, tok = load_minilm()
    torch.manual_seed(0)
    model = PooledClassifier(encoder, 4).eval()
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(args.sentences)]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    keep = torch.isin(ids, torch.tensor(tok.all_special_ids)) | (mask == 0)
    base = torch.where(keep, ids, torch.full_like(ids, tok.pad_token_id))
    layer = model.encoder.embeddings.word_embeddings

    def forward(i, m):
        return model(input_ids=i, attention_mask=m).logits

    ig_kw = {"target": 1, "additional_forward_args": (mask,), "n_steps": args.steps, "method": "gausslegendre"}
    wm_kw = {"tokenizer": tok, "target": 1, "batch_size": args.batch_size}
    fns = {
        "ig whatmatters": lambda: wm.explain(model, texts, method="ig", baseline="pad", steps=args.steps, **wm_kw),
        "ig captum": lambda: LayerIntegratedGradients(forward, layer).attribute(ids, baselines=base, **ig_kw),
        "ig captum (same batch)": lambda: LayerIntegratedGradients(forward, layer).attribute(
            ids, baselines=base, internal_batch_size=args.batch_size, **ig_kw
        ),
        "gxi whatmatters": lambda: wm.explain(model, texts, method="gradient_x_input", **wm_kw),
        "gxi captum": lambda: LayerGradientXActivation(forward, layer).attribute(
            ids, target=1, additional_forward_args=(mask,)
        ),
    }
    times, out = best_of(fns, args.runs)
    rows = []
    for method, ours, refs in (("integrated_gradients", "ig whatmatters", ("ig captum", "ig captum (same batch)")),
                               ("gradient_x_input", "gxi whatmatters", ("gxi captum",))):  # fmt: skip
        mine = out[ours].values
        for ref in refs:
            theirs = (out[ref].detach().sum(-1) * mask).float()
            rows.append({"method": method, "reference": ref, "whatmatters_s": round(times[ours], 3),
                         "captum_s": round(times[ref], 3), "speedup": round(times[ref] / times[ours], 2),
                         "max_abs_diff": float((mine - theirs).abs().max()),
                         "max_abs_score": float(theirs.abs().max())})  # fmt: skip
    print(f"{'reference':<24}{'whatmatters s':>14}{'captum s':>10}{'speed-up':>10}{'max |diff|':>12}")
    for r in rows:
        print(f"{r['reference']:<24}{r['whatmatters_s']:>14}{r['captum_s']:>10}{r['speedup']:>10}"
              f"{r['max_abs_diff']:>12.2e}")  # fmt: skip
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "sentences": len(texts),
            "steps": args.steps, "tokens": int(ids.shape[1])}  # fmt: skip
    print(json.dumps({"rows": rows, **meta}))


if __name__ == "__main__":
    main()
