"""`TextTask`: token inputs of a Hugging Face classifier or causal LM, checked once, and its batched scores.

A text request is turned into a :class:`TextTask` by :func:`make_text_task` (texts with a tokenizer, or
``input_ids`` / ``attention_mask``). Every token scorer reads the same layout:

* ``input_ids`` ``(n, S)``: a classifier's tokens, right-padded; for a causal LM the context (left-padded
  prompt) followed by the target tokens (right-padded), so target slot ``t`` sits at position
  ``prompt_len + t`` of every row and is predicted from position ``prompt_len + t - 1``;
* ``target`` ``(n, T)``: a classifier's class (``T = 1``) or the LM's target token ids, ``target_mask``
  ``(n, T)`` False for padding slots (after an end-of-sequence token, or shorter continuations);
* :meth:`TextTask.scores` returns the target outputs of any rows of (perturbed) ids or word embeddings:
  the class logit, or the target token's probability / log-probability / logit at its position.

Token scores are ``(n, S)`` for classifiers and ``(n, T, S)`` for LMs (generated token x context
position; positions at or after the target's own are 0), always aligned to the padded ``input_ids``.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from whatmatters.core import hf
from whatmatters.core.errors import InputError, MethodError, ModelError, TargetError
from whatmatters.core.registry import SCORERS, Method
from whatmatters.core.task import as_indices

OUTPUTS = ("probability", "log_probability", "logit")
# Rows (sequences) per forward/backward call when no batch size is given.
ROWS_PER_CALL = 64


@dataclass
class TextTask:
    """Token inputs, targets and model of one token-attribution request (see the module docstring)."""

    model: nn.Module
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target: torch.Tensor
    target_mask: torch.Tensor
    kind: str  # "classifier" or "lm"
    prompt_len: int = 0  # LM: width of the (left-padded) context before the first target slot
    tokens: list[list[str]] = field(default_factory=list)
    word_ids: list[list[int]] = field(default_factory=list)  # -1: special or padding token
    words: list[list[str]] = field(default_factory=list)
    special: torch.Tensor | None = None  # (n, S) bool: special tokens (CLS, SEP, BOS, ...)
    output: str = "logit"
    tokenizer: Any = None
    seed: int = 0
    batch_size: int | None = None
    progress: bool | None = None
    generated: bool = False
    predict: bool = False  # a classifier's target=None: targets -1 until the method's own forward chooses them
    unchecked: bool = False  # a classifier's given target, checked against the outputs of the method's first call

    unit = "token"

    @property
    def n(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_slots(self) -> int:
        return int(self.target.shape[1])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embedding(self) -> nn.Module:
        get = getattr(self.model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if not isinstance(emb, nn.Module):
            raise ModelError(
                f"{type(self.model).__name__} has no input embedding layer (get_input_embeddings()); token "
                "gradient methods attribute to it: give a Hugging Face model or define get_input_embeddings()"
            )
        return emb

    def rows_per_call(self) -> int:
        return int(self.batch_size or ROWS_PER_CALL)

    def context_mask(self) -> torch.Tensor:
        """``(n, T, S)`` bool: the positions each target slot is attributed to (real tokens before it)."""
        real = self.attention_mask.bool()[:, None, :].expand(-1, self.n_slots, -1)
        if self.kind == "classifier":
            return real & self.target_mask[:, :, None]
        before = (
            torch.arange(self.input_ids.shape[1])[None, :] < (self.prompt_len + torch.arange(self.n_slots))[:, None]
        )
        return real & before[None] & self.target_mask[:, :, None]

    def word_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.embedding(ids.to(self.device)).detach()

    def position_ids(self, mask: torch.Tensor) -> torch.Tensor:
        """Positions counted over real tokens (left padding does not shift the prompt), as ``generate`` does."""
        return (mask.long().cumsum(-1) - 1).clamp_min(0)

    def scores(
        self,
        rows: torch.Tensor,
        *,
        ids: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        own: bool = False,
    ) -> torch.Tensor:
        """Target outputs of rows built from samples ``rows`` (one forward pass, differentiable in ``embeds``).

        ``ids`` (default: the samples' own), ``embeds`` (word embeddings replacing the embedding layer's
        output) and ``mask`` (default: the samples' attention mask) have one row per entry of ``rows``.
        Returns ``(r, T)`` (every target slot), or ``(r,)`` with ``slots`` (one slot per row). An LM reads
        only the positions up to the last one that predicts a requested slot, and computes logits there only.
        ``own``: the rows are the samples themselves (their own embeddings), so a classifier's undecided
        targets (``predict``) are their predicted classes, chosen here and kept in ``target``.
        """
        device = self.device
        ids = self.input_ids[rows] if ids is None else ids
        mask = self.attention_mask[rows] if mask is None else mask
        if self.kind == "classifier":
            with replaced_output(self.embedding, embeds):
                logits = _logits(self.model(input_ids=ids.to(device), attention_mask=mask.to(device)), 2)
            if self.unchecked:
                _check_classes(self.target[:, 0], int(logits.shape[1]))
                self.unchecked = False
            if self.predict:
                self._choose(rows, logits, own)
            out = logits.gather(1, self.target[rows].to(device))  # (r, 1)
            return out if slots is None else out[:, 0]
        wanted = torch.arange(self.n_slots) if slots is None else slots.cpu()
        width = self.prompt_len + int(wanted.max())  # the slot s is predicted at position prompt_len + s - 1
        real = self.attention_mask[rows][:, :width]
        # left padding that every row of this call has is cut off (positions count real tokens, so none move)
        start = int(real.any(0).int().argmax())
        keep = torch.unique(wanted) + (self.prompt_len - 1 - start)
        cols = slice(start, width)
        kwargs: dict[str, Any] = {"attention_mask": mask[:, cols].to(device), "use_cache": False}
        kwargs["position_ids"] = self.position_ids(real[:, start:]).to(device)
        takes_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        if takes_keep:
            kwargs["logits_to_keep"] = keep.to(device)
        with replaced_output(self.embedding, None if embeds is None else embeds[:, cols]):
            logits = _logits(self.model(input_ids=ids[:, cols].to(device), **kwargs), 3)
        logits = logits if takes_keep else logits[:, keep.to(device)]
        if slots is None:  # (r, T, V): every slot
            return _token_output(logits, self.target[rows].to(device), self.output)
        at = torch.searchsorted(keep, slots.cpu() + (self.prompt_len - 1 - start)).to(device)
        picked = logits[torch.arange(len(rows), device=device), at][:, None]  # (r, 1, V)
        tokens = self.target[rows.cpu(), slots.cpu()].to(device)[:, None]
        return _token_output(picked, tokens, self.output)[:, 0]

    def _choose(self, rows: torch.Tensor, logits: torch.Tensor, own: bool) -> None:
        """Undecided targets of the samples ``rows``: their predicted classes, from their own ``logits``."""
        undecided = self.target[rows.cpu(), 0] < 0
        if not bool(undecided.any()):
            return
        if not own:
            raise ModelError("internal error: a target was read before the samples' own forward chose it")
        self.target[rows.cpu()[undecided], 0] = logits.detach().argmax(1).cpu()[undecided]

    def undecided(self) -> bool:
        """Whether some text's class is still to be chosen by the method's forward (``predict``), as ``Task``'s."""
        return self.predict and bool((self.target < 0).any())

    def choose_targets(self) -> None:
        """Every undecided target chosen now, by one prediction (for a method that runs no forward of the samples)."""
        if self.undecided():
            self.target = _class_target(self.model, None, self.input_ids, self.attention_mask, self.n)

    def predicted(self) -> None:
        """Every class chosen (a token scorer flagged ``predicts_target`` that left one undecided is a bug), and a
        given one checked (by one probe row if the method never read the classifier's outputs)."""
        if self.unchecked:
            _class_target(self.model, self.target[:, 0], self.input_ids[:1], self.attention_mask[:1], self.n)
            self.unchecked = False
        if self.undecided():
            raise ModelError("internal error: the method did not choose every text's class; please report it")

    def slot_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample, slot) index of every real target slot, each ``(P,)``, slot by slot (rows of one call
        then mostly share a slot, so an LM's call reads the shortest prefix)."""
        slot, sample = self.target_mask.T.nonzero(as_tuple=True)
        return sample, slot

    def values(self, per_slot: torch.Tensor) -> torch.Tensor:
        """``(n, T, S)`` scores restricted to each slot's context, as ``(n, S)`` for a classifier."""
        out = per_slot.float().cpu() * self.context_mask()
        return out[:, 0] if self.kind == "classifier" else out

    def extra(self) -> dict[str, Any]:
        """What an importance needs to show and aggregate the tokens (``extra`` of every token scorer)."""
        extra: dict[str, Any] = {
            "tokens": self.tokens,
            "input_ids": self.input_ids.tolist(),
            "attention_mask": self.attention_mask.tolist(),
            "word_ids": self.word_ids,
            "words": self.words,
            "kind": self.kind,
            "output": self.output,
        }
        if self.kind == "lm":
            extra.update(
                prompt_len=self.prompt_len,
                target_ids=self.target.tolist(),
                target_mask=self.target_mask.tolist(),
                target_tokens=[row[self.prompt_len :] for row in self.tokens],
                layout="(n, generated, context): row t scores the context positions before target slot t",
            )
        return extra


def _logits(out: Any, ndim: int) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.ndim != ndim:
        what = "(n, classes)" if ndim == 2 else "(n, seq_len, vocab)"
        raise ModelError(f"the model returned no {what} logits; give a Hugging Face classifier or causal LM")
    return logits


def _token_output(logits: torch.Tensor, target: torch.Tensor, output: str) -> torch.Tensor:
    if output == "logit":
        return logits.gather(2, target[..., None]).squeeze(2)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, target[..., None]).squeeze(2)
    return logp if output == "log_probability" else logp.exp()


