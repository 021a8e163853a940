"""Layer Hessians ``H = 2/n X Xᵀ`` from calibration data, block after block, for GPTQ and SparseGPT.

:func:`reconstruct_sequentially` groups the selected layers by transformer block (the children of the
model's ``nn.ModuleList`` of layers; a layer outside one is a group of its own), and for each group in
model order runs the calibration batches through the model *as changed so far*, stopping at the end of the
group, with forward hooks that accumulate each layer's ``XᵀX``. The group's layers are then processed
(quantized or pruned) before the next group's Hessians are taken, so every block's inputs come from the
already-compressed blocks before it, as in the reference; within a block all layers see the block's dense
inputs (the reference without ``--true-sequential``). When every layer is inside the blocks, the first
block's call arguments are captured once and each block then runs on its own, on the previous block's
outputs (two block calls per block: about two forward passes in all); otherwise the model runs up to each
group's end (about ``n_groups / 2`` forward passes).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from whatmatters.compress.batches import Batch, as_batches, call_model
from whatmatters.compress.calibrate import Calibration, token_rows
from whatmatters.compress.linear import select_layers, weight_matrix
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.fractions import whole
from whatmatters.core.state import hooks, parameter_device_dtype
from whatmatters.core.task import progress_bar

Rows = tuple[torch.Tensor | None, torch.Tensor | None]  # a batch's token mask and token weights


class _Stop(Exception):
    """Raised by a forward hook at the end of a group: the rest of the model is not needed."""


def _raise_stop(*_: Any) -> None:
    raise _Stop


class HessianSum:
    """Forward hook state: ``XᵀX`` (float32) and the token count of one layer's inputs (padding left out);
    with token ``weights`` ``(batch, seq_len)``, ``Xᵀ diag(r) X`` (RSQ's scaled tokens)."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.xtx = torch.zeros(n, n, device=device)
        self.count = 0
        self.mask: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None

    def see(self, rows: Rows) -> None:
        self.mask, self.weights = rows

    def __call__(self, _module: nn.Module, inputs: tuple, _output: Any) -> None:
        x = token_rows(inputs[0], self.mask)
        if self.weights is None:
            self.xtx.addmm_(x.T, x)
        else:
            r = token_rows(self.weights.unsqueeze(-1), self.mask).reshape(-1)
            if r.shape[0] != x.shape[0]:
                raise ModelError(f"{r.shape[0]} token weights for a layer input of {x.shape[0]} tokens")
            self.xtx.addmm_((x * r[:, None]).T, x)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.xtx * (2 / max(self.count, 1))


def layer_groups(
    model: nn.Module, layers: Mapping[str, nn.Module]
) -> tuple[nn.ModuleList | None, list[tuple[nn.Module, list[str]]]]:
    """The model's ``ModuleList`` of blocks (None if none holds several selected layers) and the
    ``(module to stop after, layer names)`` of every block (or lone layer), in model order."""
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    under = {p: sum(n.startswith(p + ".") for n in layers) for p in lists}
    blocks = max(under, key=under.get) if under and max(under.values()) > 1 else None
    groups: list[tuple[str, nn.Module, list[str]]] = []
    for name, module in layers.items():
        key, stop = name, module
        if blocks is not None and name.startswith(blocks + "."):
            key = blocks + "." + name[len(blocks) + 1 :].split(".")[0]
            stop = model.get_submodule(key)
        if groups and groups[-1][0] == key:
            groups[-1][2].append(name)
        else:
            groups.append((key, stop, [name]))
    container = model.get_submodule(blocks) if blocks is not None else None
    return container, [(stop, names) for _, stop, names in groups]


def check_options(damp: object, block_size: object) -> int:
    """``damp`` in (0, 1] and ``block_size`` as a positive int (returned), the options every OBS sweep takes."""
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not 0 < damp <= 1:
        raise InputError(f"damp must be a fraction of the mean Hessian diagonal in (0, 1], got {damp!r}")
    return whole(block_size, "block_size", minimum=1, meaning="columns per lazy update")


def prepare(
    model: nn.Module, data: Any, tokenizer: Any, layers: Any, batch_size: int, max_length: int
) -> tuple[nn.Module, list[Batch], dict[str, nn.Module]]:
    """A deep copy of ``model`` to change, the calibration batches and the copy's selected layers by name."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"this action needs a PyTorch nn.Module, got {type(model).__name__}")
    chosen = list(select_layers(model, layers))
    if isinstance(data, Calibration):
        data.check_model(model, chosen)
        batches = data.batches
    else:
        batches = [] if data is None else as_batches(data, tokenizer, batch_size=batch_size, max_length=max_length)
    new = copy.deepcopy(model)
    modules = dict(new.named_modules())
    return new, batches, {n: modules[n] for n in chosen}


Process = Callable[[str, nn.Module, torch.Tensor, int], None]
Cached = list[tuple[tuple, dict[str, Any], Rows]]  # a block's (args, kwargs, token mask and weights) per batch


def _block_inputs(model: nn.Module, block: nn.Module, batches: list[Batch], device: torch.device) -> Cached:
    """The positional and keyword arguments ``block`` is called with, for every batch (the model stops there)."""
    cache: Cached = []
    rows: list[Rows] = [(None, None)]

    def grab(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        cache.append((args, kwargs, rows[0]))
        raise _Stop

    with hooks(block.register_forward_pre_hook(grab, with_kwargs=True)), torch.no_grad():
        for batch in batches:
            batch = batch.to(device)
            rows[0] = (batch.mask, batch.weights)
            with contextlib.suppress(_Stop):
                call_model(model, batch)
    return cache


def _next_inputs(block: nn.Module, cache: Cached) -> Cached:
    """``block``'s outputs as the next block's hidden states (the other arguments are shared by all blocks)."""
    out: Cached = []
    with torch.no_grad():
        for args, kwargs, rows in cache:
            hidden = block(*args, **kwargs)
            hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
            if args:
                out.append(((hidden, *args[1:]), kwargs, rows))
            else:
                out.append(((), {**kwargs, "hidden_states": hidden}, rows))
    return out


class _Collector:
    """Hessian sums of one group of layers, checked and handed to ``process``."""

    def __init__(self, layers: Mapping[str, nn.Module], process: Process, device: torch.device) -> None:
        self.layers, self.process, self.device, self.warned = layers, process, device, False

    def run(self, names: list[str], call: Callable[[dict[str, HessianSum]], None]) -> None:
        sums = {n: HessianSum(weight_matrix(self.layers[n]).shape[1], self.device) for n in names}
        with hooks(*[self.layers[n].register_forward_hook(sums[n]) for n in names]), torch.no_grad():
            call(sums)
        for name in names:
            count, n_in = sums[name].count, sums[name].xtx.shape[0]
            if count == 0:
                raise ModelError(f"layer {name} was not called on the calibration data; select other layers")
            if count < n_in and not self.warned:  # once per call: every layer sees the same tokens
                self.warned = True
                warnings.warn(
                    f"layer {name} saw {count} calibration tokens, fewer than its {n_in} inputs: its Hessian "
                    "is singular and only dampening keeps it invertible (the same may hold for other layers); "
                    "give more calibration data",
                    UserWarning,
                    stacklevel=4,
                )
            self.process(name, self.layers[name], sums[name].hessian(), count)


def reconstruct_sequentially(
    model: nn.Module,
    batches: list[Batch],
    layers: Mapping[str, nn.Module],
    process: Process,
    *,
    description: str,
    progress: bool | None = None,
    cache_inputs: bool = True,
) -> None:
    """Call ``process(name, layer, hessian, n_tokens)`` for every layer, block by block (module docstring).

    When every layer is inside the model's list of blocks (``cache_inputs``), the first block's inputs are
    captured once and each block is then run on its own, on the outputs of the processed block before it
    (as the reference does: one pass over the blocks); otherwise the model runs up to each group's end.
    ``model`` is changed by ``process`` (it is the caller's copy); it runs in eval mode and without gradients.
    """
    device, _ = parameter_device_dtype(model)
    container, groups = layer_groups(model, layers)
    children = list(container) if container is not None else []
    cached = cache_inputs and bool(children) and all(any(stop is c for c in children) for stop, _ in groups)
    collector = _Collector(layers, process, device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if cached:
            index = {id(c): i for i, c in enumerate(children)}
            first, last = index[id(groups[0][0])], index[id(groups[-1][0])]
            names_of = {id(stop): names for stop, names in groups}
            cache = _block_inputs(model, children[first], batches, device)
            for block in progress_bar(children[first : last + 1], last + 1 - first, description, progress):

                def call(sums: dict[str, HessianSum], block: nn.Module = block, cache: Cached = cache) -> None:
                    for args, kwargs, rows in cache:
                        for s in sums.values():
                            s.see(rows)
                        block(*args, **kwargs)

                if id(block) in names_of:
                    collector.run(names_of[id(block)], call)
                if block is not children[last]:
                    cache = _next_inputs(block, cache)
            return
        for stop, names in progress_bar(groups, len(groups), description, progress):

            def call(sums: dict[str, HessianSum], stop: nn.Module = stop) -> None:
                with hooks(stop.register_forward_hook(_raise_stop)):
                    for batch in batches:
                        batch = batch.to(device)
                        for s in sums.values():
                            s.see((batch.mask, batch.weights))
                        with contextlib.suppress(_Stop):
                            call_model(model, batch)

            collector.run(names, call)
    finally:
        for m, training in modes:
            m.training = training
