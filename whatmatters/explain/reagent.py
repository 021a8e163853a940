"""ReAGent (Zhao & Shan 2024): model-agnostic recursive token attribution for generative LMs.

Each prompt is probed ``probes`` times in parallel. At every step a random ``ratio`` of each probe's context
tokens is replaced by plausible tokens, the fall ``delta = p(target | x) - p(target | x')`` of the target's
probability is measured, and every token's logit-scale score moves by ``logit(0.5 + 0.5 * delta)`` if it
was replaced and by the opposite if it was kept. A probe stops when its target is back among the ``top_k``
predictions while only its ``keep`` most important tokens are kept (all others replaced), or after
``max_steps``. The importance of a prompt is the softmax of the scores, averaged over its stopped probes.

Replacements come from a causal LM (``replacer``, default the explained model itself): the candidates for
position ``i`` are its ``candidates`` most likely next tokens after the original prefix ``x[:i]`` (the first
token's: the prompt's mean next-token distribution), the original token excluded. No word lists, no
download. All prompts and probes share one forward pass per step (chunks of ``batch`` rows).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from whatmatters.core import hf
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.fractions import whole
from whatmatters.core.importance import Importance
from whatmatters.core.state import preserved, require_eval
from whatmatters.core.task import progress_bar
from whatmatters.core.text import TextTask, text_scorer
from whatmatters.core.token_outputs import batched_logits, check_mask, check_target, positions, probability

_EPS = 1e-6


def check_replacer(model: nn.Module, replacer: nn.Module) -> None:
    """``ModelError`` unless the replacement LM has the explained model's vocabulary."""
    mine, theirs = hf.vocab_size(model), hf.vocab_size(replacer)
    if mine is None or theirs is None or mine != theirs:
        raise ModelError(
            f"the replacer's vocabulary ({theirs} token ids) differs from the model's ({mine}); "
            "give a replacement LM that uses the explained model's tokenizer (or replacer=None: the model itself)"
        )


