"""Generation attribution: whatmatters vs inseq 0.7.1 on SmolLM2-135M, same prompts, same generated tokens.

whatmatters greedily generates ``--new-tokens`` tokens for all prompts in one batched ``generate`` (left
padding) and attributes every generated token to its context in batched forward/backward calls
(``wm.explain(lm, prompts, method=..., tokenizer=tok, generate=N)``; its time includes the generation), and
then attributes the same continuations given as ``target=`` (the same work as inseq's: "given" columns).
inseq attributes the same continuations (``generated_texts=prompt + continuation``, no generation in its
time); for decoder-only models it falls back to batch size 1 ("batched constrained decoding is not
supported"). Both explain the probability of each target token (inseq's default ``attributed_fn``).

Agreement: per prompt and generated token, the Spearman rank correlation of the two methods' scores over
the context positions (saliency: L2 norm of the gradient over the embedding; integrated gradients: the sum),
averaged. Prompts whose continuation inseq re-tokenizes differently are left out of the comparison (counted).
Expected: saliency >= 0.99 (the same gradient); integrated gradients >= 0.95 (inseq's baseline: the UNK
token's embedding at every position but end-of-sequence tokens, whatmatters' ``baseline="unk"`` (special
tokens kept); the same steps and Gauss-Legendre rule).

Needs inseq: ``pip install inseq`` (it is in the ``bench`` extra). Prints a table and one JSON line.

    python benchmarks/bench_text_generation.py [--prompts 32] [--new-tokens 4] [--steps 8] [--repeats 3]

Times are medians of ``--repeats`` paired rounds; speed-ups are the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

PROMPTS = [
    "The capital of France is",
    "My favourite colour is",
    "The opposite of hot is",
    "Water boils at a temperature of",
    "The first month of the year is",
    "A dog is an animal that",
    "The sun rises in the",
    "To make tea, you need",
    "The largest planet is",
    "Python is a programming",
    "In winter it is often",
    "Two plus two equals",
    "The cat sat on the",
    "Paris is a city in",
    "The main ingredient of bread is",
    "Birds can fly because they have",
]


def prompts(n: int) -> list[str]:
    """``n`` prompts: the list above, repeated with a numbered prefix beyond its length."""
    return [PROMPTS[i % len(PROMPTS)] if i < len(PROMPTS) else f"{i}. {PROMPTS[i % len(PROMPTS)]}" for i in range(n)]


def spearman_rows(ours: np.ndarray, theirs: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(ours) == 0 or np.ptp(theirs) == 0:
        return float("nan")
    return float(spearmanr(ours, theirs).statistic)


def inseq_scores(out, reduce: str) -> list[np.ndarray]:
    """Per prompt, ``(generated, context)`` scores of inseq's granular attributions."""
    rows = []
    for seq in out.sequence_attributions:
        a = seq.target_attributions.float()  # (positions, generated, hidden)
        a = a.norm(dim=-1) if reduce == "norm" else a.sum(-1)
        rows.append(a.T.nan_to_num().numpy())
    return rows


