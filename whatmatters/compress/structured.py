"""Structured importance of transformer parts: attention heads, MLP neurons and whole blocks.

Every scorer returns one :class:`~whatmatters.core.importance.Importance` (``per_sample=False``):

* ``unit="head"``: ``(n_layers, n_heads)`` (query heads; for grouped-query attention ``extra["groups"]``
  holds the ``(n_layers, n_kv_heads)`` key/value-group sums, since removal keeps whole groups or the
  same number of query heads per group);
* ``unit="neuron"``: ``(n_layers, intermediate_size)``;
* ``unit="layer"``: ``(n_layers,)`` named by the blocks.

``extra["layers"]`` names the blocks. Heads and neurons are read at the input of the output
projections (``o_proj`` / ``out_proj`` / ``attention.output.dense`` / GPT-2 ``c_proj`` and the MLP down
projection), where each head is a contiguous slice of ``head_dim`` channels and each neuron one
channel, so one hook works for BERT, GPT-2, Llama, Qwen2 (GQA) and ViT without ``head_mask`` arguments.
Statistics are reduced batch by batch; activations are never stored beyond one batch's backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from whatmatters.compress.api import WeightTask
from whatmatters.compress.batches import Batch, call_model, default_loss
from whatmatters.compress.linear import weight_matrix
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.layers import first_tensor
from whatmatters.core.registry import scorer
from whatmatters.core.state import hooks, parameter_device_dtype
from whatmatters.core.task import progress_bar

SUPPORTED = (
    "Llama-style blocks (q/k/v/o_proj + gate/up/down_proj or fc1/fc2: Llama, Qwen2, Mistral, SmolLM2, ViT), "
    "GPT-2 and BERT-style blocks (attention.self + attention.output.dense + intermediate/output.dense)"
)


# ------------------------------------------------------------ architecture
@dataclass
class Block:
    """One transformer block and the layers structured scores and removal work on."""

    index: int
    name: str
    module: nn.Module
    kind: str  # "llama" (separate q/k/v/o_proj, GQA possible) | "gpt2" (fused c_attn) | "bert"
    attn: nn.Module  # holds the head attributes (num_heads, head_dim, ...)
    qkv: list[nn.Module]  # q, k, v (Llama, BERT, ViT) or the fused c_attn (GPT-2)
    o: nn.Module  # attention output projection
    ups: list[nn.Module]  # gate/up or the first MLP linear
    down: nn.Module  # MLP down projection
    o_name: str
    down_name: str

    @property
    def head_dim(self) -> int:
        return int(getattr(self.attn, "head_dim", None) or self.attn.attention_head_size)

    @property
    def n_heads(self) -> int:
        return weight_matrix(self.o).shape[1] // self.head_dim

    @property
    def n_kv(self) -> int:
        if self.kind == "llama":
            return weight_matrix(self.qkv[1]).shape[0] // self.head_dim
        return self.n_heads

    @property
    def n_neurons(self) -> int:
        return weight_matrix(self.down).shape[1]


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _block(index: int, name: str, m: nn.Module) -> Block | None:
    for attn_path in ("self_attn", "attention"):  # Llama, Qwen2, Mistral; ViT (transformers 5)
        a = _get(m, attn_path)
        if a is None or _get(a, "o_proj") is None or _get(a, "q_proj") is None:
            continue
        for up_names, down_name in ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2")):
            down = _get(m, f"mlp.{down_name}")
            ups = [_get(m, f"mlp.{u}") for u in up_names]
            if down is not None and all(u is not None for u in ups):
                return Block(
                    index, name, m, "llama", a, [a.q_proj, a.k_proj, a.v_proj], a.o_proj, ups, down,
                    f"{name}.{attn_path}.o_proj", f"{name}.mlp.{down_name}",
                )  # fmt: skip
    if _get(m, "attn.c_attn") is not None and _get(m, "mlp.c_proj") is not None:
        if getattr(m.attn, "is_cross_attention", False) or _get(m, "crossattention") is not None:
            return None
        return Block(
            index, name, m, "gpt2", m.attn, [m.attn.c_attn], m.attn.c_proj, [m.mlp.c_fc], m.mlp.c_proj,
            f"{name}.attn.c_proj", f"{name}.mlp.c_proj",
        )  # fmt: skip
    for self_path in ("attention.self", "attention.attention"):  # BERT, ViT
        sa = _get(m, self_path)
        if sa is not None and _get(m, "attention.output.dense") is not None and _get(m, "output.dense") is not None:
            if _get(m, "crossattention") is not None or _get(m, "intermediate.dense") is None:
                return None
            return Block(
                index, name, m, "bert", sa, [sa.query, sa.key, sa.value], m.attention.output.dense,
                [m.intermediate.dense], m.output.dense, f"{name}.attention.output.dense", f"{name}.output.dense",
            )  # fmt: skip
    return None


def blocks(model: nn.Module) -> tuple[str, list[Block]]:
    """The name of the model's block list and its :class:`Block` s, in order.

    Raises ``ModelError`` naming the supported families when the model has no such block list.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"structured scores need a PyTorch nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            found = [_block(i, f"{name}.{i}", m) for i, m in enumerate(module)]
            if all(b is not None for b in found):
                return name, found  # type: ignore[return-value]
    raise ModelError(
        f"{type(model).__name__} is not a supported transformer for structured scores and removal: no list of "
        f"blocks of a known layout was found. Supported: {SUPPORTED}"
    )


