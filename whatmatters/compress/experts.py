"""Importance of the experts of mixture-of-experts (MoE) models, and their removal.

Every scorer returns one :class:`~whatmatters.core.importance.Importance` with ``unit="expert"``,
``per_sample=False`` and values ``(n_moe_layers, n_experts)``; ``extra["layers"]`` names the MoE blocks
(dense blocks of models that mix both are left out) and ``extra["tokens"]`` counts the scored tokens.

* ``expert_frequency``: fraction of tokens routed to each expert (each layer's row sums to ``top_k``);
* ``expert_router_mass``: mean softmax router probability per expert, before top-k (rows sum to 1);
* ``expert_output_norm``: mean over the tokens routed to an expert of ``||w_e(x) E_e(x)||``, the size of
  what the expert adds to the residual stream.

MoE blocks are found by layout, as transformers 5 builds them: a block with an ``experts`` module called
as ``experts(hidden_states, top_k_index, top_k_weights)`` and a ``gate`` / ``router`` module whose output
(or its first element) holds the router logits ``(tokens, n_experts)``. Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, Granite-MoE, GPT-OSS, Jamba and DeepSeek-V3 are built this way. Forward hooks read the routing the
model actually used (the experts' inputs) and the router logits; padding tokens (``attention_mask == 0``)
are left out. Output norms come from one extra call of the model's own experts module per layer and batch,
with each (token, expert) pair as its own row of top-1 routing: the MoE forward is not re-implemented.
"""

from __future__ import annotations

import copy
import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from whatmatters.compress.batches import Batch, call_model
from whatmatters.core.actions import Compressed, RemovalCounts, n_parameters
from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.fractions import kept_share
from whatmatters.core.importance import Importance
from whatmatters.core.registry import scorer
from whatmatters.core.state import hooks, parameter_device_dtype, preserved
from whatmatters.core.task import progress_bar

SUPPORTED = (
    "transformers MoE blocks with an `experts` module called as experts(hidden_states, top_k_index, "
    "top_k_weights) and a `gate` or `router` module returning the router logits (Mixtral, Qwen2-MoE, "
    "Qwen3-MoE, OLMoE, Granite-MoE, GPT-OSS, DeepSeek-V3 and most MoE models of transformers 5)"
)
# names of the experts module's three routing arguments (GPT-OSS: router_indices, routing_weights)
_ROUTING_ARGS = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))
_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


# ------------------------------------------------------------ architecture
@dataclass
class MoeBlock:
    """One mixture-of-experts block: its name, router and (fused) experts module."""

    name: str
    module: nn.Module
    router: nn.Module
    experts: nn.Module

    @property
    def n_experts(self) -> int:
        return int(self.experts.num_experts)


