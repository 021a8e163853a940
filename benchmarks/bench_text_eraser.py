"""ERASER faithfulness of token attribution methods, in one run: a fine-tuned classifier and a generative LM.

(a) ``classifier``: the project's MiniLM news classifier (``load_news_classifier``: 5 topics of 20 Newsgroups),
on ``--docs`` held-out test documents truncated to ``--max-length`` tokens, target = the predicted topic,
``[CLS]``/``[SEP]`` protected. (b) ``generation``: SmolLM2-135M-Instruct on ``--prompts`` prompts of
``--prompt-tokens`` tokens cut from the Python documentation, target = the greedy next token.

For every method: comprehensiveness (the probability drop when the top 1/5/10/20/50 % tokens are deleted),
its AOPC, sufficiency AOPC (drop when only those are kept; lower is better), Soft-NC and Soft-NS (higher is
better), the method's seconds, and the pairwise Spearman correlation of the methods' token rankings.

Methods are a list of names: ``random`` (seeded uniform scores), ``leave_one_out`` (the probability drop when
each token alone is deleted, through ``evaluate.text.removed``), ``reagent`` (generation only), ``attnlrp``
(``explain.lrp.token_relevance``, Llama-family LMs only); any other name is run as
``wm.explain(model, texts, method=name, tokenizer=tokenizer, target=target)`` and must give scores aligned
to the same padded ``input_ids``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from whatmatters.core.token_outputs import target_probs
from whatmatters.evaluate.text import LEVELS, disagreement, eraser, removed, soft_eraser

CLASSIFIER_METHODS = (
    "random", "leave_one_out", "saliency", "gradient_x_input", "integrated_gradients", "occlusion",
    "attention_rollout",
)  # fmt: skip
GENERATION_METHODS = (
    "random", "leave_one_out", "reagent", "attnlrp", "saliency", "gradient_x_input", "integrated_gradients",
    "attention_rollout",
)  # fmt: skip


def random_scores(model, batch: dict[str, Any], seed: int = 0) -> torch.Tensor:
    return torch.rand(batch["input_ids"].shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def leave_one_out(model, batch: dict[str, Any]) -> torch.Tensor:
    """``p(y|x) - p(y|x without token i)`` for every scorable token, all rows in batches."""
    ids, mask, target = batch["input_ids"], batch["attention_mask"], batch["target"]
    n, length = ids.shape
    drop = torch.eye(length, dtype=torch.bool).repeat(n, 1)
    rows = removed(ids.repeat_interleave(length, 0), mask.repeat_interleave(length, 0), drop, "delete",
                   causal=batch["causal"])  # fmt: skip
    rows_mask = rows.pop("attention_mask")
    full = target_probs(model, target, mask, input_ids=ids)
    part = target_probs(model, target.repeat_interleave(length), rows_mask, input_ids=rows["input_ids"])
    scores = (full[:, None] - part.reshape(n, length)).double()
    return scores.masked_fill(~batch["scorable"], 0.0)


def reagent_scores(model, batch: dict[str, Any], args: argparse.Namespace) -> torch.Tensor:
    from whatmatters.explain.reagent import reagent

    imp = reagent(model, batch["input_ids"], batch["target"], attention_mask=batch["attention_mask"],
                  probes=args.probes, max_steps=args.max_steps, min_steps=args.min_steps)  # fmt: skip
    batch["reagent_extra"] = imp.extra
    return imp.values


def attnlrp_scores(model, batch: dict[str, Any]) -> torch.Tensor:
    from whatmatters.explain.lrp import token_relevance

    return token_relevance(model, batch["input_ids"], batch["target"], attention_mask=batch["attention_mask"]).values


def registered(name: str) -> Callable[..., torch.Tensor]:
    def run(model, batch: dict[str, Any]) -> torch.Tensor:
        import whatmatters as wm

        ids, mask, target = batch["input_ids"], batch["attention_mask"], batch["target"]
        if not batch["causal"]:  # the benchmark's own token ids, so every method scores the same tokens
            return wm.explain(model, ids, method=name, attention_mask=mask, target=target).values
        imp = wm.explain(model, ids, method=name, attention_mask=mask, target=target[:, None].tolist())
        return imp.values[:, 0, : ids.shape[1]]  # the one target token, scored over the prompt

    return run


def method(name: str, args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    local = {
        "random": random_scores,
        "leave_one_out": leave_one_out,
        "reagent": lambda m, b: reagent_scores(m, b, args),
        "attnlrp": attnlrp_scores,
    }
    return local.get(name) or registered(name)


def classifier_batch(args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from whatmatters.text.classifier import load_news_classifier, news_data

    clf = load_news_classifier()
    per_class = max(1, args.docs // len(clf.info["categories"]))
    texts, _ = news_data(clf.info["categories"], "test", per_class)  # held out from training
    enc = clf.tokenizer(texts, padding=True, truncation=True, max_length=args.max_length,
                        return_special_tokens_mask=True, return_tensors="pt")  # fmt: skip
    special = enc["special_tokens_mask"].bool()
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "protected": special,
             "scorable": (enc["attention_mask"] == 1) & ~special, "texts": texts, "tokenizer": clf.tokenizer,
             "causal": False}  # fmt: skip
    with torch.no_grad():
        batch["target"] = clf.model(enc["input_ids"], enc["attention_mask"]).logits.argmax(1)
    return clf.model, batch, {"model": "MiniLM-L6 + linear head", "accuracy": clf.accuracy, "docs": len(texts)}


def generation_batch(args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from whatmatters.core.token_outputs import batched_logits
    from whatmatters.text.pretrained import load_smollm2, load_texts

    model, tokenizer = load_smollm2()
    rows = []
    for doc in load_texts("python-docs"):
        ids = tokenizer(" ".join(doc.split()[:80]))["input_ids"]
        if len(ids) >= args.prompt_tokens:
            rows.append(ids[: args.prompt_tokens])
        if len(rows) == args.prompts:
            break
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    target = batched_logits(model, mask, 16, input_ids=ids).argmax(-1)
    batch = {"input_ids": ids, "attention_mask": mask, "protected": None, "scorable": mask == 1, "causal": True,
             "texts": tokenizer.batch_decode(ids), "tokenizer": tokenizer, "target": target}  # fmt: skip
    return model, batch, {"model": "SmolLM2-135M-Instruct", "prompts": len(rows), "tokens": args.prompt_tokens}


def evaluate(model, batch: dict[str, Any], names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    rows, scores = {}, {}
    for name in names:
        start = time.perf_counter()
        try:
            values = method(name, args)(model, batch)
        except Exception as err:  # a method that does not apply to this model is reported, not fatal
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        seconds = time.perf_counter() - start
        scores[name] = values
        kw = {"attention_mask": batch["attention_mask"], "protected": batch["protected"]}
        res = eraser(model, batch["input_ids"], values, batch["target"], **kw)
        soft = soft_eraser(model, batch["input_ids"], values, batch["target"], samples=args.samples, **kw)
        rows[name] = {
            "seconds": seconds,
            "comprehensiveness": res.comprehensiveness.mean(0).tolist(),
            "aopc_comprehensiveness": float(res.aopc_comprehensiveness.mean()),
            "aopc_sufficiency": float(res.aopc_sufficiency.mean()),
            "soft_nc": float(torch.nanmean(soft["soft_nc"])),
            "soft_ns": float(torch.nanmean(soft["soft_ns"])),
        }
        print(f"  {name}: {json.dumps(rows[name])}", flush=True)
    agree = disagreement(scores, batch["attention_mask"], protected=batch["protected"]) if len(scores) > 1 else None
    spearman = agree["spearman"].tolist() if agree else None
    return {"methods": rows, "spearman": {"methods": list(scores), "matrix": spearman}}


def table(result: dict[str, Any]) -> str:
    levels = " | ".join(f"comp@{q:.0%}" for q in LEVELS)
    lines = [f"| method | {levels} | AOPC comp ↑ | AOPC suff ↓ | Soft-NC ↑ | Soft-NS ↑ | seconds |",
             "|---" * (len(LEVELS) + 6) + "|"]  # fmt: skip
    for name, row in result["methods"].items():
        if "error" in row:
            lines.append(f"| {name} | {row['error'][:80]} |")
            continue
        comp = " | ".join(f"{c:.3f}" for c in row["comprehensiveness"])
        lines.append(f"| {name} | {comp} | {row['aopc_comprehensiveness']:.3f} | {row['aopc_sufficiency']:.3f} | "
                     f"{row['soft_nc']:.3f} | {row['soft_ns']:.3f} | {row['seconds']:.1f} |")  # fmt: skip
    agree = result["spearman"]
    if agree["matrix"]:
        names = agree["methods"]
        lines += ["", "Spearman between methods' token rankings:", "", "| | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]  # fmt: skip
        lines += [f"| {a} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for a, row in zip(names, agree["matrix"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("classifier", "generation", "both"), default="both")
    parser.add_argument("--classifier-methods", nargs="+", default=list(CLASSIFIER_METHODS))
    parser.add_argument("--generation-methods", nargs="+", default=list(GENERATION_METHODS))
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2, help="random masks per row for Soft-NC / Soft-NS")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"machine": f"{platform.machine()}, {args.threads} torch threads, CPU",
                           "torch": torch.__version__, "args": vars(args)}  # fmt: skip
    parts = {"classifier": (classifier_batch, args.classifier_methods),
             "generation": (generation_batch, args.generation_methods)}  # fmt: skip
    for part, (build, names) in parts.items():
        if args.part not in (part, "both"):
            continue
        print(f"{part} ...", flush=True)
        model, batch, info = build(args)
        out[part] = {**info, **evaluate(model, batch, names, args)}
        if "reagent_extra" in batch:
            out[part]["reagent"] = {"steps": batch["reagent_extra"]["steps"],
                                    "stopped": sum(batch["reagent_extra"]["stopped"]) / args.prompts}  # fmt: skip
    print(json.dumps(out, indent=1))
    for part in parts:
        if part in out:
            print(f"\n### {part}: {out[part]['model']}\n\n{table(out[part])}")


if __name__ == "__main__":
    main()
