"""``prune_structured``: physically remove the least important heads, MLP neurons or whole blocks.

The result is a new model (a deep copy unless ``inplace``) whose linear layers are sliced, so the
parameter count and the latency drop. Attention modules' head attributes, ``layer_idx`` (KV cache) and the
config (``num_hidden_layers``, ``layer_types``, and where the config can describe them ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``intermediate_size`` / ``n_inner``) are updated.

Every pruned model records its per-block shapes in ``config.whatmatters_structure``. When all blocks have
the same shapes and the config can state them (``report.from_pretrained``), ``save_pretrained`` /
``from_pretrained`` work unchanged; otherwise (different counts per block after ``allocation="global"``,
head removal in BERT / GPT-2, whose configs derive the head size from the head count, or biases added by
FLAP compensation) reload with :func:`load_pruned`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from whatmatters.compress.linear import is_transposed, weight_matrix
from whatmatters.compress.structured import Block, blocks
from whatmatters.core import hf
from whatmatters.core.actions import Compressed, RemovalCounts, n_parameters
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.fractions import removed_share, units_removed
from whatmatters.core.importance import Importance

STRUCTURE_KEY = "whatmatters_structure"


@dataclass
class StructuredReport(RemovalCounts):
    """What ``prune_structured`` removed and the size change.

    ``removed``: the removed unit indices (original numbering) per block for heads and neurons; for layers,
    the removed blocks' names (each with an empty list), so ``n_removed`` counts blocks.
    """

    unit: str
    method: str
    allocation: str
    amount: float
    removed: dict[str, list[int]] = field(default_factory=dict)
    n_parameters_before: int = 0
    n_parameters_after: int = 0
    compensated: bool = False
    from_pretrained: bool = True
    standardized: bool = False

    @property
    def n_removed(self) -> int:
        return len(self.removed) if self.unit == "layer" else super().n_removed

    def __repr__(self) -> str:
        return (
            f"StructuredReport(unit={self.unit!r}, method={self.method!r}, allocation={self.allocation!r}, "
            f"removed {self.n_removed} units, parameters {self.n_parameters_before:,} -> {self.n_parameters_after:,}"
            f" ({self.parameter_ratio:.3f}), compensated={self.compensated}, standardized={self.standardized}, "
            f"from_pretrained={self.from_pretrained})"
        )


StructuredPruned = Compressed  # prune_structured's result: (model, StructuredReport)


# ------------------------------------------------------------------ slicing
def as_parameter(t: torch.Tensor, like: nn.Parameter | None) -> nn.Parameter:
    """A new parameter holding a copy of ``t``, with ``like``'s ``requires_grad``."""
    return nn.Parameter(t.contiguous().clone(), requires_grad=like.requires_grad if like is not None else True)


def slice_out(layer: nn.Module, idx: torch.Tensor) -> None:
    """Keep the output features ``idx`` of a Linear / Conv1D."""
    idx = idx.to(layer.weight.device)
    with torch.no_grad():
        if is_transposed(layer):
            layer.weight = as_parameter(layer.weight[:, idx], layer.weight)
            layer.nf = len(idx)
        else:
            layer.weight = as_parameter(layer.weight[idx], layer.weight)
            layer.out_features = len(idx)
        if layer.bias is not None:
            layer.bias = as_parameter(layer.bias[idx], layer.bias)


def slice_in(layer: nn.Module, idx: torch.Tensor, mean: torch.Tensor | None = None) -> bool:
    """Keep the input features ``idx``; with ``mean`` (all inputs' means) fold the removed inputs into the bias.

    Returns True when a bias was created.
    """
    w = weight_matrix(layer)
    idx = idx.to(w.device)
    created = False
    with torch.no_grad():
        if mean is not None:
            removed = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
            removed[idx] = False
            delta = (w[:, removed].double() @ mean.to(w.device, torch.float64)[removed]).to(w.dtype)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
                created = True
            layer.bias += delta
        if is_transposed(layer):
            layer.weight = as_parameter(layer.weight[idx], layer.weight)
        else:
            layer.weight = as_parameter(layer.weight[:, idx], layer.weight)
            layer.in_features = len(idx)
    return created


