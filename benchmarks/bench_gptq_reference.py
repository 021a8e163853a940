"""whatmatters GPTQ next to llmcompressor's GPTQModifier on SmolLM2-135M: same windows, settings, perplexity code.

* Reference: ``llmcompressor`` 0.14 (``oneshot`` + ``GPTQModifier``, CPU, the "sequential" pipeline). It pins
  transformers <= 5.17 and cannot share the dev environment, so it runs in its own virtual environment, called
  as a subprocess of this script (``--reference-python``); set it up with::

      python3 -m venv /tmp/vref && /tmp/vref/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1

  gptqmodel 7.7 needs torch >= 2.14.1 and transformers >= 5.20.2 (CUDA wheels) and auto-gptq 0.7.1 does not
  import with transformers 5, so llmcompressor is the one that runs on CPU here.
* Data: ``bench_sparsity.smollm2_windows`` (calibration windows of the even Python-docs topics, evaluation
  windows of the odd ones). The float model is written with ``save_pretrained`` and the calibration ids with
  safetensors; the reference reads both, so both sides start from the same weights and tokens.
* Settings on both sides: symmetric integer weights, group size 64 (llmcompressor requires a group size
  that divides every layer's inputs, and SmolLM2's 576 does not divide by 128; see ``--ours-group-size``
  for ours at 128), no act-order, dampening 1 % of the mean Hessian diagonal, 128-column blocks, every
  linear layer of the 30 blocks (``lm_head`` stays float), the layers of a block calibrated together and
  each block on the outputs of the quantized blocks before it.
* Evaluation: both sides hand back dequantized weights, loaded into a copy of the float model and scored
  by the same ``perplexity`` on the same held-out windows. Also reported: the share of weights on which
  the two GPTQ grids agree, and whether the reference's scales equal whatmatters' RTN scales (its
  observer takes min-max scales of the original weights, before GPTQ updates them).
* Time: the ``gptq(...)`` call vs the ``oneshot(...)`` call (model loading excluded), same torch threads.

Run: ``python benchmarks/bench_gptq_reference.py --reference-python /tmp/vref/bin/python`` (about 12 min on
2 busy CPU cores at 1 thread); ``--quick`` for 4 windows and 4 bits only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def log(msg: str) -> None:
    print(f"[bench_gptq_reference] {msg}", file=sys.stderr, flush=True)


def run_reference(args: argparse.Namespace) -> None:
    """In the reference environment: llmcompressor GPTQ, dequantized weights + scales written to ``--out``."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    ids = load_file(args.cal_ids)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": args.group_size}  # fmt: skip
    recipe = GPTQModifier(
        config_groups={"all": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"], actorder=None,
        dampening_frac=args.damp, block_size=128, bypass_divisibility_checks=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    model = oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(ids),
                    max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential")  # fmt: skip
    seconds = time.perf_counter() - t0
    tensors = {}
    for name, module in model.named_modules():
        if hasattr(module, "weight_scale"):
            tensors[f"{name}.weight"] = module.weight.detach().float().contiguous()
            tensors[f"{name}.scales"] = module.weight_scale.detach().float().contiguous()
    save_file(tensors, args.out)
    import llmcompressor

    Path(args.out).with_suffix(".json").write_text(
        json.dumps({"seconds": seconds, "llmcompressor": llmcompressor.__version__, "torch": torch.__version__})
    )


@contextlib.contextmanager
def static_scales() -> Iterator[None]:
    """Diagnostic: whatmatters' GPTQ sweep with llmcompressor's scales, i.e. each group's min-max scale of the
    original weights, fixed before the sweep, instead of the scale of the updated weights at the group's start."""
    import importlib

    from whatmatters.compress import obs

    module = importlib.import_module("whatmatters.compress.gptq")  # the package exports the function gptq

    sweep, quant_params = module.sweep, obs.quant_params

    def fixed_sweep(w: torch.Tensor, h: torch.Tensor, **options: Any) -> Any:
        gs, bits, sym = options["group_size"], options["bits"], options["sym"]
        fixed = iter([quant_params(w[:, c : c + gs].detach().float(), bits, sym) for c in range(0, w.shape[1], gs)])
        obs.quant_params = lambda *_: next(fixed)
        try:
            return sweep(w, h, **options)
        finally:
            obs.quant_params = quant_params

    module.sweep = fixed_sweep
    try:
        yield
    finally:
        module.sweep = sweep


def with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of the float ``model`` with the ``{layer}.weight`` tensors of ``weights``."""
    new = copy.deepcopy(model)
    with torch.no_grad():
        for key, w in weights.items():
            new.get_parameter(key).copy_(w)
    return new


def dequantized(quantized: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``{layer.weight: float weight}`` and ``{layer.scales: scales}`` of the ``QuantLinear`` layers."""
    from whatmatters.compress.packed import QuantLinear

    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    return ({f"{n}.weight": m.dequantize().float() for n, m in layers.items()},
            {f"{n}.scales": m.scales.float() for n, m in layers.items()})  # fmt: skip


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], suffix: str) -> float:
    """Share of entries (over the ``suffix`` tensors) on which ``a`` and ``b`` agree to 1e-5 relative."""
    keys = [k for k in a if k.endswith(suffix)]
    same = sum(int(torch.isclose(a[k], b[k], rtol=1e-5, atol=1e-8).sum()) for k in keys)
    return same / sum(a[k].numel() for k in keys)


