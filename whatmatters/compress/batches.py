"""Calibration data as model calls: :class:`Batch` es from tensors, dicts, pairs or texts, LM windows,
calling the model on one batch, and the default calibration loss.

Padding tokens (``attention_mask == 0``) are marked in ``Batch.mask`` and left out of the loss.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from whatmatters.core import hf
from whatmatters.core.errors import InputError, ModelError


@dataclass
class Batch:
    """One model call: positional ``args`` or keyword ``kwargs``, optional ``labels``, token ``mask`` and
    ``weights`` (``(batch, seq_len)``: each token's share in a layer Hessian, as RSQ scales them)."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    labels: Any = None
    weights: torch.Tensor | None = None

    @property
    def size(self) -> int:
        first = self.args[0] if self.args else next(iter(self.kwargs.values()))
        return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim else 1

    @property
    def mask(self) -> torch.Tensor | None:
        mask = self.kwargs.get("attention_mask")
        return mask.bool() if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None

    def split(self, size: int) -> list[Batch]:
        """Sub-batches of at most ``size`` rows (every tensor with this batch's leading size is split)."""
        n = self.size
        if n <= size:
            return [self]

        def cut(x: Any, s: slice) -> Any:
            return x[s] if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == n else x

        return [
            Batch(
                tuple(cut(a, slice(i, i + size)) for a in self.args),
                {k: cut(v, slice(i, i + size)) for k, v in self.kwargs.items()},
                cut(self.labels, slice(i, i + size)),
                cut(self.weights, slice(i, i + size)),
            )
            for i in range(0, n, size)
        ]

    def to(self, device: torch.device) -> Batch:
        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, torch.Tensor) else x

        args, kwargs = tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()}
        return Batch(args, kwargs, move(self.labels), move(self.weights))


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):  # ragged lists -> one padded tensor (per text, not per token)
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _tokenize(texts: list[str], tokenizer: Any, batch_size: int, max_length: int) -> list[Batch]:
    if tokenizer is None:
        raise InputError("text calibration data needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)")
    if any(not isinstance(t, str) for t in texts):
        raise InputError("calibration texts must all be strings")
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for i in range(0, len(encoded), batch_size):
        rows = [r for r in encoded[i : i + batch_size] if len(r)]
        if rows:
            ids, mask = _pad(rows, pad_id)
            batches.append(Batch(kwargs={"input_ids": ids, "attention_mask": mask}))
    return batches


def _from_tensor(x: torch.Tensor, batch_size: int) -> list[Batch]:
    if x.ndim == 0 or x.shape[0] == 0:
        raise InputError(f"calibration data of shape {tuple(x.shape)} is empty")
    if not x.is_floating_point() and x.ndim == 1:
        x = x.unsqueeze(0)
    if x.is_floating_point() and bool(torch.isnan(x).any()):
        raise InputError("calibration data contains NaN")
    chunks = x.split(batch_size)
    if x.is_floating_point():
        return [Batch(args=(c,)) for c in chunks]
    return [Batch(kwargs={"input_ids": c}) for c in chunks]


def _from_mapping(m: Mapping[str, Any], batch_size: int) -> list[Batch]:
    items = {k: (torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v) for k, v in m.items()}
    labels = items.pop("labels", None)
    return Batch(kwargs=items, labels=labels).split(batch_size)