def _takes_routing(experts: nn.Module) -> bool:
    try:
        params = list(inspect.signature(experts.forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 3 and all(p in names for p, names in zip(params, _ROUTING_ARGS))


def moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """The model's MoE blocks in model order; ``ModelError`` naming the supported layouts if there are none."""
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"expert scores need a PyTorch nn.Module (a transformers MoE model), got {type(model).__name__}"
        )
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        router = getattr(module, "gate", None)
        router = getattr(module, "router", None) if router is None else router
        if (
            isinstance(experts, nn.Module)
            and isinstance(router, nn.Module)
            and isinstance(getattr(experts, "num_experts", None), int)
            and _takes_routing(experts)
        ):
            found.append(MoeBlock(name, module, router, experts))
    if not found:
        raise ModelError(
            f"{type(model).__name__} has no mixture-of-experts layer whatmatters can read, so it has no experts "
            f"to score. Supported: {SUPPORTED}; for dense models score heads, neurons or layers instead"
        )
    sizes = sorted({b.n_experts for b in found})
    if len(sizes) > 1:
        raise ModelError(f"the model's MoE layers have different numbers of experts ({sizes}); expert scores need one")
    return found


# ------------------------------------------------------------- statistics
@dataclass
class ExpertStats:
    """Routing statistics of every MoE layer over the scored (non-padding) tokens, float64."""

    layers: list[str]
    tokens: torch.Tensor  # (n_layers,) tokens seen
    selected: torch.Tensor  # (n_layers, n_experts) top-k selections
    mass: torch.Tensor  # (n_layers, n_experts) summed softmax router probabilities
    norm_sum: torch.Tensor | None  # (n_layers, n_experts) summed ||w e(x)|| over routed tokens

    @property
    def frequency(self) -> torch.Tensor:
        return self.selected / self.tokens.clamp_min(1)[:, None]

    @property
    def router_mass(self) -> torch.Tensor:
        return self.mass / self.tokens.clamp_min(1)[:, None]

    @property
    def output_norm(self) -> torch.Tensor:
        if self.norm_sum is None:
            raise InputError("output norms were not collected; call expert_statistics(..., output_norm=True)")
        return self.norm_sum / self.selected.clamp_min(1)


def _routing(experts: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    bound = inspect.signature(experts.forward).bind(*args, **kwargs)
    return tuple(bound.arguments[k] for k in list(bound.signature.parameters)[:3])


def _valid(mask: torch.Tensor | None, n_tokens: int) -> torch.Tensor | None:
    """The flattened token mask when it matches the layer's ``n_tokens`` rows."""
    if mask is None:
        return None
    if mask.numel() != n_tokens:
        raise ModelError(
            f"an MoE layer routed {n_tokens} tokens but the batch has {mask.numel()} attention-mask entries; "
            "pass the attention mask of the token ids the model receives"
        )
    return mask.reshape(-1)


def expert_statistics(
    model: nn.Module, batches: list[Batch], *, output_norm: bool = False, progress: bool | None = None
) -> ExpertStats:
    """Run ``model`` over ``batches`` and reduce each MoE layer's routing (and expert output norms)."""
    blks = moe_blocks(model)
    n, e = len(blks), blks[0].n_experts
    device, _ = parameter_device_dtype(model)
    f64 = torch.float64
    tokens = torch.zeros(n, dtype=f64, device=device)
    selected = torch.zeros(n, e, dtype=f64, device=device)
    mass = torch.zeros(n, e, dtype=f64, device=device)
    norm_sum = torch.zeros(n, e, dtype=f64, device=device) if output_norm else None
    state: dict[str, Any] = {"mask": None}

    def router_hook(i: int) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
            logits = logits.detach().reshape(-1, e)
            valid = _valid(state["mask"], logits.shape[0])
            if valid is not None:
                logits = logits[valid]
            mass[i] += logits.float().softmax(-1).sum(0).to(f64)

        return hook

    def experts_hook(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], _out: Any) -> None:
            hidden, index, weights = _routing(module, args, kwargs)
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])
            index, weights = index.detach().reshape(hidden.shape[0], -1), weights.detach().reshape(hidden.shape[0], -1)
            valid = _valid(state["mask"], hidden.shape[0])
            if valid is not None:
                hidden, index, weights = hidden[valid], index[valid], weights[valid]
            tokens[i] += hidden.shape[0]
            flat = index.reshape(-1)
            selected[i] += torch.bincount(flat, minlength=e + 1)[:e].to(f64)  # index e: expert-parallel sentinel
            if norm_sum is None:
                return
            routed = flat < e
            rows = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(index.shape[1])[routed]
            if rows.numel() == 0:
                return
            # each (token, expert) pair as one row with top-1 routing: the expert's weighted output alone
            out = module.forward(hidden[rows], flat[routed, None], weights.reshape(-1)[routed, None])
            norms = out.reshape(rows.shape[0], -1).float().norm(dim=-1)
            norm_sum[i].index_add_(0, flat[routed], norms.to(f64))

        return hook

    with preserved(model), torch.no_grad():
        model.eval()  # no router jitter noise
        handles = [b.router.register_forward_hook(router_hook(i)) for i, b in enumerate(blks)]
        handles += [b.experts.register_forward_hook(experts_hook(i), with_kwargs=True) for i, b in enumerate(blks)]
        with hooks(*handles):
            for batch in progress_bar(batches, len(batches), "routing", progress):
                batch = batch.to(device)
                state["mask"] = batch.mask
                call_model(model, batch)
    if not bool((tokens > 0).all()):
        missing = [b.name for b, t in zip(blks, tokens.tolist()) if t == 0]
        raise InputError(
            f"MoE layers {missing[:3]} saw no tokens: the data is empty or all padding; pass token ids with "
            "at least one attention_mask == 1 entry"
        )
    return ExpertStats([b.name for b in blks], tokens, selected, mass, norm_sum)