def _channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def keep_heads(b: Block, q_keep: torch.Tensor, kv_keep: torch.Tensor, mean: torch.Tensor | None = None) -> bool:
    """Keep query heads ``q_keep`` and key/value heads ``kv_keep`` of block ``b`` (sorted index tensors)."""
    hd = b.head_dim
    q_ch = _channels(q_keep, hd)
    if b.kind == "gpt2":
        width = b.n_heads * hd
        slice_out(b.qkv[0], torch.cat([q_ch, q_ch + width, q_ch + 2 * width]))
        b.attn.split_size = len(q_ch)
        b.attn.num_heads = len(q_keep)
    else:
        q, k, v = b.qkv
        kv_ch = _channels(kv_keep, hd) if b.kind == "llama" else q_ch
        slice_out(q, q_ch)
        slice_out(k, kv_ch)
        slice_out(v, kv_ch)
        for attr, value in (
            ("num_heads", len(q_keep)),
            ("num_attention_heads", len(q_keep)),
            ("num_key_value_heads", len(kv_keep)),
            ("all_head_size", len(q_ch)),
            ("num_key_value_groups", len(q_keep) // max(len(kv_keep), 1)),
        ):
            if hasattr(b.attn, attr):
                setattr(b.attn, attr, value)
    return slice_in(b.o, q_ch, mean)


def keep_neurons(b: Block, keep: torch.Tensor, mean: torch.Tensor | None = None) -> bool:
    for up in b.ups:
        slice_out(up, keep)
    return slice_in(b.down, keep, mean)


def keep_blocks(model: nn.Module, list_name: str, keep: list[int]) -> None:
    """Keep the blocks ``keep`` (in order) of the block list; renumber ``layer_idx`` and update the config."""
    old = model.get_submodule(list_name)
    new = nn.ModuleList([old[i] for i in keep])
    parent_name, _, attr = list_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    for j, block in enumerate(new):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    config = getattr(model, "config", None)
    if config is not None:
        config.num_hidden_layers = len(keep)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in keep]


# --------------------------------------------------------------- structure
def _structure(model: nn.Module) -> list[dict[str, Any]]:
    return [
        {
            "heads": b.n_heads,
            "kv_heads": b.n_kv,
            "neurons": b.n_neurons,
            "o_bias": b.o.bias is not None,
            "down_bias": b.down.bias is not None,
        }
        for b in blocks(model)[1]
    ]


def _write_config(model: nn.Module, original_bias: tuple[bool, bool]) -> bool:
    """Record the per-block shapes in the config; set the standard fields where they can describe them.

    Returns whether ``from_pretrained`` rebuilds the model from the config alone.
    """
    config = getattr(model, "config", None)
    if config is None:
        return False
    blks = blocks(model)[1]
    layers = _structure(model)
    setattr(config, STRUCTURE_KEY, {"layers": layers})
    kind = blks[0].kind
    ok = all(d == layers[0] for d in layers) and (layers[0]["o_bias"], layers[0]["down_bias"]) == original_bias
    first = layers[0]
    if not all(d == first for d in layers):
        return False
    n_fields = [f for f in ("intermediate_size", "n_inner") if hasattr(config, f)]
    if kind == "gpt2" and getattr(config, "n_inner", None) is None and first["neurons"] != 4 * config.hidden_size:
        config.n_inner = first["neurons"]
    else:
        for f in n_fields[:1]:
            setattr(config, f, first["neurons"])
    heads_field = getattr(config, "num_attention_heads", None)
    if heads_field != first["heads"]:
        if kind == "llama":
            config.head_dim = blks[0].head_dim
            config.num_attention_heads = first["heads"]
            if hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = first["kv_heads"]
        else:
            ok = False  # BERT / GPT-2 derive the head size from hidden_size / num_attention_heads
    elif kind == "llama" and getattr(config, "num_key_value_heads", first["kv_heads"]) != first["kv_heads"]:
        config.num_key_value_heads = first["kv_heads"]
    return ok


