"""Token pruning and merging for vision transformers: a copy whose forward carries fewer tokens.

``prune_tokens(model, method="cls_attention", keep=0.5)`` returns ``Compressed(model, report)``: a deep copy
whose blocks at ``at_layers`` score the patch tokens from their own attention (``TOKEN_RULES`` of
:mod:`whatmatters.compress.vit_tokens`) and keep the best ones after the attention sub-layer, so the MLP
and every later block run on fewer tokens (EViT's placement); a score that reads no attention
(``token_distinctiveness``, ``token_diversity``) prunes the block's input instead, so its attention runs on
fewer tokens too.
The CLS token is always kept; every image of a batch keeps the same number of tokens (one ``topk`` +
``gather`` per layer, no loops over tokens).
``schedule="once"`` prunes at one block; ``"progressive"`` prunes at several, each keeping the same share
``keep ** (1 / len(at_layers))`` of the tokens it receives, so ``keep`` of the patch tokens reach the end.

``merge_tokens(model, r=8)`` is ToMe: after each block's attention, bipartite soft matching on the mean
attention keys merges ``r`` patch tokens into their most similar partner (size-weighted average), and
every later block uses proportional attention (``log(size)`` added to the key logits). ``keep=`` instead
of ``r`` spreads the merges over ``at_layers`` like the progressive schedule.

Blocks change class in the copy (a subclass of their own), so parameter names and ``state_dict`` keys are
those of the original. A block that removes nothing and holds no merged tokens runs its own forward, so
``keep=1.0`` and ``r=0`` give the original outputs exactly. ``report.last_forward`` lists
``(block, tokens in, tokens out)`` of the latest forward pass: the pruning is observable, never silent.
Inference only: the rebuilt sub-layers skip dropout. The copy's blocks are of classes made at run time, so
save its ``state_dict`` (the original's keys) rather than pickling the module.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from whatmatters.compress.vit_tokens import (
    BEFORE_ATTENTION,
    INPUT_RULES,
    TOKEN_RULES,
    BlockParts,
    LayerView,
    attend,
    layer_indices,
    vit_layout,
)
from whatmatters.core.actions import Compressed
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.fractions import kept_share, whole


@dataclass
class TokenReport:
    """What a token-reducing copy does, and the token counts of its latest forward pass."""

    method: str
    schedule: str
    layers: list[int]
    keep: float | None = None
    r: int | None = None
    n_special: int = 0  # leading CLS / distillation tokens, never dropped
    last_forward: list[tuple[int, int, int]] = field(default_factory=list)  # (block, tokens in, tokens out)
    threshold: float | None = None  # adaptive: score mass each image keeps
    budgets: list[int] = field(default_factory=list)  # adaptive: patch tokens each image of the latest batch needs

    @property
    def kept_share(self) -> float:
        """Share of the patch tokens left after the last reducing block in the latest forward (nan before one)."""
        reducing = [c for c in self.last_forward if c[0] in self.layers]
        if not reducing:
            return math.nan
        special = self.n_special
        return (reducing[-1][2] - special) / (reducing[0][1] - special)


@dataclass
class _Shared:
    """State shared by the reducing blocks of one copy during a forward pass."""

    report: TokenReport
    targets: Callable[[int], list[int]]  # patch tokens at the start -> patch tokens after each reducing block
    seed: int
    size: torch.Tensor | None = None
    plan: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    def start(self, x: torch.Tensor, n_special: int) -> None:
        self.size, self.plan = None, self.targets(x.shape[1] - n_special)
        self.report.last_forward.clear()
        self.generator = torch.Generator(device=x.device).manual_seed(self.seed)


@dataclass
class _Step:
    """One wrapped block: its parts, its position, and how it reduces tokens."""

    parts: BlockParts
    index: int
    first: bool
    step: int | None  # index into the plan, None for a block that only applies proportional attention
    reduce: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    n_special: int
    shared: _Shared
    before_attention: bool = False  # reduce the block's input (a rule of INPUT_RULES), not its attention's output


class _TokenReducing:
    """Mixin placed before a block's own class in the copy: reduce tokens after the attention sub-layer."""

    _token_step: _Step

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        st, shared = self._token_step, self._token_step.shared
        if st.first:
            shared.start(x, st.n_special)
        t = x.shape[1]
        patches = t - st.n_special
        keep = shared.plan[st.step] if st.step is not None else patches
        if keep == patches and shared.size is None:
            shared.report.last_forward.append((st.index, t, t))
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        mask = args[0] if args else kwargs.get("attention_mask")
        if mask is not None:
            raise ModelError("token pruning does not support an attention mask on the image tokens; pass none")
        if st.before_attention:  # score the input tokens, then the block's own forward on the kept ones
            x, _ = st.reduce(LayerView(None, x, x, st.n_special, shared.generator), None, None, patches - keep)
            shared.report.last_forward.append((st.index, t, x.shape[1]))
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        log_size = shared.size.log() if shared.size is not None else None
        after, attn, keys = attend(st.parts, x, log_size)
        if keep < patches:
            view = LayerView(attn, x, after, st.n_special, shared.generator)
            after, shared.size = st.reduce(view, keys, shared.size, patches - keep)
        shared.report.last_forward.append((st.index, t, after.shape[1]))
        return after + st.parts.mlp(st.parts.norm2(after))


