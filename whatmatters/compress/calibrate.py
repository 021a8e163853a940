"""Calibration: run a model over a few batches and reduce what the weight scores need, on the fly.

Forward hooks on every selected ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's transposed linear)
reduce each layer's input activations per input channel as they pass: token count, sum, sum of squares
and the centred sum of squares (a running mean / variance, merged batch by batch with Chan's formula).
Activations are never stored, so memory is the model's own forward pass plus ``O(in_features)`` per
layer. Gradient statistics (sum and sum of squares of per-sample weight gradients) take the size of the
selected weights once or twice; they are only computed for the scores that need them.

Padding tokens (``attention_mask == 0``) are left out of every statistic and of the loss.
"""

from __future__ import annotations

import inspect
import random
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.state import hooks, parameter_device_dtype, preserved
from whatmatters.core.task import progress_bar

# Output heads, left out of the default layer selection (as Wanda/SparseGPT leave out ``lm_head``).
HEAD_PATTERN = re.compile(r"(^|\.)(lm_head|classifier|score|qa_outputs|cls|head|heads)(\.|$)")

LossFn = Callable[[Any, Any, Any], torch.Tensor]


# ------------------------------------------------------------------ layers
def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` when transformers is already imported (it never is imported for this)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_prunable(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_transposed(module: nn.Module) -> bool:
    """True for ``Conv1D``, whose weight is stored ``(in_features, out_features)``."""
    return not isinstance(module, nn.Linear)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(out_features, in_features)`` (a view; transposed for ``Conv1D``)."""
    w = module.weight
    return w.t() if is_transposed(module) else w


def match_layers(found: dict[str, nn.Module], layers: str | Sequence[str], what: str) -> dict[str, nn.Module]:
    """The layers of ``found`` whose names match the regular expression(s) ``layers`` (each must match one)."""
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise InputError("layers is an empty list; give a regular expression such as r'mlp' or None for all layers")
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as err:
            raise InputError(f"layer pattern {pattern!r} is not a valid regular expression: {err}") from None
        hits = {n for n in found if regex.search(n)}
        if not hits:
            raise InputError(
                f"unknown layer pattern {pattern!r}: it matches none of the model's {len(found)} {what} "
                f"(e.g. {', '.join(list(found)[:4])}); give a regular expression searched in these names"
            )
        chosen |= hits
    return {n: m for n, m in found.items() if n in chosen}


def select_layers(model: Any, layers: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The ``nn.Linear`` / ``Conv1D`` layers to score, by name, in model order.

    ``layers=None``: all of them except output heads (``lm_head``, ``classifier``, ``score``, ...).
    A string or a list of strings: regular expressions searched in the full module names
    (``model.named_modules()``); every pattern must match at least one layer.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"weight scores and pruning need a PyTorch nn.Module (a transformers model or plain torch), "
            f"got {type(model).__name__}"
        )
    found = {name: m for name, m in model.named_modules() if name and is_prunable(m)}
    if not found:
        raise ModelError(
            f"{type(model).__name__} has no nn.Linear or transformers Conv1D layer, so it has no weights "
            "whatmatters can score or prune; convolutional layers (nn.Conv2d) are not supported yet"
        )
    if layers is None:
        chosen = {n: m for n, m in found.items() if not HEAD_PATTERN.search(n)}
        if not chosen:
            raise ModelError("every linear layer of the model is an output head; select layers with layers='regex'")
        return chosen
    return match_layers(found, layers, "linear layers")


# ----------------------------------------------------------------- batches
@dataclass
class Batch:
    """One model call: positional ``args`` or keyword ``kwargs``, optional ``labels``, token ``mask``."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    labels: Any = None

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
            )
            for i in range(0, n, size)
        ]

    def to(self, device: torch.device) -> Batch:
        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, torch.Tensor) else x

        return Batch(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()}, move(self.labels))


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
        if isinstance(item, torch.Tensor):
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


# ------------------------------------------------------------- statistics
@dataclass
class ActivationStats:
    """Per-input-channel statistics of one layer's inputs over all calibration tokens (float64)."""

    count: float
    sum: torch.Tensor
    sumsq: torch.Tensor
    m2: torch.Tensor  # centred sum of squares

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1.0)

    @property
    def var(self) -> torch.Tensor:
        """Population variance of each input channel."""
        return self.m2 / max(self.count, 1.0)

    @property
    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` over all calibration tokens."""
        return self.sumsq.sqrt()


@dataclass
class GradientStats:
    """Sum and sum of squares of per-batch weight gradients ``(out, in)`` over ``count`` batches."""

    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor | None


class _Reducer:
    """Forward hook state of one layer: reduces its inputs per channel, batch by batch."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        self.count = 0.0
        self.sum = torch.zeros(in_features, dtype=dtype, device=device)
        self.sumsq = torch.zeros_like(self.sum)
        self.m2 = torch.zeros_like(self.sum)
        self.mask: torch.Tensor | None = None

    def __call__(self, _module: nn.Module, inputs: tuple, _output: Any) -> None:
        x = inputs[0].detach()
        if self.mask is not None and x.ndim == 3 and x.shape[:2] == self.mask.shape:
            x = x[self.mask]
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        s = x.sum(0).to(self.sum.dtype)
        mean_b = s / n
        m2_b = (x - mean_b.to(x.dtype)).square().sum(0).to(self.sum.dtype)
        total = self.count + n
        delta = mean_b - self.sum / max(self.count, 1.0)
        self.m2 += m2_b + delta.square() * (self.count * n / total)
        self.sum += s
        self.sumsq += x.square().sum(0).to(self.sum.dtype)
        self.count = total

    def stats(self) -> ActivationStats:
        return ActivationStats(self.count, self.sum, self.sumsq, self.m2)


