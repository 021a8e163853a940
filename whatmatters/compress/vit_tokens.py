"""Patch-token importance inside a vision transformer, computed from one layer's attention at inference.

Blocks are found by their parts, not by class: a pre-norm block with a norm, an attention module with
separate query / key / value / output projections, a second norm and an MLP (the project's
:class:`~whatmatters.vision.nets.ShapesViT` / ``FashionViT`` and Hugging Face ``ViTForImageClassification``
and its relatives). :func:`attend` recomputes a block's attention from those parts (sdpa or not), so every
score reads the attention probabilities ``(b, heads, T, T)`` without ``output_attentions``.

Per-layer token rules (``TOKEN_RULES``; each also a registered ``compress`` scorer of unit ``token``):

* ``cls_attention`` -- attention the CLS query pays to each patch, mean over heads (EViT, "[CLS] token
  tells everything"); needs a model with a CLS token.
* ``accumulated_attention`` -- attention each patch receives, summed over queries, mean over heads (FastV,
  H2O); the same scorer name scores the tokens of language models (:mod:`whatmatters.compress.tokens`).
* ``token_transition`` -- how much a token's representation changes across the layer's attention
  sub-layer, ``||x_after - x_before|| / ||x_before||`` (TransPrune's token transition, in magnitude).
* ``token_distinctiveness`` -- how far each patch token is from the mean patch token of its image, at the
  block's input: content stands out from background. It reads no attention (``INPUT_RULES``, with
  ``token_diversity`` and ``random_tokens``), so ``prune_tokens`` can apply it before the block's attention,
  which then already runs on the kept tokens (its default for this score and ``token_diversity``).
* ``token_diversity`` -- DivPrune's greedy max-min diversity at the block's input: starting from the token
  farthest from the mean direction, each next token is the one whose cosine distance to the tokens chosen
  so far is largest; the score is the reverse of that order (``n`` for the first), so the top ``k`` are the
  greedy diverse set of size ``k``. The greedy order is sequential: one batched step per token.
* ``random_tokens`` -- uniform random scores: the baseline every score must beat.

The CLS (and distillation) tokens are never scored: scores are ``(b, n_patches)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.registry import scorer
from whatmatters.core.state import preserved

if TYPE_CHECKING:
    from whatmatters.compress.api import WeightTask

# (block: first norm, attention, second norm, MLP), (attention: query, key, value, output, heads, scale)
BLOCK_PATTERNS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("norm1", "attn", "norm2", "mlp"), ("q", "k", "v", "proj", "heads", "scale")),  # whatmatters.vision.nets
    (  # transformers ViT, DeiT, ViT-MSN, ... (>= 5)
        ("layernorm_before", "attention", "layernorm_after", "mlp"),
        ("q_proj", "k_proj", "v_proj", "o_proj", "num_attention_heads", "scaling"),
    ),
)
SPECIAL_TOKENS = ("cls_token", "distillation_token", "dist_token")


@dataclass(frozen=True)
class BlockParts:
    """The parts of one pre-norm block: ``x + proj(attn(norm1(x)))``, then ``x + mlp(norm2(x))``."""

    block: nn.Module
    norm1: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    proj: nn.Module
    heads: int
    scale: float
    norm2: nn.Module
    mlp: nn.Module


@dataclass(frozen=True)
class ViTLayout:
    """A ViT's blocks in forward order, their qualified names and its leading special (CLS) tokens."""

    blocks: list[BlockParts]
    names: list[str]
    n_special: int


def _parts(module: nn.Module) -> BlockParts | None:
    for (n1, attn, n2, mlp), (q, k, v, o, heads, scale) in BLOCK_PATTERNS:
        a = getattr(module, attn, None)
        if a is None or not all(isinstance(getattr(module, n, None), nn.Module) for n in (n1, n2, mlp)):
            continue
        if all(isinstance(getattr(a, n, None), nn.Linear) for n in (q, k, v, o)) and hasattr(a, heads):
            norm1, norm2, m = getattr(module, n1), getattr(module, n2), getattr(module, mlp)
            lin = [getattr(a, n) for n in (q, k, v, o)]
            return BlockParts(module, norm1, *lin, int(getattr(a, heads)), float(getattr(a, scale)), norm2, m)
    return None


