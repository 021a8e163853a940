"""Token attribution for Hugging Face classifiers and causal LMs: gradients on the word embeddings,
occlusion (leave-one-out) and attention rollout.

These are the token versions of ``saliency``, ``gradient_x_input``, ``integrated_gradients`` and
``occlusion`` (same names, same meaning, on a :class:`~whatmatters.core.text.TextTask`), plus
``attention_rollout``. Gradients are taken with respect to the output of the model's input embedding
layer (``get_input_embeddings()``; position and segment embeddings are added after it, as captum's
``LayerIntegratedGradients`` on ``word_embeddings`` does), for every (sample, target token) pair at once:
an LM's generated tokens are rows of one batched forward/backward pass, not a loop over steps. Scores are
reduced over the embedding dimension: saliency is the L2 norm of the gradient (inseq's aggregation),
gradient x input and integrated gradients are summed (so integrated gradients keep completeness).
"""

from __future__ import annotations

from typing import Any

import torch

import whatmatters.explain.gradient  # registers the names whose token versions follow
import whatmatters.explain.occlusion  # noqa: F401
from whatmatters.core import hf
from whatmatters.core.adapters import row_slices
from whatmatters.core.errors import MethodError, ModelError
from whatmatters.core.fractions import whole
from whatmatters.core.state import autograd_on
from whatmatters.core.task import progress_bar
from whatmatters.core.text import TextTask, text_scorer
from whatmatters.explain.gradient import NO_GRADIENT, path_points

BASELINES = ("zero", "pad", "mask", "unk")


