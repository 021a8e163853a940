"""Prompt compression (LLMLingua-style): drop the prompt tokens a small causal LM finds least informative.

``compress_prompt(lm, texts, tokenizer=tok, keep=0.5, question=q)`` scores every prompt token by its
surprisal under ``lm`` (``-log p(x_t | x_<t)``, in nats: the self-information LLMLingua and Selective
Context rank by; SmolLM2-135M is a suitable small scorer) and keeps the ``keep`` share of the context's
tokens with the highest surprisal, in their original order. The first token (it has no surprisal; often
BOS) and the question suffix are always kept, so ``keep=0.5`` is 2x and ``keep=0.25`` 4x compression of
the context. ``method="random"`` drops tokens uniformly at random at the same budget (the baseline).

What is LLMLingua's and what is not: by default this is its token-level criterion in one pass (Selective
Context at token granularity). ``segment=k`` is LLMLingua's iterative compression: the prompt is compressed
``k`` tokens at a time, each segment's surprisal conditioned on the already compressed prefix (its KV cache,
at the compressed positions), so a token whose context was dropped is scored again in the context the target
model will see; each segment keeps its own ``keep`` share. LLMLingua's budget controller (demonstration-level
pruning) and LongLLMLingua's question-conditioned perplexity are not reproduced.

One pass scores ``batch_size`` prompts per forward pass (right-padded, masked); the selection is tensor ops
over the whole batch. The iterative form runs prompt by prompt (its segments depend on each other): per
segment, one forward of the segment on the compressed prefix's cache and one of its kept tokens. Returns a
:class:`CompressedPrompt`: the kept ids per prompt, their original positions, the decoded texts (with a
tokenizer) and the surprisal as an ``Importance`` of unit ``token``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from whatmatters.core import hf
from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.fractions import kept_share, whole
from whatmatters.core.importance import Importance
from whatmatters.core.state import preserved
from whatmatters.core.task import progress_bar

METHODS = ("surprisal", "random")


@dataclass
class CompressedPrompt:
    """The compressed prompts: ids (1-D per prompt), kept positions, texts, and the token scores."""

    input_ids: list[torch.Tensor]
    kept_positions: list[torch.Tensor]
    lengths: list[int]  # original prompt lengths (tokens)
    scores: Importance  # unit "token", (n, max_len) surprisal in nats (0 for padding / the first token)
    text: list[str] | None = None

    @property
    def ratio(self) -> float:
        """Original tokens / kept tokens, over all prompts (the question suffix included)."""
        return sum(self.lengths) / sum(len(i) for i in self.input_ids)


def surprisal(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``-log p(x_t | x_<t)`` per token, ``(b, L)`` float32 nats; 0 at the first token and at padding."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with preserved(model), torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(-logp, (1, 0)) * mask


def _as_ids(data: Any, tokenizer: Any, question: Any, model: nn.Module) -> tuple[list[torch.Tensor], list[int]]:
    """Each prompt's ids (context + question) and the number of question tokens at its end."""
    if isinstance(data, str):
        data = [data]
    if isinstance(data, torch.Tensor):
        data = list(hf.token_ids(data, model))
    if not isinstance(data, Sequence) or not data:
        raise InputError("compress_prompt needs a text, a list of texts, or token ids (n, seq_len)")
    questions = [question] * len(data) if question is None or isinstance(question, str) else list(question)
    if len(questions) != len(data):
        raise InputError(f"got {len(questions)} questions for {len(data)} prompts; give one per prompt or one for all")
    if all(isinstance(d, str) for d in data):
        if tokenizer is None:
            raise InputError("compress_prompt got texts: pass tokenizer= (the model's own tokenizer)")
        ctx = [torch.tensor(tokenizer(t)["input_ids"], dtype=torch.long) for t in data]
        qs = [
            torch.tensor(tokenizer(q, add_special_tokens=False)["input_ids"] if q else [], dtype=torch.long)
            for q in questions
        ]
        return [torch.cat([c, q]) for c, q in zip(ctx, qs)], [len(q) for q in qs]
    if any(q for q in questions):
        raise InputError("question= is text: give the prompts as texts (with tokenizer=), or use keep_last= with ids")
    if any(isinstance(d, str) or not isinstance(d, torch.Tensor) for d in data):
        raise InputError("compress_prompt needs texts (all of them) or 1-D tensors of token ids, not a mix")
    return [hf.token_ids(d.reshape(1, -1), model)[0] for d in data], [0] * len(data)


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]
    ids[mask] = torch.cat(rows)
    return ids, mask.long()


