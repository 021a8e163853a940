"""Structured removal on SmolLM2-135M: parameters, held-out perplexity and CPU latency per score.

Heads (GQA: whole KV groups or the same number of query heads per group), MLP neurons and whole blocks
are removed with ``prune_structured`` using each score (random scores as the baseline). Calibration:
random windows of the even Python-documentation topics; evaluation: windows of the odd (held-out)
topics, as ``bench_sparsity.py`` (whose helpers are reused). Latency: median of repeated forward passes,
batch 1 x 128 tokens, 1 thread. Prints JSON and a table; ratios are to the dense model.

Defaults (16 calibration windows, 8 skip-loss windows, 8 evaluation windows of 128 tokens, 3 latency repeats)
took 403 s on a loaded 2-core CPU. Run: ``python benchmarks/bench_structured.py [--out FILE]``
(``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sparsity import perplexity, smollm2_windows

from whatmatters.compress import calibrate, score
from whatmatters.compress.remove import n_parameters, prune_structured
from whatmatters.core.importance import Importance


def log(msg: str) -> None:
    print(f"[bench_structured] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def latency(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    model(ids, use_cache=False)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_like(imp: Importance, seed: int = 0) -> Importance:
    g = torch.Generator().manual_seed(seed)
    return Importance(values=torch.rand(imp.values.shape, generator=g), unit=imp.unit, names=imp.names,
                      per_sample=False, method="random")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cal", type=int, default=16, help="calibration windows (activations, gradients)")
    ap.add_argument("--skip-cal", type=int, default=8, help="windows for the layer-skip loss (one pass per block)")
    ap.add_argument("--eval", type=int, default=8, help="held-out evaluation windows")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="latency repeats (median)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=str, default="")
    args = ap.parse_args()
    if args.quick:
        args.cal, args.skip_cal, args.eval, args.repeats = 4, 2, 2, 2
    torch.set_num_threads(1)
    torch.manual_seed(0)

    start = t0 = time.perf_counter()
    model, cal_ids, ev_ids = smollm2_windows(args.cal, args.eval, args.seq_len)
    lat_ids = ev_ids[:1]
    log(f"loaded in {time.perf_counter() - t0:.1f}s")
    dense_ppl = perplexity(model, ev_ids)
    dense_lat = latency(model, lat_ids, args.repeats)
    dense_params = n_parameters(model)
    log(f"dense: perplexity {dense_ppl:.3f}, latency {dense_lat * 1e3:.1f} ms, {dense_params:,} parameters")

    cal = calibrate(model, cal_ids, batch_size=8)  # one Calibration shared by every score but the skip loss
    scores: dict[str, Importance] = {}
    seconds: dict[str, float] = {}
    for method in ("head_mask_gradient", "flap_head", "neuron_activation", "neuron_taylor", "flap_neuron",
                   "block_influence"):  # fmt: skip
        t0 = time.perf_counter()
        scores[method] = score(model, method, data=cal)
        seconds[method] = time.perf_counter() - t0
        log(f"score {method}: {seconds[method]:.1f}s")
    t0 = time.perf_counter()
    scores["layer_skip_loss"] = score(model, "layer_skip_loss", data=cal_ids[: args.skip_cal], batch_size=8)
    seconds["layer_skip_loss"] = time.perf_counter() - t0
    log(f"score layer_skip_loss: {seconds['layer_skip_loss']:.1f}s")
    for unit, ref in (("head", "head_mask_gradient"), ("neuron", "flap_neuron"), ("layer", "block_influence")):
        scores[f"random_{unit}"] = random_like(scores[ref])

    n_layers = len(scores["block_influence"].values)
    runs: list[tuple[str, str, float, dict[str, Any]]] = []
    for m in ("random_head", "head_mask_gradient", "flap_head"):
        runs += [
            ("KV groups 1/3 (uniform)", m, 1 / 3, {"gqa": "groups"}),
            ("query heads 1/3 per group (uniform)", m, 1 / 3, {"gqa": "heads"}),
        ]
    for a in (0.25, 0.5):  # FLAP scores are standardized per block in global allocation (FLAP's structure search)
        runs += [(f"KV groups {int(a * 100)}% (global)", m, a, {"gqa": "groups", "allocation": "global"})
                 for m in ("flap_head", "head_mask_gradient")]  # fmt: skip
    for m in ("random_neuron", "neuron_activation", "neuron_taylor", "flap_neuron"):
        runs += [(f"neurons {int(a * 100)}% (uniform)", m, a, {}) for a in (0.25, 0.5)]
    for m in ("random_layer", "block_influence", "layer_skip_loss"):
        runs += [(f"{k} of {n_layers} layers", m, k / n_layers, {}) for k in (4, 8)]
    if args.quick:
        runs = runs[::5]
    results = []
    for what, method, amount, kw in runs:
        try:
            pruned, report = prune_structured(model, scores[method], amount, **kw)
        except ValueError as err:
            results.append({"removal": what, "score": method, "error": str(err)})
            log(f"{what:>36} {method:>20}: {err}")
            continue
        ppl = perplexity(pruned, ev_ids)
        lat = latency(pruned, lat_ids, args.repeats)
        row = {
            "removal": what,
            "score": method,
            "parameters": report.n_parameters_after,
            "param_ratio": round(report.parameter_ratio, 4),
            "perplexity": round(ppl, 3),
            "ppl_ratio": round(ppl / dense_ppl, 3),
            "latency_ms": round(lat * 1e3, 2),
            "latency_ratio": round(lat / dense_lat, 3),
            "compensated": report.compensated,
            "standardized": report.standardized,
            "from_pretrained": report.from_pretrained,
        }
        results.append(row)
        log(
            f"{what:>36} {method:>20}: params x{row['param_ratio']:.3f} ppl {ppl:.2f} latency x{row['latency_ratio']}"
            f" ({time.perf_counter() - start:.0f}s)"
        )
        del pruned

    out = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), 30 layers, 9 q heads / 3 KV heads",
        "machine": f"{platform.processor() or platform.machine()}, 1 torch thread, shared with other jobs",
        "calibration": {"windows": args.cal, "seq_len": args.seq_len, "skip_loss_windows": args.skip_cal},
        "evaluation": {"windows": len(ev_ids), "seq_len": args.seq_len, "text": "python-docs odd topics"},
        "dense": {
            "parameters": dense_params,
            "perplexity": round(dense_ppl, 3),
            "latency_ms": round(dense_lat * 1e3, 2),
        },
        "score_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(
        "\n| removal | score | params (x dense) | ppl | ppl x | latency ms | latency x |\n|---|---|---|---|---|---|---|"
    )
    print(f"| dense | - | {dense_params:,} | {dense_ppl:.2f} | 1.00 | {dense_lat * 1e3:.1f} | 1.00 |")
    for r in results:
        if "error" in r:
            print(f"| {r['removal']} | {r['score']} | error: {r['error'][:60]} | | | | |")
        else:
            params = f"{r['parameters']:,} ({r['param_ratio']:.3f})"
            label = r["score"] + (" (standardized)" if r["standardized"] else "")
            print(
                f"| {r['removal']} | {label} | {params} | {r['perplexity']:.2f} | {r['ppl_ratio']:.2f}"
                f" | {r['latency_ms']:.1f} | {r['latency_ratio']:.2f} |"
            )


if __name__ == "__main__":
    main()