def reference(args: argparse.Namespace, folder: Path, bits: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    out = folder / f"reference-{bits}.safetensors"
    command = [args.reference_python, __file__, "--run-reference", "--model", str(folder / "model"),
               "--cal-ids", str(folder / "cal.safetensors"), "--bits", str(bits), "--group-size",
               str(args.group_size), "--threads", str(args.threads), "--damp", str(args.damp),
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the reference failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return load_file(str(out)), json.loads(out.with_suffix(".json").read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--reference-python", default="/tmp/vref/bin/python", help="python of the reference venv; '' skips it"
    )
    parser.add_argument("--cal", type=int, default=16, help="calibration windows")
    parser.add_argument("--eval", type=int, default=32, help="evaluation windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--group-size", type=int, default=64, help="group size on both sides")
    parser.add_argument("--ours-group-size", type=int, default=128, help="also whatmatters alone at this size")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--static-scales", action="store_true", help="also ours with the reference's fixed scales")
    parser.add_argument("--quick", action="store_true", help="4 windows each, 4 bits only")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    for name in ("--model", "--cal-ids", "--out"):  # the reference side
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bits", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--run-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_reference:
        run_reference(args)
        return {}
    return compare(args)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    from bench_sparsity import perplexity, smollm2_windows  # the script's folder is on sys.path
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from whatmatters.compress import gptq
    from whatmatters.text.pretrained import cache_root

    if args.quick:
        args.cal, args.eval = 4, 4
    torch.set_num_threads(args.threads)
    model, cal, ev = smollm2_windows(args.cal, args.eval, args.seq_len)
    folder = Path(tempfile.mkdtemp(prefix="bench_gptq_reference_"))
    model.save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(cache_root() / "smollm2-135m").save_pretrained(folder / "model")  # oneshot wants one
    save_file({"input_ids": cal.contiguous()}, str(folder / "cal.safetensors"))
    rows: list[dict[str, Any]] = [{"method": "fp32", "bits": 32, "group": "-", "ppl": perplexity(model, ev)}]
    log(str(rows[0]))

    def ours(bits: int, method: str, group: int, static: bool = False) -> tuple[dict[str, Any], dict, dict]:
        t0 = time.perf_counter()
        with static_scales() if static else contextlib.nullcontext():
            quantized, _ = gptq(model, bits, data=cal, method=method, group_size=group, damp=args.damp, progress=False)
        seconds = time.perf_counter() - t0
        weights, scales = dequantized(quantized)
        name = f"whatmatters {method.upper()}" + (", llmcompressor's static scales" if static else "")
        row = {"method": name, "bits": bits, "group": group,
               "ppl": perplexity(with_weights(model, weights), ev), "seconds": seconds}  # fmt: skip
        log(str(row))
        rows.append(row)
        return row, weights, scales

    summary = []
    for bits in (4,) if args.quick else (4, 3):
        _, _, rtn_scales = ours(bits, "rtn", args.group_size)
        mine, my_weights, _ = ours(bits, "gptq", args.group_size)
        if args.static_scales:
            ours(bits, "gptq", args.group_size, static=True)
        if not args.reference_python:
            continue
        ref_tensors, meta = reference(args, folder, bits)
        ref_weights = {k: v for k, v in ref_tensors.items() if k.endswith(".weight")}
        ref = {"method": f"llmcompressor {meta['llmcompressor']} GPTQ", "bits": bits, "group": args.group_size,
               "ppl": perplexity(with_weights(model, ref_weights), ev), "seconds": meta["seconds"]}  # fmt: skip
        log(str(ref))
        rows.append(ref)
        if args.ours_group_size and args.ours_group_size != args.group_size:
            ours(bits, "gptq", args.ours_group_size)
        summary.append({
            "bits": bits, "group": args.group_size,
            "ppl_relative_difference": mine["ppl"] / ref["ppl"] - 1,
            "time_ratio_reference_over_ours": ref["seconds"] / mine["seconds"],
            "same_grid_weights": agreement(my_weights, ref_weights, ".weight"),
            "reference_scales_equal_rtn_scales": agreement(rtn_scales, ref_tensors, ".scales"),
        })  # fmt: skip
        log(str(summary[-1]))
    machine = f"{platform.processor() or platform.machine()}, {args.threads} torch threads, CPU"
    result = {"machine": machine, "torch": torch.__version__, "calibration": list(cal.shape),
              "evaluation": list(ev.shape), "rows": rows, "summary": summary}  # fmt: skip
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text + "\n" + table(rows))
    return result


def table(rows: list[dict[str, Any]]) -> str:
    """The README table: method, bits, group, perplexity, seconds."""
    lines = ["| method | bits | group | perplexity | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['bits']} | {r['group']} | {r['ppl']:.2f} | "
              f"{format(r['seconds'], '.0f') if 'seconds' in r else '-'} |" for r in rows]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