# ------------------------------------------------------------ calibration
def calibration_batches(task: WeightTask, what: str) -> list[Batch]:
    return task._cal(what).batches


def calibration_loss(task: WeightTask, output: Any, batch: Batch) -> torch.Tensor:
    fn = task.calibration.loss if task.calibration is not None else None
    loss = fn(output, batch.kwargs or batch.args[0], batch.labels) if fn else None
    loss = default_loss(task.model, output, batch) if loss is None else loss
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise ModelError("the calibration loss must be a scalar tensor")
    return loss


def calibration_progress(task: WeightTask) -> bool | None:
    return task.calibration.progress if task.calibration is not None else None


def _forward_all(task: WeightTask, handles: list, state: dict, device: torch.device, what: str) -> None:
    """Run every calibration batch through the model in eval mode with ``handles`` attached (removed after).

    ``state["mask"]`` holds the current batch's padding mask for the hooks.
    """
    batches = calibration_batches(task, what)
    with hooks(*handles), torch.no_grad():
        task.model.eval()
        for batch in progress_bar(batches, len(batches), what, calibration_progress(task)):
            batch = batch.to(device)
            state["mask"] = batch.mask
            call_model(task.model, batch)


def _equal(values: list[int], what: str) -> int:
    if len(set(values)) != 1:
        raise ModelError(
            f"the model's blocks have different numbers of {what} ({sorted(set(values))}), e.g. after removal "
            "with allocation='global'; score the model before pruning it"
        )
    return values[0]