@contextmanager
def replaced_output(module: nn.Module, value: torch.Tensor | None) -> Iterator[None]:
    """While open, ``module`` returns ``value`` (when not None) instead of its output; the hook is always removed."""
    if value is None:
        yield
        return

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
        if out.shape != value.shape:
            raise ModelError(f"the embedding layer returned {tuple(out.shape)}, replacement {tuple(value.shape)}")
        return value.to(out.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ------------------------------------------------------------------ building the task
def is_text_request(data: Any, tokenizer: Any = None, attention_mask: Any = None, generate: Any = None) -> bool:
    """Data that :func:`make_text_task` reads: text(s), a tokenizer's encoding, or token ids with text options."""
    if isinstance(data, str) or tokenizer is not None or attention_mask is not None or generate is not None:
        return True
    if isinstance(data, Mapping) and "input_ids" in data:
        return True
    return isinstance(data, (list, tuple)) and len(data) > 0 and all(isinstance(d, str) for d in data)


def is_causal_lm(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError("encoder-decoder models (T5, BART) are not supported by token attribution yet")
    return bool(callable(can) and can())


def context_length(model: nn.Module, tokenizer: Any) -> int | None:
    """The longest input the model reads: ``max_position_embeddings`` (or the tokenizer's limit)."""
    limits = [getattr(getattr(model, "config", None), "max_position_embeddings", None)]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < 10**7]
    return min(limits) if limits else None


def _texts(data: Any) -> list[str]:
    texts = [data] if isinstance(data, str) else list(data)
    if not texts:
        raise InputError("no text given: pass a string or a non-empty list of strings")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InputError(f"text {bad[0]} is a {type(texts[bad[0]]).__name__}, not a string; pass strings only")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise InputError(f"text {empty[0]} is empty (or only whitespace); every text needs at least one word")
    return texts


def _encode(tokenizer: Any, texts: list[str], special: bool) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and word ids (-1: none) of every text, unpadded."""
    enc = tokenizer(texts, add_special_tokens=special, padding=False, truncation=False)
    ids = [list(map(int, row)) for row in enc["input_ids"]]
    try:
        words = [[-1 if w is None else int(w) for w in enc.word_ids(i)] for i in range(len(texts))]
    except (ValueError, AttributeError):  # a slow tokenizer: words from the token strings
        words = [_space_words(tokenizer, row) for row in ids]
    return ids, words


def _space_words(tokenizer: Any, ids: Sequence[int], start: int = 0) -> list[int]:
    """Word ids of tokens whose word starts at a token beginning with a space (byte-level BPE / SentencePiece)."""
    out, word = [], start - 1
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(ids))):
        if int(ids[i]) in special:
            out.append(-1)
            continue
        if word < start or t.startswith(("Ġ", "▁", " ", "Ċ")):
            word += 1
        out.append(word)
    return out


def _truncate(rows: list[list[int]], limit: int | None, keep: str, what: str) -> list[list[int]]:
    if limit is None or max(map(len, rows)) <= limit:
        return rows
    long = [i for i, r in enumerate(rows) if len(r) > limit]
    warnings.warn(
        f"{len(long)} {what} (first: {long[0]}, {len(rows[long[0]])} tokens) are longer than the model's context of "
        f"{limit} tokens; they are truncated to their {'last' if keep == 'last' else 'first'} {limit} tokens. "
        "Shorten or split them to explain the whole text",
        stacklevel=4,
    )
    return [r[-limit:] if keep == "last" else r[:limit] for r in rows]


def _pad(rows: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists as ``(n, width)`` ids and attention mask, padded on the left or the right."""
    from torch.nn.utils.rnn import pad_sequence

    side = "left" if left else "right"
    seqs = [torch.tensor(r, dtype=torch.long) for r in rows]
    ids = pad_sequence(seqs, batch_first=True, padding_value=pad, padding_side=side)
    mask = pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True, padding_value=0, padding_side=side)
    return ids, mask