_CLASSES: dict[type, type] = {}


def _reducing_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"TokenReduced{cls.__name__}", (_TokenReducing, cls), {})
    return _CLASSES[cls]


# ---------------------------------------------------------------------------------------- reducers
def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def budgets(scores: torch.Tensor, threshold: float, lo: int, hi: int) -> torch.Tensor:
    """``(b,)`` fewest top-scored tokens per row whose share of the row's (non-negative) score mass reaches
    ``threshold``, clamped to ``[lo, hi]`` (ATP-style adaptive budget)."""
    mass = scores.float().clamp_min(0).sort(dim=1, descending=True).values
    share = mass.cumsum(1) / mass.sum(1, keepdim=True).clamp_min(1e-30)
    return ((share < threshold - 1e-6).sum(1) + 1).clamp(lo, hi)


def _pruner(
    rule: Callable[[LayerView], torch.Tensor], report: TokenReport, min_keep: float | None = None
) -> Callable[..., tuple[torch.Tensor, None]]:
    def prune(view: LayerView, _keys: torch.Tensor, _size: None, remove: int) -> tuple[torch.Tensor, None]:
        s, scores = view.n_special, rule(view)
        n = scores.shape[1]
        k = n - remove
        if min_keep is not None:  # remove is the most min_keep allows; each image needs its own budget
            need = budgets(scores, report.threshold, max(1, round(min_keep * n)), max(1, round(report.keep * n)))
            report.budgets = need.tolist()
            k = int(need.max())  # one rectangular batch: every image carries the largest budget
        keep = scores.topk(k, dim=1).indices.sort(dim=1).values
        return torch.cat([view.after[:, :s], _gather(view.after[:, s:], keep)], dim=1), None

    return prune