def as_batches(data: Any, tokenizer: Any = None, *, batch_size: int = 8, max_length: int = 128) -> list[Batch]:
    """Normalise calibration data to a list of :class:`Batch`.

    Accepted: a list of strings (tokenized with ``tokenizer``, truncated to ``max_length``, padded per
    batch); a tensor (token ids ``(n, L)`` or inputs ``(n, ...)``, split into batches of ``batch_size``);
    a dict / ``BatchEncoding`` of tensors (model keyword arguments; a ``labels`` entry is used by the
    loss); or an iterable of batches (a ``DataLoader``): each a tensor, a dict, or an ``(inputs, labels)``
    pair.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    if data is None:
        raise InputError("this method needs calibration data: pass data=texts (with tokenizer=) or token id batches")
    if isinstance(data, str):
        data = [data]
    if isinstance(data, torch.Tensor):
        return _from_tensor(data, batch_size)
    if isinstance(data, Mapping):
        return _from_mapping(data, batch_size)
    if isinstance(data, Sequence) and data and all(isinstance(t, str) for t in data):
        return _tokenize(list(data), tokenizer, batch_size, max_length)
    if not isinstance(data, Iterable):
        raise InputError(f"cannot use {type(data).__name__} as calibration data; give texts, tensors or batches")
    batches: list[Batch] = []
    for item in data:
        if isinstance(item, Batch):
            batches.append(item)
        elif isinstance(item, torch.Tensor):
            batches += _from_tensor(item, len(item) if item.ndim else 1)
        elif isinstance(item, Mapping):
            batches += _from_mapping(item, 1 << 30)
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (torch.Tensor, Mapping)):
            (b,) = _from_mapping(item[0], 1 << 30) if isinstance(item[0], Mapping) else [Batch(args=(item[0],))]
            b.labels = torch.as_tensor(item[1])
            batches.append(b)
        else:
            raise InputError(
                f"calibration batch of type {type(item).__name__} not understood; give a tensor, "
                "a dict of tensors or an (inputs, labels) pair"
            )
    if not batches:
        raise InputError("calibration data is empty")
    return batches


def lm_windows(
    texts: Sequence[str], tokenizer: Any, *, n_sequences: int = 128, seq_len: int = 128, seed: int = 0
) -> torch.Tensor:
    """Wanda-style LM calibration: ``n_sequences`` random windows of ``seq_len`` tokens ``(n, seq_len)``.

    The texts are joined with blank lines, tokenized once, and windows start at random offsets
    (seeded); they may overlap when the text is short.
    """
    if isinstance(texts, str):
        texts = [texts]
    ids = torch.as_tensor(tokenizer("\n\n".join(texts))["input_ids"], dtype=torch.long).reshape(-1)
    if len(ids) <= seq_len:
        raise InputError(f"the texts hold {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    starts = torch.as_tensor(random.Random(seed).choices(range(len(ids) - seq_len), k=n_sequences))
    return ids[starts.unsqueeze(1) + torch.arange(seq_len)]


def call_model(model: nn.Module, batch: Batch) -> Any:
    """``model`` on one batch (``use_cache=False``); token ids are checked against the model's vocabulary."""
    kwargs = dict(batch.kwargs)
    ids = kwargs.get("input_ids", batch.args[0] if batch.args else None)
    if isinstance(ids, torch.Tensor) and hf.vocab_size(model) is not None:
        hf.token_ids(ids, model)
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        params = inspect.signature(model.forward).parameters
        if "use_cache" in params:
            kwargs["use_cache"] = False
    return model(*batch.args, **kwargs)


def _is_causal_lm(model: nn.Module) -> bool:
    name = type(model).__name__
    config = getattr(model, "config", None)
    return name.endswith(("ForCausalLM", "LMHeadModel")) or bool(getattr(config, "is_decoder", False))


def default_loss(model: nn.Module, output: Any, batch: Batch) -> torch.Tensor:
    """The calibration loss used when none is given (the same rule for every gradient score).

    * the model computed a loss itself (labels were passed): that loss;
    * causal LMs: next-token cross-entropy on the input ids (padding ignored);
    * given labels: cross-entropy for integer labels, mean squared error for float labels;
    * classifiers without labels: cross-entropy to the model's own predictions (pseudo-labels);
    * encoders returning hidden states: half the mean squared norm of the last hidden state over
      non-padding tokens ("output energy"), a label-free sensitivity of the representation.
    """
    if getattr(output, "loss", None) is not None:
        return output.loss
    logits = getattr(output, "logits", None)
    hidden = getattr(output, "last_hidden_state", None)
    if logits is None and hidden is None:
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(tensor, torch.Tensor):
            raise ModelError(
                f"cannot derive a calibration loss from an output of type {type(output).__name__}; "
                "pass loss=lambda output, inputs, labels: ... returning a scalar"
            )
        logits = tensor if (tensor.ndim == 2 or batch.labels is not None) else None
        hidden = tensor if logits is None else None
    ids = batch.kwargs.get("input_ids")
    mask = batch.mask
    if logits is not None and batch.labels is None and ids is not None and logits.ndim == 3 and _is_causal_lm(model):
        target = ids[:, 1:].clone()
        if mask is not None:
            target[~mask[:, 1:]] = -100
        return nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
        )
    if logits is not None:
        labels = batch.labels
        if labels is not None and labels.is_floating_point():
            return nn.functional.mse_loss(logits.float(), labels.to(logits.device).float().reshape(logits.shape))
        flat = logits.float().reshape(-1, logits.shape[-1])
        if labels is None:
            labels = flat.argmax(-1).detach()
        return nn.functional.cross_entropy(flat, labels.to(flat.device).reshape(-1).long())
    h = hidden.float()
    if mask is not None and h.ndim == 3 and h.shape[:2] == mask.shape:
        h = h[mask]
    return 0.5 * h.square().sum(-1).mean()