def _pad_lists(rows: list[list[int]], width: int, value: int, left: bool) -> list[list[int]]:
    return [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]


def _pad_id(tokenizer: Any, model: nn.Module) -> int:
    for owner, name in (
        (tokenizer, "pad_token_id"),
        (tokenizer, "eos_token_id"),
        (getattr(model, "config", None), "pad_token_id"),
    ):
        value = getattr(owner, name, None)
        if isinstance(value, int):
            return value
    return 0


def _ids_input(data: Any, attention_mask: Any, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, Mapping):
        attention_mask = data.get("attention_mask", attention_mask)
        data = data["input_ids"]
    ids = hf.token_ids(torch.as_tensor(data) if not isinstance(data, torch.Tensor) else data, model)
    if attention_mask is None:
        return ids.cpu().long(), torch.ones_like(ids, dtype=torch.long).cpu()
    mask = torch.as_tensor(attention_mask).cpu()
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}; give one per id")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise InputError("attention_mask must hold 0 (padding) and 1 (token) only")
    if bool((mask.sum(1) == 0).any()):
        raise InputError("a sequence of attention_mask has no token (all 0); every sequence needs one")
    return ids.cpu().long(), mask.long()


def _vocab_check(ids: list[list[int]] | torch.Tensor, model: nn.Module, what: str) -> None:
    vocab = hf.vocab_size(model)
    flat = [int(v) for row in (ids.tolist() if isinstance(ids, torch.Tensor) else ids) for v in row]
    bad = [v for v in flat if v < 0 or (vocab is not None and v >= vocab)]
    if bad:
        raise InputError(
            f"{what} holds token id {bad[0]}, outside the model's vocabulary [0, {vocab}); use ids from the "
            "model's own tokenizer"
        )


