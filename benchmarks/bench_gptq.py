"""GPTQ and SparseGPT on SmolLM2-135M-Instruct: held-out perplexity, real bytes on disk, reload check.

* Data: the split every SmolLM2 benchmark uses (``bench_sparsity.smollm2_windows``): calibration = random
  windows of the even Python-docs topics, evaluation = evenly spaced windows of the odd topics.
* Quantization: round-to-nearest (``method="rtn"``) vs GPTQ at 4 and 3 bits, group size 128, symmetric,
  every linear layer of the 30 blocks (``lm_head``, tied to the embeddings, stays in float). Bytes on disk:
  ``save_quantized`` of the quantized model vs safetensors of the float model (fp32 and fp16). The 4-bit
  GPTQ file is loaded back into a model built from the config and its logits compared with the original's.
* Pruning at 50 %: SparseGPT vs Wanda vs magnitude (per output row), and 2:4 for SparseGPT and Wanda.
* No reference library runs here: ``gptqmodel`` needs torch 2.14 + CUDA wheels and ``llmcompressor`` pins
  transformers <= 5.17, neither installable next to this environment; parity with the paper's algorithm
  is a unit test (tests/test_gptq.py), and ``bench_gptq_reference.py`` runs llmcompressor in its own venv.

Run: ``python benchmarks/bench_gptq.py`` (about 15 min on 2 busy CPU cores); ``--quick`` for a smoke run,
``--nm`` adds 2:4.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from whatmatters.compress import gptq, load_quantized, prune, save_quantized, sparsegpt


def log(msg: str) -> None:
    print(f"[bench_gptq] {msg}", file=sys.stderr, flush=True)


def float_bytes(model: torch.nn.Module, dtype: torch.dtype, folder: Path) -> int:
    from safetensors.torch import save_model

    path = folder / f"float-{str(dtype).split('.')[-1]}.safetensors"
    save_model(copy.deepcopy(model).to(dtype), str(path))
    return path.stat().st_size


def reload_check(model: torch.nn.Module, path: Path, ids: torch.Tensor) -> bool:
    from transformers import AutoModelForCausalLM

    skeleton = AutoModelForCausalLM.from_config(model.config).eval()
    loaded = load_quantized(skeleton, path)
    with torch.no_grad():
        return bool(torch.equal(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cal", type=int, default=16, help="calibration windows")
    parser.add_argument("--eval", type=int, default=8, help="evaluation windows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    parser.add_argument("--nm", action="store_true", help="also 2:4 for SparseGPT and Wanda")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="4 windows each, 4 bits only")
    parser.add_argument("--json", type=str, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.cal, args.eval = 4, 4
    from bench_sparsity import perplexity, smollm2_windows  # the script's folder is on sys.path

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, cal, ev = smollm2_windows(args.cal, args.eval, args.seq_len)
    rows: list[dict[str, Any]] = []
    folder = Path(tempfile.mkdtemp(prefix="bench_gptq_"))
    sizes = {"fp32": float_bytes(model, torch.float32, folder), "fp16": float_bytes(model, torch.float16, folder)}
    t0 = time.perf_counter()
    dense = perplexity(model, ev)
    log(f"dense perplexity {dense:.3f} ({time.perf_counter() - t0:.1f} s per evaluation)")
    rows.append({"kind": "dense", "method": "fp32", "setting": "-", "ppl": dense, "bytes": sizes["fp32"]})
    for bits in (4,) if args.quick else (4, 3):
        for method in ("rtn", "gptq"):
            t0 = time.perf_counter()
            quantized, report = gptq(model, bits, data=cal, method=method, group_size=128, progress=False)
            seconds = time.perf_counter() - t0
            path = folder / f"{method}-{bits}.safetensors"
            size = save_quantized(quantized, path)
            ppl = perplexity(quantized, ev)
            row = {"kind": "quantize", "method": method, "setting": f"{bits}-bit g128", "ppl": ppl, "bytes": size,
                   "seconds": seconds, "average_bits": report.average_bits}  # fmt: skip
            if method == "gptq" and bits == 4:
                row["reload_identical"] = reload_check(quantized, path, ev[:2])
            log(str(row))
            rows.append(row)
    runs = [("sparsegpt", 0.5, "unstructured"), ("wanda", 0.5, "unstructured"), ("magnitude", 0.5, "unstructured")]
    if args.nm:
        runs += [("sparsegpt", None, "2:4"), ("wanda", None, "2:4")]
    for method, sparsity, pattern in runs:
        t0 = time.perf_counter()
        if method == "sparsegpt":
            pruned, _ = sparsegpt(model, sparsity, pattern, data=cal, progress=False)
        else:
            pruned, _ = prune(model, method, sparsity, pattern, data=cal)
        seconds = time.perf_counter() - t0
        setting = "50 %" if pattern == "unstructured" else pattern
        row = {"kind": "prune", "method": method, "setting": setting, "ppl": perplexity(pruned, ev), "seconds": seconds}
        log(str(row))
        rows.append(row)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "torch": torch.__version__,
        "calibration": list(cal.shape),
        "evaluation": list(ev.shape),
        "float_bytes": sizes,
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    print("\n| kind | method | setting | perplexity | bytes on disk | seconds |\n|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['bytes'] / 1e6:.1f} MB" if "bytes" in r else "-"
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        print(f"| {r['kind']} | {r['method']} | {r['setting']} | {r['ppl']:.2f} | {size} | {secs} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