def _reshape_to(model: nn.Module, layers: list[dict[str, Any]]) -> None:
    """Give a freshly built model the recorded per-block shapes (weights are loaded afterwards)."""
    blks = blocks(model)[1]
    if len(blks) != len(layers):
        raise ModelError(f"the saved structure describes {len(layers)} blocks but the config builds {len(blks)}")
    for b, d in zip(blks, layers):
        if b.n_heads != d["heads"] or b.n_kv != d["kv_heads"]:
            group, new_group = b.n_heads // b.n_kv, d["heads"] // d["kv_heads"]
            kv = torch.arange(d["kv_heads"])
            q = (kv[:, None] * group + torch.arange(new_group)).reshape(-1) if b.kind == "llama" else kv
            keep_heads(b, q, kv)
        if b.n_neurons != d["neurons"]:
            keep_neurons(b, torch.arange(d["neurons"]))
        for layer, key in ((b.o, "o_bias"), (b.down, "down_bias")):
            if d[key] and layer.bias is None:
                w = weight_matrix(layer)
                layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))


# -------------------------------------------------------------- selection
def check_amount(amount: Any, example: str = "removes a quarter of the heads / neurons / layers") -> float:
    """``amount`` as a float in [0, 1) (:func:`whatmatters.core.fractions.removed_share`)."""
    return removed_share(amount, "amount", example=f"0.25 {example}")


FLAP_METHODS = ("flap_head", "flap_neuron")


def standardize_rows(values: torch.Tensor) -> torch.Tensor:
    """``(v - mean) / std`` along the last axis (float64; unbiased std as in FLAP); 0 where a row is constant."""
    v = values.double()
    mean = v.mean(-1, keepdim=True)
    if v.shape[-1] < 2:
        return torch.zeros_like(v)
    std = v.std(-1, keepdim=True)
    flat = std <= 1e-12 * v.abs().amax(-1, keepdim=True)
    return torch.where(flat, torch.zeros_like(v), (v - mean) / std.clamp_min(1e-300))


def _lowest_global(values: torch.Tensor, k: int, what: str) -> torch.Tensor:
    """Boolean ``(L, n)`` mask of the ``k`` lowest entries of ``values`` with at least one entry kept per row.

    Equivalent to taking units in ascending order (ties by position) and, where a row would lose its last
    unit, keeping that row's best unit and taking the next-lowest unit elsewhere: the row maxima are
    excluded and the ``k`` lowest of the rest are removed, so exactly ``k`` units go.
    """
    n_rows, n = values.shape
    if k > n_rows * (n - 1):
        raise InputError(
            f"this removes {k} {what} but at most {n_rows * (n - 1)} can go while every block keeps one "
            f"({n_rows} blocks x {n - 1}); lower amount"
        )
    v = values.double().clone()
    best = torch.sort(v, dim=-1, stable=True).indices[:, -1]
    v[torch.arange(n_rows), best] = float("inf")
    mask = torch.zeros(v.numel(), dtype=torch.bool)
    if k:
        mask[torch.sort(v.reshape(-1), stable=True).indices[:k]] = True
    return mask.reshape(values.shape)