def _target_rows(target: Any, tokenizer: Any, n: int) -> list[list[int]]:
    """An LM's target continuations (strings or token id lists) as token id lists, one per prompt."""
    items = [target] if isinstance(target, str) else list(target) if isinstance(target, (list, tuple)) else None
    if items is None or len(items) != n:
        count = len(items) if items is not None else type(target).__name__
        raise TargetError(f"target must be one continuation (a string or token ids) per prompt ({n}), got {count}")
    rows = []
    for item in items:
        if isinstance(item, str):
            if tokenizer is None:
                raise InputError("target continuations given as text need tokenizer=")
            if not item:
                raise TargetError("a target continuation is empty; give at least one token")
            rows.append(list(map(int, tokenizer(item, add_special_tokens=False)["input_ids"])))
        else:
            ids = as_indices(item, TargetError).reshape(-1)
            if ids.numel() == 0:
                raise TargetError("a target continuation is empty; give at least one token")
            rows.append(ids.tolist())
    return rows


def _greedy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int, pad: int) -> torch.Tensor:
    """``steps`` greedy tokens per left-padded prompt, ``(n, steps)``, in one batched ``generate`` (model unchanged)."""
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1, max_new_tokens=steps)
    config.min_new_tokens, config.pad_token_id = steps, pad
    device = next(model.parameters()).device
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generation-config notices
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return out[:, ids.shape[1] :].cpu()