def vit_layout(model: nn.Module) -> ViTLayout:
    """The blocks of ``model`` (``ModelError`` naming what is looked for when there are none)."""
    found = [(name, p) for name, m in model.named_modules() if (p := _parts(m)) is not None]
    if not found:
        wanted = "; ".join(f"a block with {', '.join(b)} whose {b[1]} has {', '.join(a)}" for b, a in BLOCK_PATTERNS)
        raise ModelError(
            f"found no transformer blocks in {type(model).__name__}: token pruning needs pre-norm ViT blocks ({wanted})"
        )
    special = sum(name.rsplit(".", 1)[-1] in SPECIAL_TOKENS for name, _ in model.named_parameters())
    return ViTLayout([p for _, p in found], [n for n, _ in found], special)


def is_vit(model: nn.Module) -> bool:
    """Whether :func:`vit_layout` finds blocks in ``model``."""
    return any(_parts(m) is not None for m in model.modules())


def attend(
    parts: BlockParts, x: torch.Tensor, log_size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's attention sub-layer: ``(x + attention output, probabilities (b, h, T, T), keys (b, h, T, d))``.

    ``log_size`` ``(b, T)``: ToMe's proportional attention, ``log(size)`` added to each key's logits.
    """
    b, t, _ = x.shape
    h = parts.norm1(x)

    def split(z: torch.Tensor) -> torch.Tensor:
        return z.view(b, t, parts.heads, -1).transpose(1, 2)

    q, k, v = split(parts.q(h)), split(parts.k(h)), split(parts.v(h))
    logits = (q @ k.transpose(-2, -1)) * parts.scale
    if log_size is not None:
        logits = logits + log_size[:, None, None, :].to(logits.dtype)
    attn = logits.softmax(dim=-1)
    out = parts.proj((attn @ v).transpose(1, 2).reshape(b, t, -1))
    return x + out, attn, k


# ------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class LayerView:
    """What a rule reads at one layer: attention probabilities, tokens before and after attention."""

    attn: torch.Tensor | None  # (b, heads, T, T); None for a rule of INPUT_RULES applied before the attention
    before: torch.Tensor  # (b, T, dim)
    after: torch.Tensor  # (b, T, dim): the tokens that are kept or dropped (``before`` itself before attention)
    n_special: int
    generator: torch.Generator | None = None


def _cls_attention(view: LayerView) -> torch.Tensor:
    if view.n_special < 1:
        raise MethodError(
            "cls_attention needs a model with a CLS token; this one pools its patch tokens. "
            "Use method='accumulated_attention' or 'token_transition'"
        )
    return view.attn[:, :, 0, view.n_special :].mean(1)


def _received(view: LayerView) -> torch.Tensor:
    return view.attn[..., view.n_special :].sum(2).mean(1)


def _transition(view: LayerView) -> torch.Tensor:
    s = view.n_special
    change = (view.after[:, s:] - view.before[:, s:]).norm(dim=-1)
    return change / view.before[:, s:].norm(dim=-1).clamp_min(1e-12)


def _distinctiveness(view: LayerView) -> torch.Tensor:
    patches = view.before[:, view.n_special :]
    return (patches - patches.mean(1, keepdim=True)).norm(dim=-1)


def _diversity(view: LayerView) -> torch.Tensor:
    z = view.before[:, view.n_special :].float()
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b, n, _ = z.shape
    distance = 1 - z @ z.transpose(1, 2)  # (b, n, n) cosine distance
    rows = torch.arange(b, device=z.device)
    rank = torch.zeros(b, n, device=z.device)
    nearest = torch.full((b, n), math.inf, device=z.device)  # distance to the closest chosen token
    chosen = (z - z.mean(1, keepdim=True)).norm(dim=-1).argmax(1)
    for r in range(n):  # greedy selection is sequential: one step per token, each a batched tensor op
        rank[rows, chosen] = n - r
        nearest = torch.minimum(nearest, distance[rows, chosen]).masked_fill(rank > 0, -math.inf)
        chosen = nearest.argmax(1)
    return rank


def _random(view: LayerView) -> torch.Tensor:
    b, t = view.before.shape[0], view.before.shape[1] - view.n_special
    return torch.rand(b, t, generator=view.generator, device=view.before.device)


TOKEN_RULES: dict[str, Callable[[LayerView], torch.Tensor]] = {
    "cls_attention": _cls_attention,
    "accumulated_attention": _received,
    "token_transition": _transition,
    "token_distinctiveness": _distinctiveness,
    "token_diversity": _diversity,
    "random_tokens": _random,
}
INPUT_RULES = frozenset({"token_distinctiveness", "token_diversity", "random_tokens"})  # read only the input tokens
# prune_tokens applies these before the block's attention by default
BEFORE_ATTENTION = frozenset({"token_distinctiveness", "token_diversity"})


def layer_indices(n: int, layers: Sequence[int] | None, name: str = "at_layers") -> list[int]:
    """Sorted distinct block indices (negatives count from the end); ``InputError`` when out of range."""
    if layers is None:
        return list(range(n))
    if isinstance(layers, bool) or not isinstance(layers, Sequence):
        layers = [layers]  # type: ignore[list-item]
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise InputError(f"{name} must be block indices (ints), got {layers!r}")
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise InputError(f"{name} {list(layers)!r}: {bad} out of range, the model has {n} blocks (0..{n - 1})")
    return sorted({i % n for i in layers})


def token_scores(
    model: nn.Module, images: torch.Tensor, rule: str, layers: Sequence[int] | None = None, *, seed: int = 0
) -> tuple[torch.Tensor, list[int]]:
    """Sum over ``layers`` (default all blocks) of ``TOKEN_RULES[rule]`` per patch token: ``(n, n_patches)``."""
    layout = vit_layout(model)
    chosen = layer_indices(len(layout.blocks), layers, "attn_layers")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    parts = {id(layout.blocks[i].block): layout.blocks[i] for i in chosen}
    total: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, _output: Any) -> None:
        x = args[0]
        after, attn, _ = attend(parts[id(module)], x)
        total.append(TOKEN_RULES[rule](LayerView(attn, x, after, layout.n_special, generator)).float())

    with preserved(model), torch.no_grad():
        handles = [layout.blocks[i].block.register_forward_hook(hook) for i in chosen]
        try:
            model(images.to(device))
        finally:
            for h in handles:
                h.remove()
    if len(total) != len(chosen):
        raise ModelError(f"{rule}: {len(total)} of the {len(chosen)} hooked blocks ran during the forward pass")
    return torch.stack(total).sum(0), chosen


def vit_score(task: WeightTask, rule: str, attn_layers: Sequence[int] | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """A compress scorer's result for images: ``(n, n_patches)`` values and the layers used."""
    if task.calibration is None:
        raise InputError(f"{rule} scores the patch tokens of images: pass data=images, a tensor (n, C, H, W)")
    rows, chosen = [], []
    for batch in task.calibration.batches:
        x = batch.args[0] if batch.args else batch.kwargs.get("pixel_values")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4:
            raise InputError(f"{rule} on a vision transformer needs images: a float tensor (n, C, H, W)")
        values, chosen = token_scores(task.model, x, rule, attn_layers, seed=task.seed)
        rows.append(values)
    return torch.cat(rows), {"layers": chosen}


def _register(name: str, summary: str) -> None:
    def fn(task: WeightTask, *, attn_layers: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        return vit_score(task, name, attn_layers)

    fn.__doc__ = (
        f"{summary}, unit ``token`` (ViT patch tokens).\n\nValues ``(n, n_patches)`` float32: the sum over the blocks "
        "``attn_layers`` (default all; indices, negatives allowed) of the per-layer score that ``prune_tokens`` "
        "uses inside the forward pass (see :mod:`whatmatters.compress.vit_tokens`)."
    )
    fn.__name__ = name
    scorer(name, verb="compress", units="token", family="attention", needs="module")(fn)


_register("cls_attention", "Attention the CLS query pays to each patch token, mean over heads (EViT)")
_register("token_transition", "Relative change of each patch token across a block's attention sub-layer (TransPrune)")
_register("token_distinctiveness", "Distance of each patch token from its image's mean patch token, at a block's input")
_register("token_diversity", "Greedy max-min cosine diversity order of the patch tokens at a block's input (DivPrune)")
_register("random_tokens", "Uniform random patch-token scores (seeded by seed=): the baseline for token scores")