def _mask_hook(mask: torch.Tensor, group: int) -> Callable:
    """Forward pre-hook multiplying a layer's input ``(b, ..., C)`` by a per-sample unit mask ``(b, C // group)``."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        m = mask.to(x.dtype).repeat_interleave(group, dim=-1)
        m = m.reshape(m.shape[0], *([1] * (x.ndim - 2)), m.shape[-1])
        return (x * m, *args[1:])

    return hook


def _mask_gradients(task: WeightTask, targets: list[tuple[nn.Module, int, int]]) -> torch.Tensor:
    """Mean over calibration sequences of ``|dL_s / d mask_u|`` for a ones mask on units of the given layers' inputs.

    ``targets``: ``(layer, n_units, channels_per_unit)``. The mask has one entry per sequence and unit,
    so one backward pass per batch gives per-sequence gradients. The calibration loss is a batch mean;
    the gradients are multiplied by the batch size, which makes them exact per-sequence gradients when
    every sequence has the same number of loss tokens (e.g. ``lm_windows``), a token-count weighting
    otherwise. For one channel per unit the mask gradient is ``sum_t a_t dL/da_t`` (first-order Taylor).
    """
    model = task.model
    device, _ = parameter_device_dtype(model)
    total = torch.zeros(len(targets), max(n for _, n, _ in targets), dtype=torch.float64, device=device)
    count = 0
    for p in model.parameters():
        p.requires_grad_(False)  # restored by score()'s preserved()
    model.eval()
    batches = calibration_batches(task, "gradients")
    for batch in progress_bar(batches, len(batches), "mask gradients", calibration_progress(task)):
        batch = batch.to(device)
        b = batch.size
        masks = [torch.ones(b, n, device=device, requires_grad=True) for _, n, _ in targets]
        handles = [layer.register_forward_pre_hook(_mask_hook(m, g)) for (layer, _, g), m in zip(targets, masks)]
        with hooks(*handles), torch.enable_grad():
            loss = calibration_loss(task, call_model(model, batch), batch)
            grads = torch.autograd.grad(loss, masks, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                total[i, : g.shape[1]] += (g.detach().double() * b).abs().sum(0)
        count += b
    return (total / max(count, 1)).float()


# ----------------------------------------------------------------- heads
def _head_result(values: torch.Tensor, blks: list[Block], extra: dict[str, Any]) -> tuple[torch.Tensor, dict]:
    n_kv = _equal([b.n_kv for b in blks], "key/value heads")
    n_heads = values.shape[1]
    extra = {"layers": [b.name for b in blks], "n_heads": n_heads, "n_kv_heads": n_kv, **extra}
    if n_kv < n_heads:
        extra["groups"] = values.reshape(len(blks), n_kv, n_heads // n_kv).sum(-1)
    return values, extra


@scorer("head_mask_gradient", verb="compress", units=("head",), family="structured", needs="module", per_sample=False,
        aliases=("michel_heads",))  # fmt: skip
def head_mask_gradient(task: WeightTask, *, normalize_layers: bool = False) -> tuple[torch.Tensor, dict]:
    """Head importance by masking gradients (Michel et al., 2019): ``E_x |dL(x)/d xi_h|``.

    ``xi_h`` is a mask of ones multiplied into head ``h``'s output (the input slice of the attention
    output projection); the expectation is over calibration sequences. ``normalize_layers`` divides each
    layer's scores by their L2 norm, as the authors' code does by default.
    """
    blks = blocks(task.model)[1]
    n_heads = _equal([b.n_heads for b in blks], "attention heads")
    values = _mask_gradients(task, [(b.o, n_heads, b.head_dim) for b in blks])
    if normalize_layers:
        values = values / values.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return _head_result(values, blks, {})


# ---------------------------------------------------------------- neurons
def _down_columns(b: Block) -> torch.Tensor:
    """``||W_down[:, j]||_2`` per neuron (float32)."""
    return weight_matrix(b.down).detach().float().norm(dim=0)


@scorer("neuron_activation", verb="compress", units=("neuron",), family="structured", needs="module",
        per_sample=False)  # fmt: skip
def neuron_activation(task: WeightTask) -> tuple[torch.Tensor, dict]:
    """MLP neuron importance ``mean_t |a_j| * ||W_down[:, j]||_2``: the neuron's mean contribution size.

    ``a_j`` is the neuron's activation (the down projection's input), averaged over non-padding tokens.
    """
    model = task.model
    blks = blocks(model)[1]
    n = _equal([b.n_neurons for b in blks], "MLP neurons")
    device, _ = parameter_device_dtype(model)
    sums = torch.zeros(len(blks), n, dtype=torch.float64, device=device)
    state: dict[str, Any] = {"mask": None, "count": 0.0}

    def make(i: int) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = state["mask"]
            if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                x = x[mask]
            sums[i] += x.reshape(-1, x.shape[-1]).abs().double().sum(0)
            if i == 0:
                state["count"] += x.reshape(-1, x.shape[-1]).shape[0]

        return hook

    handles = [b.down.register_forward_pre_hook(make(i)) for i, b in enumerate(blks)]
    _forward_all(task, handles, state, device, "activations")
    cols = torch.stack([_down_columns(b) for b in blks]).to(device)
    values = (sums / max(state["count"], 1.0)).float() * cols
    return values, {"layers": [b.name for b in blks]}


@scorer("neuron_taylor", verb="compress", units=("neuron",), family="structured", needs="module", per_sample=False)
def neuron_taylor(task: WeightTask) -> tuple[torch.Tensor, dict]:
    """First-order Taylor importance of MLP neurons: ``E_x |sum_t a_t,j dL(x)/da_t,j|``.

    The first-order estimate of the loss change when neuron ``j`` is zeroed in a sequence (Molchanov et
    al., 2017, as in LLM-Pruner's structured score), averaged over calibration sequences.
    """
    blks = blocks(task.model)[1]
    n = _equal([b.n_neurons for b in blks], "MLP neurons")
    values = _mask_gradients(task, [(b.down, n, 1) for b in blks])
    return values, {"layers": [b.name for b in blks]}


# ------------------------------------------------------------------- FLAP
def _flap_stats(task: WeightTask, names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(sample variance, mean) of each input channel of the named layers (float64, reduced on the fly)."""
    cal = task._cal("activation fluctuation")
    missing = [n for n in names if n not in cal.layers]
    if missing:
        raise InputError(f"the calibration does not cover {missing[0]}; calibrate with layers=None for FLAP")
    cal.need(activations=True)
    out = []
    for n in names:
        s = cal.activations[n]
        out.append((s.m2 / max(s.count - 1.0, 1.0), s.mean))
    return out


def _flap(task: WeightTask, unit: str) -> tuple[torch.Tensor, dict]:
    blks = blocks(task.model)[1]
    layers = [b.o if unit == "head" else b.down for b in blks]
    names = [b.o_name if unit == "head" else b.down_name for b in blks]
    stats = _flap_stats(task, names)
    channels = _equal([weight_matrix(m).shape[1] for m in layers], "output projection inputs")
    scores = []
    for m, (var, _) in zip(layers, stats):
        cols = weight_matrix(m).detach().double().square().sum(0)
        scores.append((var.to(cols.device) * cols).float())
    per_channel = torch.stack(scores)
    means = torch.stack([mean.float().cpu() for _, mean in stats])
    extra: dict[str, Any] = {"layers": [b.name for b in blks], "channel_means": means}
    if unit == "neuron":
        return per_channel, extra
    n_heads = _equal([b.n_heads for b in blks], "attention heads")
    values = per_channel.reshape(len(blks), n_heads, channels // n_heads).sum(-1)
    return _head_result(values, blks, extra)


@scorer("flap_neuron", verb="compress", units=("neuron",), family="structured", needs="module", per_sample=False,
        aliases=("flap",))  # fmt: skip
def flap_neuron(task: WeightTask) -> tuple[torch.Tensor, dict]:
    """FLAP fluctuation (An et al., 2024) of MLP neurons: ``Var_t(a_j) * ||W_down[:, j]||_2^2``.

    ``Var_t`` is the sample variance of the neuron's activation over calibration tokens (running float64
    statistics). ``extra["channel_means"]`` ``(n_layers, neurons)`` holds the mean activations that
    ``prune_structured`` uses for bias compensation (``W[:, removed] @ mean[removed]`` added to the bias).
    """
    return _flap(task, "neuron")


@scorer("flap_head", verb="compress", units=("head",), family="structured", needs="module", per_sample=False)
def flap_head(task: WeightTask) -> tuple[torch.Tensor, dict]:
    """FLAP fluctuation of attention heads: ``Var_t(x_j) * ||W_o[:, j]||_2^2`` summed over each head's channels.

    ``x`` is the attention output projection's input; ``extra["channel_means"]`` ``(n_layers, heads *
    head_dim)`` serves bias compensation at removal, as for ``flap_neuron``.
    """
    return _flap(task, "head")


# ----------------------------------------------------------------- layers
def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise ModelError("cannot find the hidden states passed to a transformer block")
    return x


def influence_hooks(modules: list[nn.Module], sums: torch.Tensor, counts: torch.Tensor, state: dict) -> list:
    """Hooks adding block ``i``'s ShortGPT influence ``1 - cos(h_in, h_out)`` to ``sums[i]``.

    ``counts[i]`` counts the tokens. Tokens where ``state["mask"]`` (the current batch's padding mask, or
    None) is False are left out; a call whose output does not have its input's shape adds nothing.
    """
    inputs: dict[int, torch.Tensor] = {}

    def pre(i: int) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[i] = _hidden_in(args, kwargs).detach()

        return hook

    def post(i: int) -> Callable:
        def hook(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
            h_in, h_out = inputs.pop(i), first_tensor(out).detach()
            if h_in.shape != h_out.shape:
                return
            cos = nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            mask = state.get("mask")
            if mask is not None and cos.shape == mask.shape:
                cos = cos[mask.to(cos.device)]
            sums[i] += (1 - cos.double()).sum()
            counts[i] += cos.numel()

        return hook

    handles = [m.register_forward_pre_hook(pre(i), with_kwargs=True) for i, m in enumerate(modules)]
    return handles + [m.register_forward_hook(post(i), with_kwargs=True) for i, m in enumerate(modules)]


def influence(sums: torch.Tensor, counts: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Mean influence per block; ``ModelError`` naming the blocks that never kept their input's shape."""
    unseen = [n for n, c in zip(names, counts.tolist()) if c == 0]
    if unseen:
        raise ModelError(
            f"block influence needs residual blocks whose output has their input's shape; {', '.join(unseen[:4])} "
            "never returned one (or never ran); choose other blocks"
        )
    return (sums / counts).float()


@scorer("block_influence", verb="compress", units=("layer",), family="structured", needs="module", per_sample=False,
        aliases=("shortgpt",))  # fmt: skip
def block_influence(task: WeightTask) -> tuple[torch.Tensor, dict]:
    """ShortGPT block influence: ``1 - cos(h_in, h_out)`` of each block, averaged over non-padding tokens."""
    blks = blocks(task.model)[1]
    device, _ = parameter_device_dtype(task.model)
    sums = torch.zeros(len(blks), dtype=torch.float64, device=device)
    counts = torch.zeros_like(sums)
    state: dict[str, Any] = {"mask": None}
    handles = influence_hooks([b.module for b in blks], sums, counts, state)
    _forward_all(task, handles, state, device, "block influence")
    names = [b.name for b in blks]
    return influence(sums, counts, names), {"names": names, "layers": names}


@contextmanager
def skipped(block: nn.Module, *, returns_tensor: bool = True, rest: tuple = ()) -> Iterator[None]:
    """Within the block, ``block`` passes its hidden states through unchanged (its computation is skipped).

    ``returns_tensor`` / ``rest``: the block's normal output is a tensor, or a tuple whose other items are ``rest``.
    """
    original = block.__dict__.get("forward")

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        h = _hidden_in(args, kwargs)
        return h if returns_tensor else (h, *rest)

    block.forward = passthrough  # instance attribute, removed below
    try:
        yield
    finally:
        if original is None:
            del block.forward
        else:
            block.forward = original


def _block_returns_tensor(model: nn.Module, block: nn.Module, batch: Batch) -> tuple[bool, tuple]:
    seen: dict[str, Any] = {}
    handle = block.register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out))
    with hooks(handle), torch.no_grad():
        call_model(model, batch)
    out = seen["out"]
    return isinstance(out, torch.Tensor), (() if isinstance(out, torch.Tensor) else tuple(None for _ in out[1:]))


@scorer("layer_skip_loss", verb="compress", units=("layer",), family="structured", needs="module", per_sample=False,
        aliases=("skip_loss",))  # fmt: skip
def layer_skip_loss(task: WeightTask) -> tuple[torch.Tensor, dict]:
    """Calibration loss with block ``i`` skipped minus the dense loss (one pass per block; higher = keep)."""
    model = task.model
    blks = blocks(model)[1]
    device, _ = parameter_device_dtype(model)
    batches = [b.to(device) for b in calibration_batches(task, "the skip loss")]
    model.eval()
    is_tensor, rest = _block_returns_tensor(model, blks[0].module, batches[0])

    def mean_loss() -> float:
        total, n = 0.0, 0
        for batch in batches:
            total += float(calibration_loss(task, call_model(model, batch), batch)) * batch.size
            n += batch.size
        return total / max(n, 1)

    losses = []
    with torch.no_grad():
        dense = mean_loss()
        for b in progress_bar(blks, len(blks), "skipping blocks", calibration_progress(task)):
            with skipped(b.module, returns_tensor=is_tensor, rest=rest):
                losses.append(mean_loss() - dense)
    values = torch.tensor(losses, dtype=torch.float32)
    return values, {"names": [b.name for b in blks], "layers": [b.name for b in blks], "dense_loss": dense}


__all__ = ["Block", "blocks", "skipped"]