def _merge(
    view: LayerView, keys: torch.Tensor, size: torch.Tensor | None, remove: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching: the ``remove`` most similar even-position patches merge into odd ones."""
    s, x = view.n_special, view.after
    b, t, _ = x.shape
    size = torch.ones(b, t, 1, device=x.device, dtype=x.dtype) if size is None else size[..., None]
    metric = keys.mean(1)[:, s:]
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (b, n_a, n_b)
    best, partner = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src, kept = order[:, :remove], order[:, remove:]
    dst = partner.gather(1, src)
    weighted, sizes = x[:, s:] * size[:, s:], size[:, s:]

    def combine(z: torch.Tensor) -> torch.Tensor:
        a, bb = z[:, ::2], z[:, 1::2]
        bb = bb.scatter_add(1, dst[..., None].expand(-1, -1, z.shape[-1]), _gather(a, src))
        return torch.cat([_gather(a, kept), bb], dim=1)

    total = combine(sizes)
    merged = combine(weighted) / total
    out = torch.cat([x[:, :s], merged], dim=1)
    return out, torch.cat([size[:, :s], total], dim=1)[..., 0]


# ------------------------------------------------------------------------------------------ actions
def _default_layers(n: int, schedule: str) -> list[int]:
    if schedule == "once":
        return [n // 4]
    return list(range(n // 4, n, max(1, n // 4)))


def _geometric(keep: float, steps: int) -> Callable[[int], list[int]]:
    def targets(n: int) -> list[int]:
        return [max(1, round(n * keep ** ((i + 1) / steps))) for i in range(steps)]

    return targets


def _install(
    model: nn.Module,
    layers: list[int],
    wrap_from: int,
    reduce: Callable[..., Any],
    shared: _Shared,
    before_attention: bool = False,
) -> nn.Module:
    if any(isinstance(m, _TokenReducing) for m in model.modules()):
        raise InputError("this model already prunes or merges tokens; pass the original model")
    new = copy.deepcopy(model)
    layout = vit_layout(new)
    shared.report.n_special = layout.n_special
    for i in range(wrap_from, len(layout.blocks)):
        parts = layout.blocks[i]
        step = layers.index(i) if i in layers else None
        block = parts.block
        block.__class__ = _reducing_class(type(block))
        block._token_step = _Step(parts, i, i == wrap_from, step, reduce, layout.n_special, shared, before_attention)
    return new


def _check_layers(model: nn.Module, at_layers: Sequence[int] | int | None, schedule: str) -> tuple[list[int], int]:
    layout = vit_layout(model)
    n = len(layout.blocks)
    layers = _default_layers(n, schedule) if at_layers is None else layer_indices(n, at_layers)
    return layers, n


def prune_tokens(
    model: nn.Module,
    method: str = "cls_attention",
    keep: float = 0.5,
    *,
    at_layers: Sequence[int] | int | None = None,
    schedule: Literal["once", "progressive"] = "once",
    threshold: float | None = None,
    min_keep: float = 0.1,
    before_attention: bool | None = None,
    seed: int = 0,
) -> Compressed:
    """A copy of the ViT ``model`` that keeps the ``keep`` share of its patch tokens, dropping the lowest-scored.

    Args:
        model: a ViT whose blocks :func:`~whatmatters.compress.vit_tokens.vit_layout` finds (the project's
            ``ShapesViT`` / ``FashionViT``, transformers ``ViTForImageClassification``). Not changed.
        method: the token score, one of ``cls_attention``, ``accumulated_attention``, ``token_transition``,
            ``token_distinctiveness``, ``token_diversity``, ``random_tokens``, computed inside the forward pass at
            each pruning block.
        keep: share of the patch tokens kept after the last pruning block, in ``(0, 1]`` (at least one).
        at_layers: block indices that prune (default: block ``n // 4`` once; progressive: every
            ``n // 4``-th block from there).
        schedule: ``"once"`` (one block) or ``"progressive"`` (each block keeps ``keep ** (1/len)``).
        threshold: adaptive budget (ATP-style, ``schedule="once"``): each image keeps its fewest top-scored
            patch tokens whose share of its score mass reaches ``threshold`` in ``(0, 1]``, between
            ``min_keep`` and ``keep`` of the patches, so easy images keep fewer. ``report.budgets`` lists each
            image's budget; a batch carries its largest one (rectangular tensors), so run easy and hard
            images in separate batches (or one at a time) to turn the smaller budgets into speed.
            ``threshold=1.0`` with ``keep=1.0`` keeps every token (the original outputs).
        min_keep: the smallest share an adaptive budget keeps, in ``(0, keep]``.
        before_attention: prune a block's input tokens, so its attention already runs on the kept ones (only
            the scores that read no attention: ``token_distinctiveness``, ``token_diversity``,
            ``random_tokens``), instead of the attention sub-layer's output (EViT's placement). Default: before
            for ``token_distinctiveness`` and ``token_diversity``.
        seed: seed of ``random_tokens`` (re-seeded at every forward pass, so a batch always prunes alike).

    Returns:
        ``Compressed(model, report)``; ``report.last_forward`` holds the token counts of the latest forward.
    """
    if method not in TOKEN_RULES:
        raise MethodError(f"unknown token score {method!r}; choose one of {', '.join(TOKEN_RULES)}")
    if schedule not in ("once", "progressive"):
        raise InputError(f"schedule must be 'once' or 'progressive', got {schedule!r}")
    keep = kept_share(keep, "keep", of="patch tokens")
    layers, _ = _check_layers(model, at_layers, schedule)
    if schedule == "once" and len(layers) != 1:
        raise InputError(f"schedule='once' prunes at one block, got at_layers={layers}; use schedule='progressive'")
    before = method in BEFORE_ATTENTION if before_attention is None else before_attention
    if not isinstance(before, bool) or (before and method not in INPUT_RULES):
        raise InputError(
            f"before_attention={before_attention!r}: only {', '.join(sorted(INPUT_RULES))} can prune before a "
            f"block's attention ({method} reads it); pass True / False / None"
        )
    report = TokenReport(method, schedule, layers, keep=keep)
    lowest = _adaptive(report, threshold, min_keep) if threshold is not None else None
    adaptive = lowest is not None and report.threshold < 1  # the block may remove down to min_keep
    plan = _geometric(lowest if adaptive else keep, len(layers))
    shared = _Shared(report, plan, whole(seed, "seed", minimum=0))
    pruner = _pruner(TOKEN_RULES[method], report, lowest)
    return Compressed(_install(model, layers, layers[0], pruner, shared, before), report)


def _adaptive(report: TokenReport, threshold: Any, min_keep: Any) -> float:
    """``min_keep`` checked (and ``report.threshold`` set) for an adaptive budget."""
    if report.schedule != "once":
        raise InputError("an adaptive budget (threshold=) prunes at one block: use schedule='once'")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
        raise InputError(f"threshold is the share of score mass kept, in (0, 1]; got {threshold!r}")
    min_keep = kept_share(min_keep, "min_keep", of="patch tokens")
    if min_keep > report.keep:
        raise InputError(f"min_keep={min_keep:g} is above keep={report.keep:g}: the budget's lower bound must not be")
    report.threshold = float(threshold)
    return min_keep


def merge_tokens(
    model: nn.Module,
    r: int | None = 8,
    *,
    keep: float | None = None,
    at_layers: Sequence[int] | int | None = None,
) -> Compressed:
    """A copy of the ViT ``model`` that merges tokens ToMe-style (bipartite soft matching, proportional attention).

    Args:
        r: patch tokens merged at each block of ``at_layers`` (default every block); at most half of the
            patches a block receives are merged (ToMe's bipartite limit), so later blocks may merge fewer.
        keep: instead of ``r``, the share of patch tokens left after the last merging block (each block of
            ``at_layers`` keeps ``keep ** (1 / len(at_layers))`` of what it receives; must be at least 1/2).

    Returns:
        ``Compressed(model, report)``; ``keep=1.0`` or ``r=0`` gives the original outputs exactly.
    """
    n = len(vit_layout(model).blocks)
    layers = list(range(n)) if at_layers is None else layer_indices(n, at_layers)
    if keep is not None:
        keep = kept_share(keep, "keep", of="patch tokens")
        if keep ** (1 / len(layers)) < 0.5:
            raise InputError(
                f"keep={keep:g} over {len(layers)} merging blocks needs more than half of the tokens merged per "
                "block; ToMe merges at most half: merge at more blocks (at_layers) or keep more"
            )
        targets, r_used = _geometric(keep, len(layers)), None
    else:
        if r is None:
            raise InputError("merge_tokens needs r (tokens merged per block) or keep (share of tokens kept)")
        r_used = whole(r, "r", minimum=0, meaning="patch tokens merged per block")

        def targets(patches: int) -> list[int]:
            out = []
            for _ in layers:
                patches -= min(r_used, patches // 2)
                out.append(patches)
            return out

    report = TokenReport("tome", "per-block", layers, keep=keep, r=r_used)
    return Compressed(_install(model, layers, layers[0], _merge, _Shared(report, targets, 0)), report)


__all__ = ["TokenReport", "merge_tokens", "prune_tokens"]