def make_text_task(
    model: Any,
    data: Any,
    target: Any = None,
    *,
    tokenizer: Any = None,
    attention_mask: Any = None,
    generate: int | None = None,
    output: str | None = None,
    max_length: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool | None = None,
    predicts_target: bool = False,
) -> TextTask:
    """The one place where a token-attribution request is checked, tokenized, generated and its target resolved.

    ``data``: a string, a list of strings (with ``tokenizer``), or ``input_ids`` (a tensor, or a tokenizer's
    encoding with ``attention_mask``). Classifiers: ``target`` is a class index (or one per text; default:
    the predicted class). Causal LMs: ``target`` is one continuation per prompt (text or token ids), or
    ``generate=N`` greedily generates ``N`` tokens per prompt (batched, left padding) and explains them;
    ``output`` is what is explained per target token (``"probability"``, inseq's default;
    ``"log_probability"`` or ``"logit"``). Texts longer than the model's context (``max_length``, default
    ``max_position_embeddings``) are truncated with a warning (an LM's prompt keeps its last tokens).
    ``predicts_target`` (a method whose first forward runs the texts themselves): a classifier's ``target=None``
    makes no prediction here; that forward chooses each text's class (``TextTask.predict``).
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"token attribution needs a PyTorch (Hugging Face) model, got a {type(model).__name__}")
    lm = is_causal_lm(model)
    output = output or ("probability" if lm else "logit")
    if output not in OUTPUTS:
        raise MethodError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if generate is not None and (not isinstance(generate, int) or isinstance(generate, bool) or generate < 1):
        raise InputError(f"generate must be a positive number of tokens, got {generate!r}")
    if generate is not None and not lm:
        raise InputError("generate= needs a causal language model; a classifier explains its class (target=)")
    limit = max_length if max_length is not None else context_length(model, tokenizer)
    if isinstance(data, torch.Tensor) or (isinstance(data, Mapping) and "input_ids" in data):
        ids, mask = _ids_input(data, attention_mask, model)
        rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
        words = [_space_words(tokenizer, r) if tokenizer is not None else list(range(len(r))) for r in rows]
    else:
        if tokenizer is None:
            raise InputError("text needs its model's tokenizer: pass tokenizer= (e.g. AutoTokenizer.from_pretrained)")
        if not isinstance(data, (str, list, tuple)):
            raise InputError(f"data must be a string, a list of strings or input_ids, got a {type(data).__name__}")
        rows, words = _encode(tokenizer, _texts(data), special=True)
    wordless = [i for i, ws in enumerate(words) if not any(w >= 0 for w in ws)]
    if wordless:
        raise InputError(f"text {wordless[0]} has no tokens besides special tokens; every text needs at least one word")
    n = len(rows)
    pad = _pad_id(tokenizer, model)
    if not lm:
        rows = _truncate(rows, limit, "first", "texts")
        words = [w[: len(r)] for w, r in zip(words, rows)]
        ids, mask = _pad(rows, pad, left=False)
        predict = predicts_target and target is None
        if predict:
            tgt = torch.full((n, 1), -1)
        else:  # a method that reads the texts' outputs checks a given class on its first call: no probe row
            tgt = _given_classes(target, n) if predicts_target else _class_target(model, target, ids, mask, n)
        task = TextTask(model, ids, mask, tgt, torch.ones_like(tgt, dtype=torch.bool), "classifier", predict=predict)
        task.unchecked = predicts_target and not predict
        return _finish(task, rows, words, tokenizer, output, seed, batch_size, progress)
    if target is None and generate is None:
        raise TargetError("a causal LM explains a continuation: pass target=['continuation', ...] or generate=N")
    if target is not None and generate is not None:
        raise TargetError("give either target= (continuations) or generate=N, not both")
    room = None if limit is None else limit - (generate or max(map(len, _target_rows(target, tokenizer, n))))
    if room is not None and room < 1:
        raise InputError(f"the targets are as long as the model's context ({limit} tokens); shorten them")
    rows = _truncate(rows, room, "last", "prompts")
    words = [w[-len(r) :] for w, r in zip(words, rows)]
    p_ids, p_mask = _pad(rows, pad, left=True)
    if generate is not None:
        cont = _greedy(model, p_ids, p_mask, generate, pad)
        cont_mask = _after_eos(cont, getattr(tokenizer, "eos_token_id", None) or model.generation_config.eos_token_id)
    else:
        targets = _target_rows(target, tokenizer, n)
        _vocab_check(targets, model, "target")
        cont, cont_mask = _pad(targets, pad, left=False)
    ids = torch.cat([p_ids, cont], 1)
    mask = torch.cat([p_mask, cont_mask.long()], 1)
    task = TextTask(model, ids, mask, cont, cont_mask.bool(), "lm", prompt_len=int(p_ids.shape[1]))
    task.generated = generate is not None
    width = p_ids.shape[1]
    words = [_pad_lists([w], width, -1, left=True)[0] for w in words]
    for i, w in enumerate(words):  # the target tokens' words follow the prompt's
        start = max(w) + 1 if max(w, default=-1) >= 0 else 0
        cont_words = _space_words(tokenizer, cont[i].tolist(), start) if tokenizer is not None else []
        words[i] = w + (cont_words or [-1] * cont.shape[1])
    return _finish(task, None, words, tokenizer, output, seed, batch_size, progress)


def _after_eos(cont: torch.Tensor, eos: Any) -> torch.Tensor:
    """``(n, T)`` True up to and including the first end-of-sequence token of each generated row."""
    if not isinstance(eos, int):
        return torch.ones_like(cont, dtype=torch.bool)
    seen = (cont == eos).long().cumsum(1)
    return (seen == 0) | ((seen == 1) & (cont == eos))


def _class_target(model: nn.Module, target: Any, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """``(n, 1)`` class per text: given (checked against the classifier's outputs) or predicted (batched)."""
    device = next(model.parameters()).device

    def logits(s: slice) -> torch.Tensor:
        with torch.no_grad():
            return _logits(model(input_ids=ids[s].to(device), attention_mask=mask[s].to(device)), 2)

    if target is None:
        return (
            torch.cat([logits(slice(i, i + ROWS_PER_CALL)) for i in range(0, n, ROWS_PER_CALL)])
            .argmax(1)
            .cpu()[:, None]
        )
    tgt = _given_classes(target, n)
    _check_classes(tgt[:, 0], int(logits(slice(0, 1)).shape[1]))
    return tgt


def _given_classes(target: Any, n: int) -> torch.Tensor:
    """A given class per text as ``(n, 1)`` indices (one index or one per text; none negative)."""
    tgt = as_indices(target)
    tgt = tgt.expand(n).clone() if tgt.ndim == 0 else tgt
    if tgt.shape != (n,):
        raise TargetError(f"target has shape {tuple(tgt.shape)}; give one class index or one per text ({n})")
    _check_classes(tgt, None)
    return tgt[:, None]


def _check_classes(tgt: torch.Tensor, n_out: int | None) -> None:
    """Every class index non-negative and (``n_out`` known) below the classifier's output count."""
    bad = (tgt < 0) if n_out is None else (tgt < 0) | (tgt >= n_out)
    if bool(bad.any()):
        value = int(tgt[bad][0])
        if n_out is None:
            raise TargetError(f"target {value} is out of range: class indices are 0 or more")
        raise TargetError(f"target {value} is out of range: the classifier has {n_out} classes, indices 0..{n_out - 1}")


def _finish(
    task: TextTask,
    rows: list[list[int]] | None,
    words: list[list[int]],
    tokenizer: Any,
    output: str,
    seed: int,
    batch_size: int | None,
    progress: bool | None,
) -> TextTask:
    """Token strings, word ids and words aligned to the padded ids; options; the special-token mask."""
    width = task.input_ids.shape[1]
    if rows is not None:  # a classifier: right padding
        words = _pad_lists(words, width, -1, left=False)
    ids = task.input_ids.tolist()
    if tokenizer is not None:
        task.tokens = [tokenizer.convert_ids_to_tokens(r) for r in ids]
        special_ids = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)
        task.special = torch.isin(task.input_ids, special_ids) & task.attention_mask.bool()
    else:
        task.tokens = [[str(v) for v in r] for r in ids]
        task.special = torch.zeros_like(task.input_ids, dtype=torch.bool)
    real = task.attention_mask.bool().tolist()
    task.word_ids = [[w if ok else -1 for w, ok in zip(ws, rr)] for ws, rr in zip(words, real)]
    task.words = [_word_strings(tokenizer, toks, ws) for toks, ws in zip(task.tokens, task.word_ids)]
    task.output, task.tokenizer, task.seed, task.batch_size, task.progress = (
        output,
        tokenizer,
        seed,
        batch_size,
        progress,
    )
    return task