@torch.no_grad()
def replacement_candidates(
    replacer: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, *, candidates: int, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(n, L, m)`` and their probabilities: the replacer's likeliest tokens at each position."""
    ids_out, probs_out = [], []
    rows = max(1, min(batch, 2**24 // max(1, input_ids.shape[1] * (hf.vocab_size(replacer) or 1))))
    for s in range(0, len(input_ids), rows):
        ids, m = input_ids[s : s + rows], mask[s : s + rows]
        out = replacer(input_ids=ids, attention_mask=m, position_ids=positions(m))
        logits = out.logits if hasattr(out, "logits") else out[0]
        if logits.ndim != 3:
            raise ModelError("the replacer must be a causal LM returning logits (b, seq_len, vocab)")
        probs = logits.float().softmax(-1) * m[..., None]
        first = (probs.sum(1) / m.sum(1, keepdim=True)).unsqueeze(1)  # prompt's mean next-token distribution
        shifted = torch.cat([first, probs[:, :-1]], 1)
        starts = m.cumsum(-1) == 1  # each row's first real token has no real prefix
        shifted = torch.where(starts[..., None], first.expand_as(shifted), shifted)
        shifted.scatter_(-1, ids[..., None], 0.0)  # never "replace" a token by itself
        top = shifted.topk(min(candidates, shifted.shape[-1] - 1), dim=-1)
        ids_out.append(top.indices)
        probs_out.append(top.values.clamp_min(1e-12))
    return torch.cat(ids_out), torch.cat(probs_out)


def _sample(cand_ids: torch.Tensor, cand_p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One candidate per position, drawn by its probability: ``(R, L)``."""
    rows, length, m = cand_ids.shape
    pick = torch.multinomial(cand_p.reshape(-1, m).cpu(), 1, generator=gen).to(cand_ids.device)
    return cand_ids.reshape(-1, m).gather(1, pick).reshape(rows, length)


def _softmax_real(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(mask == 0, float("-inf")).softmax(-1)


def _check_options(ratio: Any, top_k: Any, keep: Any, max_steps: Any, min_steps: Any, probes: Any, **counts: Any):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < float(ratio) < 1:
        raise InputError(
            f"ratio must be a number in (0, 1) (the share of context tokens replaced per step), got {ratio!r}"
        )
    checked = {
        "top_k": whole(top_k, "top_k", meaning="the stop rule's number of top predictions"),
        "keep": whole(keep, "keep", meaning="tokens kept by the stop rule"),
        "max_steps": whole(max_steps, "max_steps"),
        "min_steps": whole(min_steps, "min_steps", minimum=0),
        "probes": whole(probes, "probes", meaning="parallel probes per prompt"),
    }
    checked.update({k: whole(v, k) for k, v in counts.items()})
    return float(ratio), checked


def reagent(
    model: nn.Module,
    input_ids: torch.Tensor,
    target_ids: Any,
    *,
    attention_mask: torch.Tensor | None = None,
    replacer: nn.Module | None = None,
    ratio: float = 0.3,
    keep: int = 5,
    top_k: int = 3,
    max_steps: int = 100,
    min_steps: int = 5,
    probes: int = 8,
    candidates: int = 32,
    batch: int = 64,
    seed: int = 0,
    tokenizer: Any = None,
    progress: bool | None = None,
) -> Importance:
    """ReAGent importance of every context token for the next-token ``target_ids``: unit ``token``, ``(n, seq_len)``.

    ``input_ids`` ``(n, seq_len)`` (left or right padded, with ``attention_mask``), ``target_ids`` one token id
    per prompt (e.g. the first generated token). ``ratio``, ``keep`` and ``top_k`` default to inseq's values
    (inseq also runs 16 probes and up to 3000 steps; here 8 and 100, for CPU budgets). ``min_steps`` (5) makes a
    probe update its random start at least that often before the stop rule may end it (``min_steps=1``: the
    paper's rule). Scores of a prompt sum to 1 over its real tokens; padding scores 0. ``extra["stopped"]`` is
    each prompt's share of probes that
    met the stop rule, ``extra["steps"]`` the steps run.
    """
    ids = hf.token_ids(input_ids, model)
    mask = check_mask(ids, attention_mask)
    ratio, opt = _check_options(ratio, top_k, keep, max_steps, min_steps, probes, candidates=candidates, batch=batch)
    replacer = model if replacer is None else replacer
    check_replacer(model, replacer)
    require_eval(model)
    require_eval(replacer)
    with torch.no_grad():
        logits = batched_logits(model, mask, opt["batch"], input_ids=ids)
    target = check_target(target_ids, len(ids), logits.shape[-1], ids.device)
    start = time.perf_counter()
    with preserved(model, weights=False), preserved(replacer, weights=False), torch.no_grad():
        p0 = probability(logits, target)
        values, stopped, steps = _run(model, replacer, ids, mask, target, p0, ratio, opt, seed, progress)
    extra: dict[str, Any] = {"stopped": stopped.tolist(), "steps": steps}
    if tokenizer is not None:
        extra["tokens"] = [tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
    return Importance(
        values=values,
        unit="token",
        method="reagent",
        params={"ratio": ratio, **{k: v for k, v in opt.items() if k != "batch"}},
        target=target.tolist(),
        seed=seed,
        seconds=time.perf_counter() - start,
        extra=extra,
    )


def _run(
    model: nn.Module,
    replacer: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
    p0: torch.Tensor,
    ratio: float,
    opt: dict[str, int],
    seed: int,
    progress: bool | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    n, length, probes, device = *ids.shape, opt["probes"], ids.device
    gen = torch.Generator().manual_seed(seed)
    cand_ids, cand_p = replacement_candidates(replacer, ids, mask, candidates=opt["candidates"], batch=opt["batch"])
    rows = n * probes
    ids_r, mask_r, target_r = (t.repeat_interleave(probes, 0) for t in (ids, mask, target))
    cand_ids, cand_p = cand_ids.repeat_interleave(probes, 0), cand_p.repeat_interleave(probes, 0)
    p0 = p0.repeat_interleave(probes)
    scores = torch.rand(rows, length, generator=gen).to(device)
    keep_n = mask_r.sum(-1).clamp_max(opt["keep"])
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    step = 0
    for step in progress_bar(range(opt["max_steps"]), opt["max_steps"], "ReAGent", progress):
        act = (~done).nonzero().flatten()
        a_ids, a_mask, a_scores = ids_r[act], mask_r[act], scores[act]
        sampled = _sample(cand_ids[act], cand_p[act], gen)
        flip = (torch.rand(a_ids.shape, generator=gen).to(device) < ratio) & (a_mask == 1)
        top = torch.arange(length, device=device)[None] < keep_n[act, None]  # by rank, most important first
        kept = torch.zeros_like(flip).scatter_(1, _rank_order(a_scores, a_mask), top)
        rest = (a_mask == 1) & ~kept
        probe_ids = torch.cat([torch.where(flip, sampled, a_ids), torch.where(rest, sampled, a_ids)])
        both = torch.cat([a_mask, a_mask])
        logits = batched_logits(model, both, opt["batch"], input_ids=probe_ids)
        k = len(act)
        hit = (logits[k:].topk(min(opt["top_k"], logits.shape[-1]), -1).indices == target_r[act, None]).any(-1)
        stop = hit & (step >= max(1, opt["min_steps"]))
        delta = p0[act] - logits[:k].softmax(-1).gather(1, target_r[act, None]).squeeze(1)
        signed = torch.where(flip, delta[:, None], -delta[:, None])
        update = torch.logit((0.5 + 0.5 * signed).clamp(_EPS, 1 - _EPS))
        scores[act] = torch.where(stop[:, None], a_scores, a_scores + update * a_mask)
        done[act] = stop
        if done.all():
            break
    importance = _softmax_real(scores, mask_r).reshape(n, probes, length)
    finished = done.reshape(n, probes)
    weight = torch.where(finished.any(1, keepdim=True), finished.float(), torch.ones_like(finished, dtype=torch.float))
    values = (importance * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)
    return values, finished.float().mean(1), step + 1


def _rank_order(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Positions of each row sorted from most to least important (padding last)."""
    return scores.masked_fill(mask == 0, float("-inf")).argsort(-1, descending=True)


@text_scorer("reagent", family="perturbation")
def token_reagent(
    task: TextTask,
    *,
    replacer: Any = None,
    ratio: float = 0.3,
    keep: int = 5,
    top_k: int = 3,
    max_steps: int = 100,
    min_steps: int = 5,
    probes: int = 8,
    candidates: int = 32,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """ReAGent through ``wm.explain(lm, prompts, method="reagent", tokenizer=tok, generate=N)`` (see :func:`reagent`).

    Each generated (or given) target token is attributed to the context before it: one :func:`reagent` run per
    target position, every prompt and probe of it batched. ``extra["stopped"]`` is ``(n, generated)``.
    """
    if task.kind != "lm":
        raise MethodError(
            "reagent explains the next tokens of a generative (causal) LM; for a classifier use occlusion, "
            "integrated_gradients or attention_rollout"
        )
    out = torch.zeros((task.n, task.n_slots, task.input_ids.shape[1]))
    stopped = torch.zeros((task.n, task.n_slots))
    device = task.device
    for t in range(task.n_slots):
        rows = task.target_mask[:, t].nonzero().flatten()
        end = task.prompt_len + t  # the target at slot t is predicted from the positions before it
        imp = reagent(
            task.model, task.input_ids[rows, :end].to(device), task.target[rows, t].to(device),
            attention_mask=task.attention_mask[rows, :end].to(device), replacer=replacer, ratio=ratio, keep=keep,
            top_k=top_k, max_steps=max_steps, min_steps=min_steps, probes=probes, candidates=candidates,
            batch=task.rows_per_call(), seed=task.seed + t, progress=task.progress,
        )  # fmt: skip
        out[rows, t, :end] = imp.values.float().cpu()
        stopped[rows, t] = torch.tensor(imp.extra["stopped"])
    return task.values(out), {**task.extra(), "stopped": stopped.tolist()}


__all__ = ["check_replacer", "reagent", "replacement_candidates", "token_reagent"]