# -------------------------------------------------------------------- loss
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


# ------------------------------------------------------------- calibration
def call_model(model: nn.Module, batch: Batch) -> Any:
    kwargs = dict(batch.kwargs)
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        params = inspect.signature(model.forward).parameters
        if "use_cache" in params:
            kwargs["use_cache"] = False
    return model(*batch.args, **kwargs)


class Calibration:
    """Calibration statistics of one model's layers, computed on first use and kept for reuse.

    Build it with :func:`calibrate` and pass it as ``data=`` to several ``score`` calls: activations
    and gradients are then computed once for all of them.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[Batch],
        layers: Mapping[str, nn.Module],
        *,
        loss: LossFn | None = None,
        grad_batch_size: int = 1,
        progress: bool | None = None,
    ) -> None:
        if grad_batch_size < 1:
            raise InputError(f"grad_batch_size must be at least 1, got {grad_batch_size}")
        self.model = model
        self.batches = batches
        self.layers = dict(layers)
        self.loss = loss
        self.grad_batch_size = grad_batch_size
        self.progress = progress
        self.activations: dict[str, ActivationStats] = {}
        self.gradients: dict[str, GradientStats] = {}
        self.n_sequences = sum(b.size for b in batches)
        self.mean_loss: float | None = None

    def __repr__(self) -> str:
        have = [k for k, v in (("activations", self.activations), ("gradients", self.gradients)) if v]
        return (
            f"Calibration({len(self.batches)} batches, {self.n_sequences} sequences, {len(self.layers)} layers, "
            f"computed: {', '.join(have) or 'nothing yet'})"
        )

    def check_model(self, model: nn.Module, names: Iterable[str]) -> None:
        if model is not self.model:
            raise InputError("this Calibration was computed for another model; calibrate the model being scored")
        missing = [n for n in names if n not in self.layers]
        if missing:
            raise InputError(f"this Calibration does not cover layers {missing[:3]}; calibrate with layers=None")

    def need(self, *, activations: bool = False, gradient_sum: bool = False, gradient_sumsq: bool = False) -> None:
        """Compute what is missing: activation statistics and/or gradient sums (and squares)."""
        want_act = activations and not self.activations
        have_sumsq = bool(self.gradients) and next(iter(self.gradients.values())).sumsq is not None
        want_grad = (gradient_sum and not self.gradients) or (gradient_sumsq and not have_sumsq)
        if want_act or want_grad:
            self._run(want_act, want_grad, squares=gradient_sumsq or have_sumsq)

    def _run(self, activations: bool, gradients: bool, squares: bool) -> None:
        model = self.model
        device, _ = parameter_device_dtype(model)
        reducers = {n: _Reducer(weight_matrix(m).shape[1], device) for n, m in self.layers.items()}
        weights = {n: m.weight for n, m in self.layers.items()}
        shapes = {n: weight_matrix(m).shape for n, m in self.layers.items()} if gradients else {}
        grad_sum = {n: torch.zeros(shape, device=device) for n, shape in shapes.items()}
        grad_sq = {n: torch.zeros(shape, device=device) for n, shape in shapes.items()} if squares else {}
        handles = [m.register_forward_hook(reducers[n]) for n, m in self.layers.items()] if activations else []
        # Per-sample gradients when their squares are needed (empirical Fisher); whole batches otherwise.
        step = self.grad_batch_size if squares else 1 << 30
        count, losses = 0, []
        with preserved(model), hooks(*handles):
            model.eval()
            if gradients:
                for p in model.parameters():
                    p.requires_grad_(False)
                for w in weights.values():
                    w.requires_grad_(True)
            total = len(self.batches)
            for batch in progress_bar(self.batches, total, "calibrating", self.progress):
                batch = batch.to(device)
                if not gradients:
                    for r in reducers.values():
                        r.mask = batch.mask
                    with torch.no_grad():
                        call_model(model, batch)
                    continue
                for part in batch.split(step):
                    for r in reducers.values():
                        r.mask = part.mask
                    with torch.enable_grad():
                        output = call_model(model, part)
                        loss = self.loss(output, part.kwargs or part.args[0], part.labels) if self.loss else None
                        loss = default_loss(model, output, part) if loss is None else loss
                        if not torch.is_tensor(loss) or loss.numel() != 1:
                            raise ModelError("the calibration loss must be a scalar tensor")
                        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                    losses.append(float(loss.detach()))
                    count += 1
                    for (name, m), g in zip(self.layers.items(), grads):
                        if g is None:
                            continue  # the layer was not used by this input
                        g = g.detach().float()
                        g = g.t() if is_transposed(m) else g
                        grad_sum[name] += g
                        if squares:
                            grad_sq[name] += g.square()
        if activations:
            self.activations = {n: r.stats() for n, r in reducers.items()}
        if gradients:
            self.gradients = {n: GradientStats(count, grad_sum[n], grad_sq.get(n)) for n in self.layers}
            self.mean_loss = sum(losses) / max(len(losses), 1)


def calibrate(
    model: nn.Module,
    data: Any,
    tokenizer: Any = None,
    *,
    layers: str | Sequence[str] | None = None,
    activations: bool = True,
    gradients: bool | str = False,
    loss: LossFn | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    grad_batch_size: int = 1,
    progress: bool | None = None,
) -> Calibration:
    """Calibration statistics for ``model`` on ``data``, to pass as ``data=`` to several scores.

    Args:
        data: calibration texts (with ``tokenizer``), token id / input tensors, dicts or a DataLoader
            (see :func:`as_batches`); for LMs :func:`lm_windows` makes Wanda-style random windows.
        layers: regex(es) selecting layers (default: every linear layer but output heads).
        activations: reduce input activations now (Wanda, gradient Wanda, FLAP need them).
        gradients: ``"sum"`` (Taylor), ``"sumsq"`` or ``True`` (Fisher, gradient Wanda: sum and squares of
            per-sample gradients), ``False``: none now (computed later when a score needs them).
        loss: ``loss(output, inputs, labels) -> scalar``; default :func:`default_loss`.
        grad_batch_size: rows per gradient when squares are taken (1 = per-sample empirical Fisher).
    """
    if gradients not in (False, True, "sum", "sumsq"):
        raise InputError(f"gradients must be False, True, 'sum' or 'sumsq', got {gradients!r}")
    chosen = select_layers(model, layers)
    if isinstance(data, Calibration):
        raise InputError("data is already a Calibration")
    cal = Calibration(
        model,
        as_batches(data, tokenizer, batch_size=batch_size, max_length=max_length),
        chosen,
        loss=loss,
        grad_batch_size=grad_batch_size,
        progress=progress,
    )
    cal.need(activations=activations, gradient_sum=bool(gradients), gradient_sumsq=gradients in (True, "sumsq"))
    return cal