def _stats(task: Any, method: str, output_norm: bool = False) -> ExpertStats:
    if task.calibration is None:
        raise InputError(
            f"{method} measures routing on data: pass token ids, e.g. whatmatters.compress.score(model, "
            f"'{method}', data=tokenizer(texts, return_tensors='pt', padding=True)) or data=input_ids"
        )
    cal = task.calibration
    return expert_statistics(task.model, cal.batches, output_norm=output_norm, progress=cal.progress)


def _extra(stats: ExpertStats, model: nn.Module) -> dict[str, Any]:
    top_k = [getattr(b.router, "top_k", None) for b in moe_blocks(model)]
    return {
        "layers": stats.layers,
        "tokens": [int(t) for t in stats.tokens.tolist()],
        "top_k": top_k[0] if len(set(top_k)) == 1 else top_k,
    }


# ----------------------------------------------------------------- scorers
@scorer("expert_frequency", verb="compress", units=("expert",), family="routing", needs="module", per_sample=False,
        aliases=("expert_load",))  # fmt: skip
def expert_frequency(task: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Fraction of tokens routed to each expert (its top-k selections), per MoE layer.

    Values ``(n_moe_layers, n_experts)``; each row sums to the number of experts per token ``top_k``.
    Experts never selected score 0: the first candidates for removal.
    """
    stats = _stats(task, "expert_frequency")
    return stats.frequency.float(), {**_extra(stats, task.model), "counts": stats.selected.long()}


@scorer("expert_router_mass", verb="compress", units=("expert",), family="routing", needs="module",
        per_sample=False)  # fmt: skip
def expert_router_mass(task: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean router probability of each expert (softmax of the router logits, before top-k), per MoE layer.

    Values ``(n_moe_layers, n_experts)``; each row sums to 1. Unlike the frequency it also credits experts
    that narrowly miss the top-k. For sigmoid-gated routers (DeepSeek-V3) it is the softmax of their logits.
    """
    stats = _stats(task, "expert_router_mass")
    return stats.router_mass.float(), _extra(stats, task.model)


@scorer("expert_output_norm", verb="compress", units=("expert",), family="routing", needs="module",
        per_sample=False)  # fmt: skip
def expert_output_norm(task: Any, *, weighted_by_frequency: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean size ``||w_e(x) E_e(x)||_2`` of an expert's routed contribution to the residual stream.

    The mean is over the tokens routed to the expert (0 for an expert never routed to), with ``w_e(x)``
    the routing weight the model uses. ``weighted_by_frequency=True`` multiplies by the expert's routing
    frequency: the mean contribution per token, counting the tokens it never sees as 0.
    """
    stats = _stats(task, "expert_output_norm", output_norm=True)
    values = stats.output_norm * stats.frequency if weighted_by_frequency else stats.output_norm
    return values.float(), {**_extra(stats, task.model), "counts": stats.selected.long()}


# ----------------------------------------------------------------- removal
def _kept(values: torch.Tensor, keep: int | float, n_experts: int, top_k: int) -> torch.Tensor:
    if isinstance(keep, numbers.Integral) and not isinstance(keep, bool):
        count = int(keep)
    elif isinstance(keep, numbers.Real) and not isinstance(keep, bool):
        count = round(kept_share(keep, "keep", of="experts") * n_experts)
    else:
        raise InputError(f"keep must be a number of experts (int) or a fraction in (0, 1], got {keep!r}")
    if not top_k <= count <= n_experts:
        raise InputError(
            f"keep={keep!r} leaves {count} experts per layer; it must be between top_k={top_k} (experts used per "
            f"token) and the {n_experts} experts the layers have"
        )
    if not bool(torch.isfinite(values).all()):
        raise InputError("importance values contain NaN or infinity; score the model again on valid data")
    order = values.float().argsort(dim=1, descending=True, stable=True)[:, :count]
    return order.sort(dim=1).values


@dataclass
class ExpertReport(RemovalCounts):
    """What ``prune_experts`` removed: expert indices per MoE layer (original numbering) and the size change."""

    method: str
    keep: int
    removed: dict[str, list[int]]
    n_parameters_before: int
    n_parameters_after: int


def prune_experts(model: nn.Module, importance: Importance, keep: int | float = 0.5) -> Compressed:
    """A NEW model keeping the ``keep`` most important experts of every MoE layer (same count per layer).

    Returns ``(model, report)`` (:class:`~whatmatters.core.actions.Compressed`, an :class:`ExpertReport`).

    ``importance``: an expert score of this model (``unit="expert"``, values ``(n_moe_layers, n_experts)``).
    ``keep``: experts per layer (int) or a fraction of them (float), at least the router's ``top_k``.
    The experts' weights and the router's rows are sliced; ``num_experts`` in the modules and the config are
    updated; kept experts stay in their original order. On tokens never routed to a removed expert the
    outputs are unchanged when the top-k weights are renormalized (Mixtral, GPT-OSS, ``norm_topk_prob=True``);
    with unnormalized softmax weights (Qwen2-MoE's default) they grow slightly. The input model is not changed.
    """
    blks = moe_blocks(model)
    if not isinstance(importance, Importance) or importance.unit != "expert" or importance.per_sample:
        raise InputError(
            "importance must be an expert score, e.g. whatmatters.compress.score(model, 'expert_frequency', data=ids)"
        )
    n_experts = blks[0].n_experts
    shape = (len(blks), n_experts)
    if tuple(importance.values.shape) != shape:
        raise InputError(
            f"importance has shape {tuple(importance.values.shape)} but the model has {shape[0]} MoE layers of "
            f"{n_experts} experts; score this model (before any removal) and pass that result"
        )
    names = importance.extra.get("layers")
    if names is not None and list(names) != [b.name for b in blks]:
        raise InputError(
            f"importance scores layers {list(names)[:3]}..., not this model's MoE layers; score this model"
        )
    for b in blks:
        if (getattr(b.router, "num_group", None) or 1) > 1:
            raise ModelError(
                f"{b.name} routes within groups of experts (DeepSeek-style group-limited routing); removing experts "
                "would change the groups, so prune_experts does not support it"
            )
    top_k = max(int(getattr(b.router, "top_k", 1)) for b in blks)
    kept = _kept(importance.values.cpu(), keep, n_experts, top_k)
    new = copy.deepcopy(model)
    for blk, rows in zip(moe_blocks(new), kept):
        for module in (blk.experts, blk.router):
            _slice(module, blk.name, rows, n_experts)
        for owner in (blk.experts, blk.router, blk.module):
            if isinstance(getattr(owner, "num_experts", None), int):
                owner.num_experts = len(rows)
    config = getattr(new, "config", None)
    if config is not None:
        for cfg in {id(c): c for c in (config, _text_config(config))}.values():
            for key in _CONFIG_KEYS:
                if getattr(cfg, key, None) == n_experts:
                    setattr(cfg, key, len(kept[0]))
    removed = {b.name: sorted(set(range(n_experts)) - set(rows.tolist())) for b, rows in zip(blks, kept)}
    report = ExpertReport(importance.method, len(kept[0]), removed, n_parameters(model), n_parameters(new))
    return Compressed(new, report)


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _slice(module: nn.Module, name: str, rows: torch.Tensor, n_experts: int) -> None:
    """Keep ``rows`` of every expert-indexed parameter / buffer of ``module`` (recursively)."""
    for sub_name, sub in module.named_modules():
        for key, p in list(sub.named_parameters(recurse=False)):
            if p.ndim == 0 or p.shape[0] != n_experts:
                raise ModelError(
                    f"{name}.{sub_name or key}: parameter {key} of shape {tuple(p.shape)} is not indexed by expert "
                    f"(first axis {n_experts}); this layout cannot be pruned by slicing. Supported: {SUPPORTED}"
                )
            new = nn.Parameter(p.detach()[rows.to(p.device)].clone(), requires_grad=p.requires_grad)
            setattr(sub, key, new)
        for key, buf in list(sub.named_buffers(recurse=False)):
            if buf is not None and buf.ndim and buf.shape[0] == n_experts:
                sub._buffers[key] = buf[rows.to(buf.device)].clone()
        if isinstance(sub, nn.Linear) and sub.out_features == n_experts:
            sub.out_features = len(rows)
