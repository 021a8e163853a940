"""LRP-QViT mixed-precision quantization: which layer score makes the best bit allocation? Prints JSON and tables.

* Fashion-MNIST ViT (``whatmatters.vision.nets.load_or_train("fashion_vit")``, trained once and cached):
  test accuracy on ``--n-test`` held-out test images at an average of 4 and 6 bits, weights only (W) and
  weights + activations (W/A, activations at the same average bits: per-tensor ranges, post-LayerNorm
  activations channel-wise with clipping), for bit allocations by LRP layer relevance, uniform bits,
  mean |W| (magnitude), empirical Fisher and block influence. The quantized layers are the Linear layers
  of the transformer blocks; the patch embedding and the head stay at 8 bits, outside the budget (as
  ViT PTQ work does). Scores are computed on ``--n-cal`` training images (LRP target: the predicted class).
* SmolLM2-135M-Instruct: the same allocation rule applied weight-only to every Linear layer of the
  decoder (210 layers; ``lm_head`` is tied to the embeddings and stays float), held-out perplexity on
  Python documentation windows (as ``bench_sparsity.py``). LRP relevance is AttnLRP through the Llama
  (``whatmatters.explain.lrp.lm_lrp``: identity rule on RMSNorm and SiLU, uniform rule on the gate x up product and
  the attention matrix products, softmax gradient) for the predicted next token at the last position of
  each calibration window (``lrp``) or for the logits of the actual next tokens at every position
  (``lrp_next``, teacher forcing, as the loss of the other scores); gradient x activation
  (``sum |output * dL/doutput|``, the loss over all positions) is kept for comparison.

There is no reference library for mixed-precision allocation in this environment, so the comparison
is between allocation rules at the same budget (and the float model). Run with 1 thread on a shared
machine: ``PYTHONPATH=. python benchmarks/bench_quantize.py`` (``--skip-lm``: the ViT only; ``--quick``: a
smoke run).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch

from whatmatters.compress.quantize import allocate_bits, average_bits, layer_scores, quantize
from whatmatters.vision import nets
from whatmatters.vision.pretrained import load_fashion_mnist

VIT_BUDGETS = (3, 4, 6)  # 3 added: at 4 and 6 bits every allocation is within noise of the float ViT
LM_BUDGETS = (4, 6)
VIT_SCORES = ("lrp", "uniform", "magnitude", "fisher", "block_influence")
LM_SCORES = ("lrp", "lrp_next", "gradient_activation", "uniform", "magnitude", "fisher")


def log(msg: str) -> None:
    print(f"[bench_quantize] {msg}", file=sys.stderr, flush=True)


def _allocation(scores: dict[str, Any], method: str, budget: int, model: torch.nn.Module, names: list[str]):
    if method == "uniform":
        return dict.fromkeys(names, budget)
    return allocate_bits(scores[method], budget, sizes=model)


# ---------------------------------------------------------------------- ViT
def bench_vit(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, info = nets.load_or_train("fashion_vit", verbose=True)
    log(f"ViT ready in {time.perf_counter() - t0:.1f}s (trained in {info['train_seconds']:.0f}s)")
    test_x, test_y = load_fashion_mnist("test", args.n_test)
    cal_x, _ = load_fashion_mnist("train", 60000)
    cal_x = cal_x[-args.n_cal :]  # the last training images (training used the first 20 000)
    float_acc = nets.accuracy(model, test_x, test_y)
    names = [n for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)]
    pattern = [rf"^{n}$" for n in names]
    fixed = {"patch_embed.0": 8, "patch_embed.2": 8, "head": 8}

    scores, score_s = {}, {}
    for method in args.vit_scores:
        if method == "uniform":
            continue
        t = time.perf_counter()
        scores[method] = layer_scores(model, method, cal_x, pattern, batch_size=64)
        score_s[method] = round(time.perf_counter() - t, 2)
        log(f"{method} scores in {score_s[method]}s")
    rows = []
    for budget in args.vit_budgets:
        for method in args.vit_scores:
            bits = _allocation(scores, method, budget, model, names)
            for mode in ("W", "W/A"):
                acts = budget if mode == "W/A" else None
                qm, report = quantize(model, {**bits, **fixed}, activations=acts, calibration=cal_x[:256])
                acc = nets.accuracy(qm, test_x, test_y)
                rows.append(
                    {
                        "budget": budget,
                        "allocation": method,
                        "mode": mode,
                        "accuracy": round(acc, 4),
                        "block_average_bits": round(average_bits(bits, model), 3),
                        "bits": [bits[n] for n in names],
                        "size_mb": round(report.size_mb, 4),
                    }
                )
                log(f"budget {budget} {method:>16} {mode:>3}: accuracy {acc:.4f}")
    return {
        "model": "FashionViT (4 blocks, dim 64, 7x7 patches), trained by whatmatters.vision.nets",
        "train_info": {k: info.get(k) for k in ("test_accuracy", "train_seconds", "steps", "config")},
        "test_images": len(test_x),
        "calibration_images": len(cal_x),
        "float_accuracy": round(float_acc, 4),
        "float_mb": round(sum(p.numel() for p in model.parameters()) * 4 / 1e6, 4),
        "quantized_layers": names,
        "score_seconds": score_s,
        "results": rows,
    }


# ------------------------------------------------------------------- SmolLM2
def bench_lm(args: argparse.Namespace) -> dict[str, Any]:
    from bench_sparsity import perplexity, smollm2_windows  # the script's folder is on sys.path

    t0 = time.perf_counter()
    model, cal_ids, ev_ids = smollm2_windows(args.lm_cal, args.lm_eval, args.seq_len)
    log(f"SmolLM2 loaded in {time.perf_counter() - t0:.1f}s")
    t = time.perf_counter()
    dense = perplexity(model, ev_ids)
    log(f"dense perplexity {dense:.3f} ({time.perf_counter() - t:.1f}s)")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    scores, score_s = {}, {}
    for method in args.lm_scores:
        if method == "uniform":
            continue
        t = time.perf_counter()
        kind, target = ("lrp", "next") if method == "lrp_next" else (method, None)
        scores[method] = layer_scores(model, kind, cal_ids, None, target=target, batch_size=4)
        score_s[method] = round(time.perf_counter() - t, 1)
        log(f"{method} scores in {score_s[method]}s")
    rows = []
    for budget in args.lm_budgets:
        for method in args.lm_scores:
            bits = _allocation(scores, method, budget, model, names)
            t = time.perf_counter()
            qm, report = quantize(model, bits)
            q_s = time.perf_counter() - t
            ppl = perplexity(qm, ev_ids)
            del qm
            hist = {b: sum(v == b for v in bits.values()) for b in sorted(set(bits.values()))}
            rows.append(
                {
                    "budget": budget,
                    "allocation": method,
                    "perplexity": round(ppl, 3),
                    "ratio_to_dense": round(ppl / dense, 3),
                    "average_bits": round(report.average_bits, 3),
                    "size_mb": round(report.size_mb, 2),
                    "layers_per_bits": hist,
                    "quantize_seconds": round(q_s, 1),
                }
            )
            log(f"budget {budget} {method:>20}: perplexity {ppl:.3f} ({report.average_bits:.2f} bits, {hist})")
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), weight-only",
        "calibration": {"sequences": args.lm_cal, "seq_len": args.seq_len},
        "evaluation": {"sequences": len(ev_ids), "seq_len": args.seq_len},
        "dense_perplexity": round(dense, 3),
        "float_mb": round(sum(p.numel() for p in model.parameters()) * 4 / 1e6, 2),
        "score_seconds": score_s,
        "relevance": (
            "AttnLRP (whatmatters.explain.lrp.lm_lrp); lrp: predicted token at the last position, "
            "lrp_next: all positions"
        ),
        "results": rows,
    }


def markdown(out: dict[str, Any]) -> str:
    lines = []
    vit = out.get("vit")
    if vit:
        lines += [
            f"Fashion-MNIST ViT, test accuracy on {vit['test_images']} images (float {vit['float_accuracy']})",
            "",
            "| avg bits | allocation | W | W/A |",
            "|---|---|---|---|",
        ]
        res = {(r["budget"], r["allocation"], r["mode"]): r["accuracy"] for r in vit["results"]}
        for budget, method in dict.fromkeys((r["budget"], r["allocation"]) for r in vit["results"]):
            lines.append(
                f"| {budget} | {method} | {res[(budget, method, 'W')]:.4f} | {res[(budget, method, 'W/A')]:.4f} |"
            )
    lm = out.get("lm")
    if lm:
        lines += [
            "",
            f"SmolLM2-135M weight-only, held-out perplexity (dense {lm['dense_perplexity']})",
            "",
            "| avg bits | allocation | perplexity | x dense | size MB |",
            "|---|---|---|---|---|",
        ]
        for r in lm["results"]:
            lines.append(
                f"| {r['budget']} | {r['allocation']} | {r['perplexity']:.3f} | {r['ratio_to_dense']:.3f} "
                f"| {r['size_mb']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--n-cal", type=int, default=512)
    parser.add_argument("--lm-cal", type=int, default=8)
    parser.add_argument("--lm-eval", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer images, one budget")
    parser.add_argument("--json", default=None, help="also write the JSON to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.vit_budgets, args.lm_budgets = VIT_BUDGETS, LM_BUDGETS
    args.vit_scores, args.lm_scores = VIT_SCORES, LM_SCORES
    if args.quick:
        args.n_test, args.n_cal, args.lm_cal, args.lm_eval = 300, 64, 2, 4
        args.vit_budgets = args.lm_budgets = (4,)
    out: dict[str, Any] = {
        "benchmark": "bench_quantize",
        "machine": f"{platform.machine()} {platform.system()}, 1 torch thread, shared 2-core machine",
        "torch": torch.__version__,
    }
    t0 = time.perf_counter()
    if not args.skip_vit:
        out["vit"] = bench_vit(args)
    if not args.skip_lm:
        out["lm"] = bench_lm(args)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=1)
    print(text)
    print(markdown(out))
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
