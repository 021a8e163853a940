"""Prefill token pruning and prompt compression on SmolLM2-135M: quality vs tokens kept vs prefill latency.

Data: ``--windows`` windows of ``--context + --cont`` tokens of the Python documentation
(``load_texts("python-docs")``, ``lm_windows``; no method is fitted on any text, so all of it is held out).

1. **Prefill pruning** (``pruning_tokens``): the first ``--context`` tokens are the prompt, prefilled with
   pruning; the next ``--cont`` tokens are then fed on the pruned cache in one teacher-forced call.
   Reported per method and share kept: next-token agreement (argmax at the prompt's last position equals the
   unpruned model's), continuation perplexity, the share of the unpruned (layer x token) work, and the prefill
   latency (CPU time of 1 x ``--context`` tokens, best of ``--repeats``, one torch thread) as a ratio to the
   unpruned prefill timed in the same run (first and last: the two figures show the noise). Methods: FastV at K=2 and
   K=8, cascade (default layers 2, 10, 20, cumulative attention) and random at K=2 and in cascade.
2. **Prompt compression** (``compress_prompt``, surprisal under SmolLM2 itself in one pass and iterative in
   segments of ``--segment`` tokens, and random): the context's
   first ``--context - --suffix`` tokens are compressed 2x / 4x, the last ``--suffix`` tokens (the
   "question") kept whole. Reported: how often the greedy next token, and all ``--greedy`` greedy tokens,
   stay those of the full prompt; the continuation perplexity; the kept share of the prompt. Where ``llmlingua``
   (0.2.2) is installed, its ``PromptCompressor`` runs on the same SmolLM2 at ``rate`` 0.5 / 0.25 (its
   iterative, threshold-based compression; see ``_llmlingua`` for how it runs offline), and its per-token
   scores are compared with ``compress_prompt``'s surprisal (``llmlingua_token_score_max_diff``).

``python benchmarks/bench_token_pruning_lm.py --windows 16 --context 256`` (about 30 min on this shared,
loaded machine); ``--part latency --context 512`` times the prefill only; ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch

from whatmatters.compress import compress_prompt, lm_windows, pruning_tokens
from whatmatters.core import hf
from whatmatters.text.pretrained import load_smollm2, load_texts

KEEPS = (0.75, 0.5, 0.25)
PRUNING = {  # label -> pruning_tokens keyword arguments (without keep)
    "fastv K=2": {"method": "fastv", "at_layers": 2},
    "fastv K=8": {"method": "fastv", "at_layers": 8},
    "cascade 2,10,20": {"method": "cascade"},
    "random K=2": {"method": "random", "at_layers": 2},
    "random 2,10,20": {"method": "random", "at_layers": [2, 10, 20]},
}


def _run(model, windows: torch.Tensor, context: int, settings, keep: float, batch: int):
    """Last prompt logits, continuation NLL per window and (layer x token) work share, in batches."""
    lasts, nlls, work = [], [], []
    for b in range(0, len(windows), batch):
        w = windows[b : b + batch]
        ctx = pruning_tokens(model, keep=keep, **settings) if settings else nullcontext(None)
        with torch.no_grad(), ctx as report:  # the continuation runs on the pruned cache inside the block
            cache = hf.cache_kwargs(model, hf.new_cache(model))
            last = model(w[:, :context], use_cache=True, **cache).logits[:, -1]
            rest = model(w[:, context:-1], use_cache=True, **cache).logits
        logits = torch.cat([last[:, None], rest], 1).float()
        nlls.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, context:], reduction="none").mean(1))
        lasts.append(last)
        work.append(report.layer_tokens if report is not None else 1.0)
    return torch.cat(lasts), torch.cat(nlls), statistics.mean(work)


def _latency(model, ids: torch.Tensor, settings, keep: float, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            ctx = pruning_tokens(model, keep=keep, **settings) if settings else nullcontext(None)
            with ctx:
                start = time.process_time()  # CPU time: less sensitive to other jobs on a shared machine
                model(ids, use_cache=True, **hf.cache_kwargs(model, hf.new_cache(model)))
                times.append(time.process_time() - start)
    return min(times)


def prefill_table(model, windows, args, *, quality: bool = True) -> list[dict[str, Any]]:
    """Per setting: quality (unless ``quality=False``) and prefill CPU seconds; unpruned timed first and last."""
    probe = windows[:1, : args.context]
    base_first = _latency(model, probe, None, 1.0, args.repeats)
    rows = [{"method": "unpruned", "keep": 1.0, "prefill_s": base_first}]
    if quality:
        full_last, full_nll, _ = _run(model, windows, args.context, None, 1.0, args.batch)
        rows[0].update(next_token_agreement=1.0, perplexity=math.exp(full_nll.mean()), layer_token_work=1.0)
    for label, settings in PRUNING.items():
        for keep in KEEPS:
            row = {"method": label, "keep": keep}
            if quality:
                last, nll, work = _run(model, windows, args.context, settings, keep, args.batch)
                agree = float((last.argmax(-1) == full_last.argmax(-1)).float().mean())
                row.update(next_token_agreement=agree, perplexity=math.exp(nll.mean()), layer_token_work=work)
            row["prefill_s"] = _latency(model, probe, settings, keep, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base_last = _latency(model, probe, None, 1.0, args.repeats)
    base = (base_first + base_last) / 2
    for r in rows:
        r["speedup"] = base / r["prefill_s"]
    rows[0]["prefill_s_last"] = base_last
    return rows


def _greedy(model, prompts: list[torch.Tensor], n: int) -> torch.Tensor:
    """Greedy continuations of ``n`` tokens, one prompt at a time (prompts differ in length)."""
    outs = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(
                p[None],
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
            outs.append(out[0, len(p) :])
    return torch.stack(outs)


def _nll_after(model, prompts: list[torch.Tensor], cont: torch.Tensor) -> float:
    nll = []
    with torch.no_grad():
        for p, c in zip(prompts, cont):
            logits = model(torch.cat([p, c])[None]).logits[0, len(p) - 1 : -1].float()
            nll.append(torch.nn.functional.cross_entropy(logits, c))
    return math.exp(float(torch.stack(nll).mean()))


def _llmlingua(model, tok):
    """llmlingua 0.2.2's PromptCompressor on the same SmolLM2, or None where it is not installed.

    Its ``__init__`` downloads tiktoken's GPT-3.5 encoding (it counts tokens with it), which cannot run
    offline: the object is built without ``__init__``, on our model and tokenizer, and counts with SmolLM2's
    tokenizer instead. Its token scores (``get_ppl(granularity="token")``) are the cross-entropy per token.
    """
    try:
        from llmlingua import PromptCompressor
    except ImportError:
        return None

    class Count:
        def encode(self, text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

    pc = PromptCompressor.__new__(PromptCompressor)
    pc.model, pc.tokenizer, pc.device, pc.context_idxs = model, tok, "cpu", []
    pc.model_name, pc.use_llmlingua2, pc.retrieval_model, pc.retrieval_model_name = "smollm2", False, None, None
    pc.open_api_config, pc.cache_bos_num, pc.prefix_bos_num, pc.oai_tokenizer = {}, 10, 100, Count()
    pc.max_position_embeddings = model.config.max_position_embeddings
    return pc


def _prompt_row(model, label, keep, prompts, cont, full, seconds, n_full) -> dict[str, Any]:
    """Greedy agreement with the full prompts' ``full`` continuation, perplexity of ``cont``, tokens kept."""
    greedy = _greedy(model, prompts, full.shape[1])
    return {
        "method": label,
        "keep": keep,
        "prompt_share": sum(len(p) for p in prompts) / n_full,
        "perplexity": _nll_after(model, prompts, cont),
        "next_token_same": float((greedy[:, 0] == full[:, 0]).float().mean()),
        "all_greedy_same": float((greedy == full).all(1).float().mean()),
        "compress_s": seconds / len(prompts),
    }


