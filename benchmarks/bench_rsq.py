"""RSQ vs GPTQ vs RTN on SmolLM2-135M-Instruct: held-out perplexity at 4 and 3 bits, group 128.

Same data split as ``bench_gptq`` (``bench_sparsity.smollm2_windows``: calibration windows from the even
Python-docs topics, evaluation windows from the odd ones) and the same calibration for every method. Rows:
RTN and GPTQ on the original weights; rotated RTN and rotated GPTQ (QuaRot-style fused Hadamard rotations,
uniform tokens); RSQ with attention-concentration token weights (``tokens="attention"``) and with
position weights (``tokens="first"``). Also the weights' mean excess kurtosis before and after rotation
(outliers are what rotation removes).

No reference library runs here: ``gptqmodel`` needs torch 2.14.1 with CUDA wheels, ``llmcompressor`` pins
transformers <= 5.17 (both would replace this environment's torch / transformers), and ``auto-gptq`` 0.7.1
installs (``pip install --target``) but fails to import under transformers 5.x (``no_init_weights``).

Run: ``python benchmarks/bench_rsq.py`` (about 20 min on 1 thread of a busy 2-core CPU); ``--quick`` smoke run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch

from whatmatters.compress import gptq
from whatmatters.compress.linear import select_layers
from whatmatters.compress.rotation import rotate
from whatmatters.compress.rsq import rsq


def log(msg: str) -> None:
    print(f"[bench_rsq] {msg}", file=sys.stderr, flush=True)


def kurtosis(model: torch.nn.Module) -> float:
    """Mean excess kurtosis of the rows of every linear layer (heads left out)."""
    values = []
    for layer in select_layers(model).values():
        w = layer.weight.detach().float()
        z = (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True)
        values.append(float((z**4).mean() - 3))
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cal", type=int, default=16, help="calibration windows")
    parser.add_argument("--eval", type=int, default=8, help="evaluation windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="4 windows each, 3 bits, blocks 0-1 only")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the rows, by name")
    args = parser.parse_args(argv)
    from bench_sparsity import perplexity, smollm2_windows  # the script's folder is on sys.path

    torch.set_num_threads(args.threads)
    if args.quick:
        args.cal, args.eval = 4, 4
    layers = r"layers\.[01]\." if args.quick else None
    model, cal, ev = smollm2_windows(args.cal, args.eval, args.seq_len)
    rotated, _ = rotate(model)
    stats = {"kurtosis": kurtosis(model), "kurtosis_rotated": kurtosis(rotated)}
    log(str(stats))
    dense = perplexity(model, ev)
    rows: list[dict[str, Any]] = [{"method": "fp32", "bits": "-", "ppl": dense, "seconds": 0.0}]
    runs = {
        "RTN": lambda b: gptq(model, b, method="rtn", layers=layers),
        "GPTQ": lambda b: gptq(model, b, data=cal, layers=layers, progress=False),
        "rotated RTN": lambda b: rsq(model, b, data=cal, tokens="uniform", method="rtn", layers=layers),
        "rotated GPTQ": lambda b: rsq(model, b, data=cal, tokens="uniform", layers=layers, progress=False),
        "RSQ (attention)": lambda b: rsq(model, b, data=cal, tokens="attention", layers=layers, progress=False),
        "RSQ (first tokens)": lambda b: rsq(model, b, data=cal, tokens="first", layers=layers, progress=False),
    }
    chosen = [m for m in runs if args.methods is None or m in args.methods]
    for bits in [3] if args.quick else args.bits:
        for name in chosen:
            run = runs[name]
            t0 = time.perf_counter()
            quantized, _ = run(bits)
            seconds = time.perf_counter() - t0
            row = {"method": name, "bits": bits, "ppl": perplexity(quantized, ev), "seconds": seconds}
            log(str(row))
            rows.append(row)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "torch": torch.__version__,
        "windows": {"calibration": list(cal.shape), "evaluation": list(ev.shape)},
        **stats,
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    print("\n| method | bits | perplexity | seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bits']} | {r['ppl']:.2f} | {r['seconds']:.0f} |")
    return result


if __name__ == "__main__":
    main()