def compare(imp, out, tok, reduce: str) -> tuple[float, int, int]:
    """Mean Spearman over (prompt, generated token) pairs and the number of prompts compared / left out."""
    theirs = inseq_scores(out, reduce)
    mask = np.asarray(imp.extra["attention_mask"], bool)
    p = imp.extra["prompt_len"]
    rhos, used, skipped = [], 0, 0
    for i, seq in enumerate(out.sequence_attributions):
        ids = np.asarray(imp.extra["input_ids"][i])[mask[i]]
        inseq_ids = np.asarray(tok.convert_tokens_to_ids([t.token for t in seq.target]))
        if len(ids) != len(inseq_ids) or not (ids == inseq_ids).all():
            skipped += 1
            continue
        used += 1
        ours = imp.values[i].numpy()[:, mask[i]]  # (generated, real positions)
        n_prompt = int(mask[i, :p].sum())
        for t in range(ours.shape[0]):
            ctx = n_prompt + t  # positions before generated token t
            rhos.append(spearman_rows(ours[t, :ctx], theirs[i][t, :ctx]))
    return float(np.nanmean(rhos)) if rhos else float("nan"), used, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="integrated gradients: points on the path (both)")
    parser.add_argument("--methods", nargs="+", default=["saliency", "integrated_gradients"])
    parser.add_argument("--repeats", type=int, default=3, help="paired rounds; medians and the ratios' range")
    args = parser.parse_args()
    try:
        import inseq
    except ImportError:
        print(json.dumps({"skipped": "inseq is not installed: pip install inseq"}))
        return
    import whatmatters as wm
    from whatmatters.text.pretrained import load_smollm2

    warnings.filterwarnings("ignore")
    lm, tok = load_smollm2()
    texts = prompts(args.prompts)
    rows = []
    for method, reduce, params in (
        ("saliency", "norm", {}),
        (
            "integrated_gradients",
            "sum",
            {"steps": args.steps, "rule": "gausslegendre", "baseline": "unk", "delta": False},
        ),
    ):
        if method not in args.methods:
            continue
        model = inseq.load_model(lm, method, tokenizer=tok)
        # captum's default rule: gausslegendre; neither side measures the convergence delta (inseq's default)
        inseq_params = {"n_steps": args.steps} if params else {}
        ours, given, theirs = [], [], []
        for _ in range(args.repeats):  # paired rounds: the three timings of a round run back to back
            start = time.perf_counter()
            imp = wm.explain(lm, texts, method=method, tokenizer=tok, generate=args.new_tokens, **params)
            ours.append(time.perf_counter() - start)
            continuations = [
                [t for t, ok in zip(imp.extra["target_ids"][i], imp.extra["target_mask"][i]) if ok]
                for i in range(len(texts))
            ]
            generated = [text + tok.decode(c) for text, c in zip(texts, continuations)]
            start = time.perf_counter()  # the same work as inseq's: attribute the given continuations
            wm.explain(lm, texts, method=method, tokenizer=tok, target=continuations, **params)
            given.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = model.attribute(texts, generated_texts=generated, show_progress=False, batch_size=len(texts),
                                  **inseq_params)  # fmt: skip
            theirs.append(time.perf_counter() - start)
        ours_s, given_s, theirs_s = (float(np.median(t)) for t in (ours, given, theirs))
        speedups = np.asarray(theirs) / np.asarray(ours)
        given_speedups = np.asarray(theirs) / np.asarray(given)
        rho, used, skipped = compare(imp, out, tok, reduce)
        rows.append({"method": method, "whatmatters_s": round(ours_s, 2), "whatmatters_given_s": round(given_s, 2),
                     "inseq_s": round(theirs_s, 2), "speedup": round(float(np.median(speedups)), 2),
                     "speedup_given": round(float(np.median(given_speedups)), 2),
                     "speedup_given_range": [round(float(given_speedups.min()), 2),
                                             round(float(given_speedups.max()), 2)],
                     "spearman_mean": round(rho, 4),
                     "prompts_compared": used, "prompts_retokenized": skipped})  # fmt: skip
    head = ("method", "ours s (+gen)", "ours s (given)", "inseq s", "speed-up", "(given)", "Spearman", "compared")
    print(f"{head[0]:<22}" + "".join(f"{h:>15}" for h in head[1:]))
    keys = ("whatmatters_s", "whatmatters_given_s", "inseq_s", "speedup", "speedup_given", "spearman_mean",
            "prompts_compared")  # fmt: skip
    for r in rows:
        print(f"{r['method']:<22}" + "".join(f"{r[k]:>15}" for k in keys))
    meta = {"torch": torch.__version__, "inseq": "0.7.1", "threads": torch.get_num_threads(), "prompts": len(texts),
            "new_tokens": args.new_tokens, "steps": args.steps, "repeats": args.repeats}  # fmt: skip
    print(json.dumps({"rows": rows, **meta}))


if __name__ == "__main__":
    main()