def prompt_table(model, tok, windows, args) -> tuple[list[dict[str, Any]], float | None]:
    prompts = list(windows[:, : args.context])
    n_full = sum(len(p) for p in prompts)
    cont = windows[:, args.context :]
    full = _greedy(model, prompts, args.greedy)
    rows = [_prompt_row(model, "full prompt", 1.0, prompts, cont, full, 0.0, n_full)]
    variants = {  # label -> compress_prompt keyword arguments
        "surprisal": {"method": "surprisal"},
        f"surprisal, segments of {args.segment}": {"method": "surprisal", "segment": args.segment},
        "random": {"method": "random"},
    }
    for label, kwargs in variants.items():
        for keep in (0.5, 0.25):
            start = time.perf_counter()
            out = compress_prompt(model, prompts, keep=keep, keep_last=args.suffix, progress=False, **kwargs)
            rows.append(_prompt_row(model, label, keep, out.input_ids, cont, full, time.perf_counter() - start, n_full))
            print(json.dumps(rows[-1]), flush=True)
    pc, parity = _llmlingua(model, tok), None
    if pc is not None:
        texts = [tok.decode(p[: -args.suffix]) for p in prompts]
        ours = compress_prompt(model, prompts[:4], keep=1.0).scores.values
        theirs = [pc.get_ppl(t, granularity="token") for t in texts[:4]]
        n = min(len(t) for t in theirs)
        parity = max(float((t[: n - 1] - o[1:n]).abs().max()) for t, o in zip(theirs, ours))
        for rate in (0.5, 0.25):
            start = time.perf_counter()
            kept = [
                pc.compress_prompt([t], rate=rate, use_context_level_filter=False)["compressed_prompt"] for t in texts
            ]
            seconds = time.perf_counter() - start
            ids = [torch.cat([torch.tensor(tok(k)["input_ids"]), p[-args.suffix :]]) for k, p in zip(kept, prompts)]
            rows.append(_prompt_row(model, "llmlingua 0.2.2", rate, ids, cont, full, seconds, n_full))
            print(json.dumps(rows[-1]), flush=True)
            # the same share of the context as llmlingua kept (it misses its rate), compressed by us
            share = (sum(len(i) for i in ids) - args.suffix * len(ids)) / (n_full - args.suffix * len(ids))
            start = time.perf_counter()
            out = compress_prompt(model, prompts, keep=share, keep_last=args.suffix, segment=args.segment)
            seconds = time.perf_counter() - start
            label = f"surprisal, segments of {args.segment}, at llmlingua's share"
            rows.append(_prompt_row(model, label, share, out.input_ids, cont, full, seconds, n_full))
            print(json.dumps(rows[-1]), flush=True)
    return rows, parity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--cont", type=int, default=32)
    parser.add_argument("--suffix", type=int, default=16)
    parser.add_argument("--greedy", type=int, default=8)
    parser.add_argument("--segment", type=int, default=64, help="prompt compression: tokens per iterative segment")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("all", "prefill", "latency", "prompt"), default="all")
    args = parser.parse_args()
    if args.quick:
        args.windows, args.context, args.cont, args.repeats, args.batch = 4, 96, 8, 1, 4
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    windows = lm_windows(
        load_texts("python-docs"), tok, n_sequences=args.windows, seq_len=args.context + args.cont, seed=1
    )
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__,
        "transformers": hf.version(),
        "settings": vars(args),
        "prefill": [],
        "prompt": [],
    }
    if args.part in ("all", "prefill", "latency"):
        result["prefill"] = prefill_table(model, windows, args, quality=args.part != "latency")
    if args.part in ("all", "prompt"):
        result["prompt"], result["llmlingua_token_score_max_diff"] = prompt_table(model, tok, windows, args)
    print(json.dumps(result, indent=1))
    print("\n| method | keep | next-token agreement | perplexity | layer x token work | prefill s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in result["prefill"]:
        q = [f"{r[k]:.3f}" if k in r else "-" for k in ("next_token_agreement", "perplexity", "layer_token_work")]
        print(f"| {r['method']} | {r['keep']:.2f} | {' | '.join(q)} | {r['prefill_s']:.3f} | {r['speedup']:.2f}x |")
    print("\n| method | keep (context) | prompt share | next token same | all greedy same | perplexity | s / prompt |")
    print("|---|---|---|---|---|---|---|")
    for r in result["prompt"]:
        print(
            f"| {r['method']} | {r['keep']:.2f} | {r['prompt_share']:.2f} | {r['next_token_same']:.3f} | "
            f"{r['all_greedy_same']:.3f} | {r['perplexity']:.2f} | {r['compress_s']:.3f} |"
        )


if __name__ == "__main__":
    main()