def _lowest_rows(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest entries of every row of ``values`` (..., n)."""
    order = torch.sort(values.double(), dim=-1, stable=True).indices
    mask = torch.zeros(values.shape, dtype=torch.bool)
    mask.scatter_(-1, order[..., :k], True)
    return mask


def _too_many(blk_names: list[str], removed: torch.Tensor, what: str) -> None:
    full = removed.all(-1)
    if bool(full.any()):
        name = blk_names[int(full.nonzero()[0, 0])]
        raise InputError(
            f"this removes all {what} of {name}; lower amount, use allocation='global', or remove whole layers "
            "with a unit='layer' importance"
        )


def plan_removal(
    values: torch.Tensor,
    unit: str,
    amount: float,
    *,
    allocation: str = "uniform",
    gqa: str = "groups",
    n_kv: int | None = None,
    standardize: bool = False,
    names: list[str] | None = None,
) -> torch.Tensor:
    """Boolean mask (the shape of ``values``) of the units ``prune_structured`` removes; no model needed.

    ``values``: ``(n_layers, n_heads)`` query-head, ``(n_layers, n_neurons)`` neuron or ``(n_layers,)``
    block scores (higher = keep); ``n_kv``: key/value groups per block (default: one per head).
    Global allocation removes exactly ``round(amount * total)`` units (KV groups; query-head ranks per
    group, i.e. ``n_kv`` heads each, with ``gqa="heads"``; neurons) and never empties a block.
    ``standardize`` ranks ``(score - mean) / std`` within each block (FLAP's adaptive structure search).
    """
    if unit not in ("head", "neuron", "layer") or values.ndim != (1 if unit == "layer" else 2):
        raise InputError(
            f"plan_removal needs (n_layers,) block scores or (n_layers, n) head / neuron scores; got unit {unit!r} "
            f"with shape {tuple(values.shape)}"
        )
    names = names or [str(i) for i in range(values.shape[0])]
    if unit == "layer":
        k = units_removed(amount, values.numel(), "blocks")
        if k >= values.numel():
            raise InputError(f"this removes all {values.numel()} blocks; lower amount")
        return _lowest_global(values.reshape(1, -1), k, "blocks").reshape(-1)
    n_layers, n = values.shape
    if unit == "neuron":
        scores = standardize_rows(values) if standardize else values
        if allocation == "global":
            return _lowest_global(scores, units_removed(amount, values.numel(), "MLP neurons"), "MLP neurons")
        gone = _lowest_rows(scores, units_removed(amount, n, "MLP neurons per block"))
        _too_many(names, gone, "MLP neurons")
        return gone
    n_kv = n if n_kv is None else n_kv
    if n_kv < 1 or n % n_kv:
        raise ModelError(f"{n} query heads cannot form {n_kv} key/value groups")
    g = n // n_kv
    if g == 1 or gqa == "groups":
        groups = values.reshape(n_layers, n_kv, g).sum(-1)
        groups = standardize_rows(groups) if standardize else groups
        what = "key/value groups" if g > 1 else "heads"
        if allocation == "global":
            gone = _lowest_global(groups, units_removed(amount, groups.numel(), what), what)
        else:
            gone = _lowest_rows(groups, units_removed(amount, n_kv, f"{what} per block"))
            _too_many(names, gone, what)
        return gone.repeat_interleave(g, dim=1)
    per_group = (standardize_rows(values) if standardize else values.double()).reshape(n_layers, n_kv, g)
    order = torch.sort(per_group, dim=-1, stable=True)
    if allocation == "uniform":
        r = torch.full((n_layers,), units_removed(amount, g, "query heads per group"))
        if bool((r >= g).any()):
            _too_many(names, (r >= g)[:, None], "query heads of a group")
    else:  # rank j of a block = its groups' j-th lowest heads, scored by their mean (non-decreasing in j)
        slots = order.values.mean(1)
        k = units_removed(amount, slots.numel(), "query-head ranks")
        r = _lowest_global(slots, k, "query heads per group").sum(1)
    rank = torch.empty_like(order.indices).scatter_(-1, order.indices, torch.arange(g).expand_as(order.indices).clone())
    return (rank < r[:, None, None]).reshape(n_layers, n)


# -------------------------------------------------------------------- main
def _validate(importance: Any, blks: list[Block]) -> tuple[str, torch.Tensor]:
    if not isinstance(importance, Importance):
        raise InputError(
            f"importance must be an Importance from whatmatters.compress.score(model, method, data) with unit 'head', "
            f"'neuron' or 'layer', got {type(importance).__name__}"
        )
    if importance.unit not in ("head", "neuron", "layer") or importance.per_sample:
        raise InputError(
            f"prune_structured removes heads, neurons or layers; got an Importance of unit {importance.unit!r}"
            f"{' per sample (aggregate it first)' if importance.per_sample else ''}. For weights use prune()"
        )
    values = importance.values.detach().float().cpu()
    n = len(blks)
    if importance.unit == "layer":
        expected: tuple[int, ...] = (n,)
    else:
        counts = {b.n_heads if importance.unit == "head" else b.n_neurons for b in blks}
        if len(counts) != 1:
            raise ModelError("the model's blocks have different unit counts (already pruned); score it again")
        expected = (n, counts.pop())
    if tuple(values.shape) != expected:
        raise ModelError(
            f"the {importance.unit} importance has shape {tuple(values.shape)} but this model needs {expected}: "
            "it was computed for another model; score this model"
        )
    if not bool(torch.isfinite(values).all()):
        raise InputError("the importance holds NaN or infinite values")
    return importance.unit, values


def prune_structured(
    model: nn.Module,
    importance: Importance,
    amount: float = 0.25,
    *,
    allocation: str = "uniform",
    gqa: str = "groups",
    compensate: bool | None = None,
    standardize: bool | None = None,
    inplace: bool = False,
) -> StructuredPruned:
    """Remove the lowest-scored heads, MLP neurons or blocks of a transformer.

    Args:
        model: a supported transformer (``structured.SUPPORTED``); not changed unless ``inplace``.
        importance: a ``unit="head"`` ``(n_layers, n_heads)``, ``"neuron"`` ``(n_layers, n_neurons)`` or
            ``"layer"`` ``(n_layers,)`` Importance from ``whatmatters.compress.score`` (higher = keep).
        amount: fraction of units removed, in ``[0, 1)`` (of KV groups with ``gqa="groups"``; of the query
            heads of every group with ``gqa="heads"``; of neurons; of blocks), rounded to whole units.
        allocation: ``"uniform"`` (the same count in every block: the config describes the model) or
            ``"global"`` (lowest scores over all blocks, exactly ``round(amount * total)`` units, every block
            keeping at least one KV group / query head per group / neuron; reload with :func:`load_pruned`).
        gqa: for grouped-query attention, ``"groups"`` removes whole key/value groups (scored by the sum of
            their query heads), ``"heads"`` the same number of query heads from every group of a block.
        compensate: FLAP bias compensation (add ``W[:, removed] @ mean[removed]`` to the output projection's
            bias, creating one if needed); default: when the importance carries ``extra["channel_means"]``.
        standardize: with ``allocation="global"``, rank ``(score - mean) / std`` within each block (of KV
            groups with ``gqa="groups"``, of query heads with ``"heads"``, of neurons) so blocks with larger
            raw scores are not spared wholesale: FLAP's adaptive structure search (An et al., 2024). Default:
            for FLAP importances (``flap_head`` / ``flap_neuron``) in global allocation. No effect on uniform
            allocation, which ranks within blocks.

    Returns:
        ``StructuredPruned(model, report)``.
    """
    if allocation not in ("uniform", "global"):
        raise InputError(f"allocation must be 'uniform' or 'global', got {allocation!r}")
    if gqa not in ("groups", "heads"):
        raise InputError(f"gqa must be 'groups' or 'heads', got {gqa!r}")
    amount = check_amount(amount)
    list_name, blks = blocks(model)
    unit, values = _validate(importance, blks)
    means = importance.extra.get("channel_means") if unit != "layer" else None
    if compensate is None:
        compensate = means is not None
    if compensate and means is None:
        raise InputError(
            "compensate=True needs the channel means of a FLAP importance (method 'flap_neuron' / 'flap_head')"
        )
    if standardize is None:
        standardize = allocation == "global" and unit != "layer" and importance.method in FLAP_METHODS
    if standardize and unit == "layer":
        raise InputError("standardize applies to head and neuron scores within blocks; leave it unset for layers")
    standardize = bool(standardize) and allocation == "global"  # uniform allocation ranks within blocks anyway
    by_position = getattr(getattr(model, "config", None), "scale_attn_by_inverse_layer_idx", False)
    if unit == "layer" and blks[0].kind == "gpt2" and by_position:
        raise ModelError("GPT-2 with scale_attn_by_inverse_layer_idx depends on block positions; cannot drop blocks")
    gone = plan_removal(
        values,
        unit,
        amount,
        allocation=allocation,
        gqa=gqa,
        n_kv=blks[0].n_kv,
        standardize=standardize,
        names=[b.name for b in blks],
    )
    original_bias = (blks[0].o.bias is not None, blks[0].down.bias is not None)

    before = n_parameters(model)
    pruned = model if inplace else copy.deepcopy(model)
    # the smoke forward runs on the copy, so the user's model is never called
    before_shape = hf.output_shape(pruned, "prune_structured") if hasattr(pruned, "config") else None
    _, new_blks = blocks(pruned)
    removed: dict[str, list[int]] = {}
    if unit == "layer":
        keep = [i for i in range(len(new_blks)) if not bool(gone[i])]
        removed = {b.name: [] for b, g in zip(blks, gone.tolist()) if g}
        keep_blocks(pruned, list_name, keep)
    else:
        mean_t = torch.as_tensor(means, dtype=torch.float64) if compensate else None
        for i, b in enumerate(new_blks):
            drop = gone[i]
            if not bool(drop.any()):
                continue
            removed[b.name] = drop.nonzero().reshape(-1).tolist()
            keep = (~drop).nonzero().reshape(-1)
            mean = mean_t[i] if mean_t is not None else None
            if unit == "neuron":
                keep_neurons(b, keep, mean)
            else:
                g = b.n_heads // b.n_kv
                kv_keep = torch.arange(b.n_kv)[~drop.reshape(b.n_kv, g).all(-1)]
                keep_heads(b, keep, kv_keep, mean)
    ok = _write_config(pruned, original_bias)
    _check_forward(pruned, before_shape)
    report = StructuredReport(
        unit=unit,
        method=importance.method,
        allocation=allocation if unit != "layer" else "global",
        amount=amount,
        removed=removed,
        n_parameters_before=before,
        n_parameters_after=n_parameters(pruned),
        compensated=bool(compensate),
        from_pretrained=ok,
        standardized=standardize,
    )
    return StructuredPruned(pruned, report)


def _check_forward(pruned: nn.Module, before: tuple[int, ...] | None) -> None:
    """The pruned model runs and gives outputs of the original shape (module attributes the release reads)."""
    if before is None:
        return
    after = hf.output_shape(pruned, "prune_structured")
    if after != before:
        raise hf.incompatible("prune_structured", f"the pruned model's output has shape {after}, the original {before}")


def load_pruned(path: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Reload a model saved with ``save_pretrained`` after :func:`prune_structured` (any allocation).

    Builds the architecture named in the config, gives every block its recorded shapes and loads the
    weights (``*.safetensors``); the model is returned in eval mode.
    """
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").exists():
        raise InputError(f"no config.json in {path}; give the folder written by save_pretrained")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ModelError(f"the config in {path} names no known transformers architecture ({arch!r})")
    model = cls(config)
    structure = getattr(config, STRUCTURE_KEY, None)
    if structure:
        _reshape_to(model, structure["layers"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"no .safetensors weights in {path}; save with save_pretrained(safe_serialization=True)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tied_names = set(tied)
    bad = [k for k in missing if k not in tied_names]
    if bad or unexpected:
        raise ModelError(f"the weights in {path} do not fit the recorded structure: missing {bad[:3]}, "
                         f"unexpected {list(unexpected)[:3]}")  # fmt: skip
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def structure(model_or_path: nn.Module | str | Path) -> list[dict[str, Any]]:
    """Per-block shapes (heads, kv_heads, neurons, biases) of a model or of a saved folder's config."""
    if isinstance(model_or_path, nn.Module):
        return _structure(model_or_path)
    config = json.loads((Path(model_or_path) / "config.json").read_text())
    return config.get(STRUCTURE_KEY, {}).get("layers", [])