def iterative_surprisal(
    model: nn.Module, ids: torch.Tensor, protected: torch.Tensor, keep: float, segment: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLMLingua's iterative compression of one prompt ``ids`` ``(L,)``: kept mask and surprisal, each ``(L,)``.

    Segment by segment, the surprisal of the segment's tokens given the compressed prefix (0 for the very
    first token), then the protected tokens and the segment's ``keep`` share of the others by surprisal are
    kept and appended to the prefix (the segment's other entries are cropped from the cache first).
    """
    device = next(model.parameters()).device
    cache = hf.new_cache(model)
    cached = hf.cache_kwargs(model, cache)
    kept = torch.zeros(len(ids), dtype=torch.bool)
    scores = torch.zeros(len(ids))
    last, prefix = None, 0  # logits after the compressed prefix; its length
    with preserved(model), torch.no_grad():
        for s0 in range(0, len(ids), segment):
            seg = ids[s0 : s0 + segment].to(device)
            logits = model(input_ids=seg[None], use_cache=True, **cached).logits[0].float()
            if hf.cache_length(cache, 0) != prefix + len(seg):
                raise hf.incompatible("iterative prompt compression", "the model did not fill the cache it was given")
            predicted = logits[:-1] if last is None else torch.cat([last[None], logits[:-1]])
            s = -predicted.log_softmax(-1).gather(1, seg[len(seg) - len(predicted) :, None])[:, 0]
            s = torch.nn.functional.pad(s, (len(seg) - len(s), 0)).cpu()
            prot = protected[s0 : s0 + len(seg)]
            chosen = kept_mask(s[None], prot[None], ~prot[None], keep)[0]
            scores[s0 : s0 + len(seg)], kept[s0 : s0 + len(seg)] = s, chosen
            cache.crop(-len(seg))  # drop the segment (a negative count: the same in every transformers 5 release)
            if hf.cache_length(cache, 0) != prefix:
                raise hf.incompatible("iterative prompt compression", "the cache did not drop the segment")
            if chosen.any():
                tokens = seg[chosen.to(device)]
                last = model(input_ids=tokens[None], use_cache=True, **cached).logits[0, -1].float()
                prefix += len(tokens)
    return kept, scores


def kept_mask(scores: torch.Tensor, protected: torch.Tensor, compressible: torch.Tensor, keep: float) -> torch.Tensor:
    """Per row: the protected tokens and the ``round(keep x compressible)`` best-scored compressible ones."""
    budget = (compressible.sum(1) * keep).round().long()
    s = scores.float().masked_fill(~compressible, -math.inf)
    rank = s.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return protected | (compressible & (rank < budget[:, None]))


def compress_prompt(
    model: nn.Module,
    data: Any,
    *,
    keep: float = 0.5,
    tokenizer: Any = None,
    question: str | Sequence[str] | None = None,
    keep_first: int = 1,
    keep_last: int = 0,
    method: str = "surprisal",
    segment: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool | None = None,
) -> CompressedPrompt:
    """Compress prompts by dropping the context tokens with the lowest surprisal under ``model``.

    Args:
        model: a causal LM (transformers ``...ForCausalLM``) that scores the tokens; not changed.
        data: a text, a list of texts (with ``tokenizer``) or token ids ``(n, seq_len)`` / a list of 1-D ids.
        keep: share of the context tokens kept, in ``(0, 1]`` (0.5: 2x, 0.25: 4x compression).
        question: text appended to each prompt and kept whole (a question suffix).
        keep_first / keep_last: tokens at the start / end of each prompt always kept (the question counts
            into ``keep_last``).
        method: ``"surprisal"`` or ``"random"`` (uniform, same budget).
        segment: ``None``: surprisal in one pass; a token count: LLMLingua's iterative compression, segments
            of that many tokens, each scored given the compressed prefix and keeping its own ``keep`` share.
        seed: seed of ``random``.
        batch_size: prompts per forward pass.
    """
    if method not in METHODS:
        raise MethodError(f"unknown prompt compression method {method!r}; choose one of {', '.join(METHODS)}")
    keep = kept_share(keep, "keep", of="context tokens")
    keep_first = whole(keep_first, "keep_first", minimum=0)
    keep_last = whole(keep_last, "keep_last", minimum=0)
    batch_size = whole(batch_size, "batch_size")
    if segment is not None:
        segment = whole(segment, "segment", minimum=2)
        if method != "surprisal":
            raise MethodError(f"segment= compresses by surprisal segment by segment; method {method!r} has none")
    rows, n_question = _as_ids(data, tokenizer, question, model)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(whole(seed, "seed", minimum=0))
    kept_ids, kept_pos, values = [], [], []
    batches = range(0, len(rows), batch_size)
    for b0 in progress_bar(batches, len(batches), "compress_prompt", progress):
        chunk = rows[b0 : b0 + batch_size]
        ids, mask = _pad(chunk)
        valid = mask.bool()
        lengths = valid.sum(1, keepdim=True)
        suffix = torch.tensor(n_question[b0 : b0 + batch_size])[:, None].clamp_min(keep_last)
        pos = torch.arange(ids.shape[1])[None]
        protected = valid & ((pos < keep_first) | (pos >= lengths - suffix))
        if segment is not None:
            kept, s = torch.zeros_like(valid), torch.zeros(ids.shape)
            for r, row in enumerate(chunk):  # segments depend on each other: prompt by prompt
                n = len(row)
                kept[r, :n], s[r, :n] = iterative_surprisal(model, row, protected[r, :n], keep, segment)
        else:
            s = torch.rand(ids.shape, generator=generator) if method == "random" else surprisal(model, ids, mask).cpu()
            kept = kept_mask(s, protected, valid & ~protected, keep)
        for r in range(len(chunk)):  # ragged outputs: one tensor per prompt
            kept_pos.append(pos[0][kept[r]])
            kept_ids.append(ids[r][kept[r]])
        values.append(s * valid)
    width = max(v.shape[1] for v in values)
    scores = Importance(
        values=torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values]),
        unit="token",
        per_sample=True,
        method=f"prompt_{method}",
        params={"keep": keep, "keep_first": keep_first, "keep_last": keep_last, "segment": segment, "seed": seed},
        seconds=time.perf_counter() - start,
        extra={"lengths": [len(r) for r in rows]},
    )
    text = [tokenizer.decode(i) for i in kept_ids] if tokenizer is not None else None
    return CompressedPrompt(kept_ids, kept_pos, [len(r) for r in rows], scores, text)


__all__ = ["METHODS", "CompressedPrompt", "compress_prompt", "iterative_surprisal", "kept_mask", "surprisal"]