def _word_strings(tokenizer: Any, tokens: list[str], word_ids: list[int]) -> list[str]:
    groups: dict[int, list[str]] = {}
    for t, w in zip(tokens, word_ids):
        if w >= 0:
            groups.setdefault(w, []).append(t)
    join = getattr(tokenizer, "convert_tokens_to_string", None)
    size = max(groups, default=-1) + 1
    return [(join(groups[w]).strip() if join else "".join(groups[w])) if w in groups else "" for w in range(size)]


# ------------------------------------------------------------------ registering token scorers
_CHOOSES_CLASS: set[Callable[..., Any]] = set()


def chooses_class(fn: Callable[..., Any]) -> bool:
    """Whether a token scorer takes a classifier's predicted class from its own forward of the texts."""
    return fn in _CHOOSES_CLASS


def text_scorer(
    name: str, *, family: str, aliases: tuple[str, ...] = (), predicts_target: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(task: TextTask, **params)`` as the token implementation of method ``name``.

    A name already registered (``integrated_gradients`` for features and pixels) gains unit ``token``
    and runs ``fn`` on text; a new name becomes a token-only method. The function returns ``(values,
    extra)`` like every scorer; ``task.extra()`` (tokens, words, layout) is added by the caller.
    ``predicts_target``: ``fn``'s first forward runs the texts themselves (``TextTask.scores(..., own=True)``),
    so a classifier's predicted class comes from it (:func:`chooses_class`).
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if predicts_target:
            _CHOOSES_CLASS.add(fn)
        if name in SCORERS.entries:
            SCORERS.extend(name, "token", fn, aliases)
        else:
            SCORERS.add(
                Method(name, fn, "explain", ("token",), family, "module", aliases=aliases, variants={"token": fn})
            )
        return fn

    return register