def _gradients(
    task: TextTask,
    sample: torch.Tensor,
    slot: torch.Tensor,
    embeds: Any,
    description: str,
    key: torch.Tensor | None = None,
    own: bool = False,
) -> torch.Tensor:
    """Gradient of each row's target output with respect to its word embeddings, ``(r, S, d)``.

    ``embeds(rows)`` builds the word embeddings of the rows ``rows`` (an index tensor), so only one call's
    rows are in memory at a time. Rows go to the model slot by slot and, within a slot, by their amount of
    padding, so the rows of a call share most of it (an LM's call cuts the padding all its rows have).
    ``key``: rows with the same key have the same embeddings (one sample at one path point); an LM with
    several target slots then runs one forward pass per key for all its slots (:func:`_shared_gradients`).
    ``own``: the rows are the samples' own embeddings, so a classifier's forward chooses undecided targets.
    """
    if key is not None and task.kind == "lm" and task.n_slots > 1:
        return _shared_gradients(task, sample, slot, embeds, description, key)
    padding = (task.attention_mask == 0).sum(1)[sample.cpu()]
    order = torch.argsort(slot.cpu() * (task.input_ids.shape[1] + 1) + padding, stable=True)
    chunks = [order[s] for s in row_slices(len(sample), task.rows_per_call())]
    out = None
    for rows in progress_bar(chunks, len(chunks), description, task.progress):
        with autograd_on():
            leaf = embeds(rows).detach().clone().requires_grad_(True)
            score = task.scores(sample[rows], embeds=leaf, slots=slot[rows], own=own)
            if not score.requires_grad:
                raise ModelError(NO_GRADIENT)
            (grad,) = torch.autograd.grad(score.sum(), leaf)
        if out is None:
            out = torch.empty((len(sample), *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        out[rows.to(out.device)] = grad
    return out


def _shared_gradients(
    task: TextTask, sample: torch.Tensor, slot: torch.Tensor, embeds: Any, description: str, key: torch.Tensor
) -> torch.Tensor:
    """:func:`_gradients` with one forward pass per ``key`` for all of an LM's target slots.

    A causal LM's output at slot ``t`` reads only the positions before it, so one forward pass over the
    whole context gives every slot's output exactly as a pass per slot does. Each slot still needs its
    own backward pass; they run as one batched (vmapped) backward, or one after another where the model's
    operations have no batching rule. The forward passes saved: ``T - 1`` of every ``T``.
    """
    keys, inverse = torch.unique(key.cpu(), return_inverse=True)
    first = torch.full((len(keys),), len(key), dtype=torch.long).scatter_reduce_(
        0, inverse, torch.arange(len(key)), "amin"
    )  # one row of each key stands for it (same embeddings)
    padding = (task.attention_mask == 0).sum(1)[sample.cpu()[first]]
    order = torch.argsort(padding, stable=True)
    per_call = max(1, task.rows_per_call() // task.n_slots)  # at most rows_per_call (row, slot) gradients a call
    chunks = [order[s] for s in row_slices(len(keys), per_call)]
    where = torch.empty(len(keys), dtype=torch.long)  # key -> position within its call
    out = None
    for group in progress_bar(chunks, len(chunks), description, task.progress):
        where[group] = torch.arange(len(group))
        rows = torch.isin(inverse, group).nonzero().flatten()  # the (sample, slot) rows of these keys
        slots, at = torch.unique(slot.cpu()[rows], return_inverse=True)
        with autograd_on():
            leaf = embeds(first[group]).detach().clone().requires_grad_(True)
            scores = task.scores(sample[first[group]], embeds=leaf)[:, slots.to(task.device)]  # (r, slots)
            if not scores.requires_grad:
                raise ModelError(NO_GRADIENT)
            grads = _per_column_gradients(scores, leaf)  # (slots, r, S, d)
        if out is None:
            out = torch.empty((len(sample), *grads.shape[2:]), dtype=grads.dtype, device=grads.device)
        out[rows.to(out.device)] = grads[at.to(grads.device), where[inverse[rows]].to(grads.device)]
    return out


def _per_column_gradients(scores: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """``(m, *leaf.shape)``: the gradient of each column's sum of ``scores`` ``(r, m)`` with respect to ``leaf``."""
    m = scores.shape[1]
    if m == 1:
        return torch.autograd.grad(scores.sum(), leaf)[0][None]
    onehot = torch.eye(m, dtype=scores.dtype, device=scores.device)[:, None, :].expand(m, *scores.shape)
    try:
        return torch.autograd.grad(scores, leaf, onehot, is_grads_batched=True, retain_graph=True)[0]
    except RuntimeError:  # an operation without a batching rule for its backward: one pass per column
        return torch.stack([torch.autograd.grad(scores[:, j].sum(), leaf, retain_graph=j < m - 1)[0] for j in range(m)])


def _scatter(task: TextTask, sample: torch.Tensor, slot: torch.Tensor, per_pair: torch.Tensor) -> torch.Tensor:
    """Scores of the (sample, slot) pairs, ``(P, S)``, as the task's ``(n, S)`` / ``(n, T, S)`` layout."""
    full = torch.zeros((task.n, task.n_slots, task.input_ids.shape[1]), dtype=torch.float32)
    full[sample, slot] = per_pair.detach().float().cpu()
    return task.values(full)


def _plain_gradient(task: TextTask, combine: Any, description: str) -> tuple[torch.Tensor, dict[str, Any]]:
    sample, slot = task.slot_pairs()
    emb = task.word_embeddings(task.input_ids)
    grads = _gradients(task, sample, slot, lambda s: emb[sample[s]], description, key=sample, own=True)
    return _scatter(task, sample, slot, combine(emb[sample], grads)), task.extra()


@text_scorer("saliency", family="gradient", predicts_target=True)
def token_saliency(task: TextTask) -> tuple[torch.Tensor, dict[str, Any]]:
    """Saliency of tokens: the L2 norm of the target's gradient with respect to each token's word embedding."""
    return _plain_gradient(task, lambda e, g: g.norm(dim=-1), "saliency")


@text_scorer("gradient_x_input", family="gradient", predicts_target=True)
def token_gradient_x_input(task: TextTask) -> tuple[torch.Tensor, dict[str, Any]]:
    """Gradient x input of tokens: word embedding times the target's gradient there, summed over the embedding."""
    return _plain_gradient(task, lambda e, g: (e * g).sum(-1), "gradient x input")


def baseline_ids(task: TextTask, baseline: Any) -> torch.Tensor | None:
    """Token ids of a ``pad`` / ``mask`` / ``unk`` / id baseline (special tokens and padding kept); None: zeros."""
    if isinstance(baseline, str) and baseline == "zero":
        return None
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            raise MethodError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)} or a token id")
        value = getattr(task.tokenizer, f"{baseline}_token_id", None)
        if not isinstance(value, int):
            raise MethodError(f"the tokenizer has no {baseline} token; use baseline='zero' or a token id")
    elif isinstance(baseline, int) and not isinstance(baseline, bool):
        value = baseline
    else:
        raise MethodError(f"baseline must be one of {', '.join(BASELINES)} or a token id, got {baseline!r}")
    vocab = task.embedding.weight.shape[0] if hasattr(task.embedding, "weight") else None
    if value < 0 or (vocab is not None and value >= vocab):
        raise MethodError(f"baseline token id {value} is outside the vocabulary [0, {vocab})")
    keep = task.special | ~task.attention_mask.bool()
    return torch.where(keep, task.input_ids, torch.full_like(task.input_ids, value))


@text_scorer("integrated_gradients", family="gradient", predicts_target=True)
def token_integrated_gradients(
    task: TextTask, *, baseline: Any = "zero", steps: int = 50, rule: str = "gausslegendre", delta: bool = True
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Integrated gradients of tokens on the word embeddings, summed over the embedding dimension.

    Args:
        baseline: ``"zero"`` (zero embeddings; captum's and inseq's default), ``"pad"``, ``"mask"``,
            ``"unk"`` (that token's embedding at every non-special position) or a token id.
        steps: points on the path (every sample, target token and step is one row of a batched call).
        rule: quadrature rule, as for features (``"gausslegendre"``, ``"riemann_trapezoid"``, ...).
        delta: measure the completeness error (two more forward passes per sample; ``False`` skips them,
            as inseq and captum do by default).

    ``extra["delta"]`` is the completeness error per (sample, target token): the sum of the scores minus
    ``f(x) - f(baseline)``.
    """
    alphas, weights = (torch.as_tensor(a, dtype=torch.float32) for a in path_points(steps, rule))
    sample, slot = task.slot_pairs()
    x = task.word_embeddings(task.input_ids)
    ids = baseline_ids(task, baseline)
    b = torch.zeros_like(x) if ids is None else task.word_embeddings(ids)
    k = len(alphas)
    rows_sample, rows_slot = sample.repeat_interleave(k), slot.repeat_interleave(k)
    step = torch.arange(k).repeat(len(sample))
    a = alphas.to(x.device, x.dtype)

    def path(s: torch.Tensor) -> torch.Tensor:
        i, al = rows_sample[s], a[step[s]].view(-1, 1, 1)
        return b[i] + al * (x[i] - b[i])

    if delta:  # the samples' own outputs first: they choose a classifier's undecided classes
        f_x = _all_scores(task, None)
    else:
        task.choose_targets()
    key = rows_sample * k + step  # rows of one sample at one path point share their embeddings
    grads = _gradients(task, rows_sample, rows_slot, path, "integrated gradients", key=key)
    w = weights.to(grads.device, grads.dtype)[step].view(-1, 1, 1)
    total = (grads * w).view(len(sample), k, *grads.shape[1:]).sum(1)
    per_pair = ((x[sample] - b[sample]) * total).sum(-1)
    per_pair = per_pair * task.context_mask()[sample, slot].to(per_pair.device)
    extra: dict[str, Any] = {"baseline": baseline}
    if delta:
        error = per_pair.sum(-1).cpu() - (f_x - _all_scores(task, b))[sample, slot]
        extra |= {"delta": error.tolist(), "max_abs_delta": float(error.abs().max())}
    return _scatter(task, sample, slot, per_pair), {**task.extra(), **extra}


def _all_scores(task: TextTask, embeds: torch.Tensor | None) -> torch.Tensor:
    """``(n, T)`` target outputs of every sample (with ``embeds``: those word embeddings), no gradients.
    Without ``embeds`` the rows are the samples themselves: they choose a classifier's undecided classes."""
    outs, own = [], embeds is None
    with torch.no_grad():
        for s in row_slices(task.n, task.rows_per_call()):
            rows = torch.arange(s.start, s.stop)
            outs.append(task.scores(rows, embeds=None if own else embeds[s], own=own).float().cpu())
    return torch.cat(outs)


def _variants(task: TextTask, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows of ``window`` tokens that hide at least one real, non-special token: their sample and start
    ``(R,)`` each, and ``cover`` ``(n, m, S)`` float, what window ``j`` hides in sample ``i`` (0 for the others)."""
    width = task.input_ids.shape[1]
    occludable = task.attention_mask.bool() & ~task.special
    m = max(1, width - window + 1)
    pos = torch.arange(width)
    windows = (pos[None, :] >= torch.arange(m)[:, None]) & (pos[None, :] < torch.arange(m)[:, None] + window)
    cover = windows[None, :, :] & occludable[:, None, :]  # (n, m, S)
    valid = cover.any(-1)  # (n, m)
    sample, start = valid.nonzero(as_tuple=True)
    return sample, start, cover.float() * valid[..., None]


@text_scorer("occlusion", family="perturbation", aliases=("leave_one_out",), predicts_target=True)
def token_occlusion(
    task: TextTask, *, window: int = 1, baseline: Any = "remove"
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Occlusion of tokens (leave-one-out with ``window=1``): the drop of the target output when tokens are hidden.

    Args:
        window: tokens hidden together (a window slides one token at a time; a token's score is the mean
            drop over the windows that hide it).
        baseline: ``"remove"`` (the hidden tokens leave the attention mask; positions of the others do not
            move) or ``"pad"`` / ``"mask"`` / ``"unk"`` / a token id (they are replaced by that token).

    Special tokens (CLS, SEP, BOS) are never hidden and score 0. All variants of all samples go to the
    model in batches of rows; an LM's variant is scored for every target token in the same pass.
    """
    window = whole(window, "window")
    replace = None if isinstance(baseline, str) and baseline == "remove" else baseline_ids(task, baseline)
    sample, start, cover = _variants(task, window)
    hidden = cover[sample, start].bool()
    full = _all_scores(task, None)  # (n, T); the samples' own outputs choose a classifier's undecided classes
    chunks = row_slices(len(sample), task.rows_per_call())
    drops = torch.empty((len(sample), task.n_slots))
    with torch.no_grad():
        for s in progress_bar(chunks, len(chunks), "occlusion", task.progress):
            i, h = sample[s], hidden[s]
            ids = task.input_ids[i] if replace is None else torch.where(h, replace[i], task.input_ids[i])
            mask = task.attention_mask[i] * (~h).long() if replace is None else task.attention_mask[i]
            drops[s] = full[i] - task.scores(i, ids=ids, mask=mask).float().cpu()
    per_window = torch.zeros((*cover.shape[:2], task.n_slots))  # (n, m, T)
    per_window[sample, start] = drops
    covered = torch.einsum("nmt,nms->nts", per_window, cover)
    counts = cover.sum(1).clamp_min(1)[:, None, :]
    return task.values(covered / counts), {**task.extra(), "window": window, "variants": len(sample)}


QUERIES = ("auto", "first", "mean", "last")


@text_scorer("attention_rollout", family="attention")
def attention_rollout(
    task: TextTask, *, query: str = "auto", residual: float = 0.5
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Attention rollout (Abnar & Zuidema, 2020): attention propagated through the layers, with the residual.

    Per layer the head-mean attention ``A`` becomes ``residual * I + (1 - residual) * A`` (rows renormalised);
    the rollout is their product from the first layer to the last. A token's score is the rollout weight
    from the query position: ``query="first"`` (CLS; a classifier's default), ``"mean"`` (mean over the real
    tokens, for mean-pooled encoders), ``"last"`` (the last real token); an LM's query is the position that
    predicts each target token. It does not depend on the target class. The model runs with eager attention
    while scoring (set back afterwards).
    """
    if query not in QUERIES:
        raise MethodError(f"query must be one of {', '.join(QUERIES)}, got {query!r}")
    if not isinstance(residual, (int, float)) or not 0 <= residual <= 1:
        raise MethodError(f"residual must be a number in [0, 1], got {residual!r}")
    device = task.device
    width = task.input_ids.shape[1]
    out = torch.zeros((task.n, task.n_slots, width))
    chunks = row_slices(task.n, task.rows_per_call())
    with hf.attention_weights(task.model), torch.no_grad():
        for s in progress_bar(chunks, len(chunks), "attention rollout", task.progress):
            ids, mask = task.input_ids[s].to(device), task.attention_mask[s].to(device)
            kwargs: dict[str, Any] = {"attention_mask": mask, "output_attentions": True}
            if task.kind == "lm":
                kwargs.update(position_ids=task.position_ids(task.attention_mask[s]).to(device), use_cache=False)
            attentions = getattr(task.model(input_ids=ids, **kwargs), "attentions", None)
            if not attentions:
                raise ModelError("attention_rollout needs a model that returns attention weights (output_attentions)")
            eye = torch.eye(width, device=device)
            rollout = eye.expand(len(ids), -1, -1)
            for layer in attentions:  # the layers compose in order
                a = residual * eye + (1 - residual) * torch.nan_to_num(layer.float()).mean(1)
                rollout = (a / a.sum(-1, keepdim=True)) @ rollout
            out[s] = _query_rows(task, rollout.cpu(), task.attention_mask[s], query)
    return task.values(out), {**task.extra(), "query": query}


def _query_rows(task: TextTask, rollout: torch.Tensor, mask: torch.Tensor, query: str) -> torch.Tensor:
    """``(r, T, S)``: the rollout rows of each target's query position."""
    if task.kind == "lm":
        return rollout[:, task.prompt_len - 1 : task.prompt_len - 1 + task.n_slots]
    if query == "mean":
        w = mask.float() / mask.sum(1, keepdim=True)
        return torch.einsum("rs,rsk->rk", w, rollout)[:, None]
    if query == "last":
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
        return rollout[torch.arange(len(mask)), last][:, None]
    return rollout[:, 0][:, None]
