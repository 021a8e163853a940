"""Layer scores for :func:`~whatmatters.compress.quantize.allocate_bits`: one score per layer, ``unit="layer"``.

Each score is an entry of ``LAYER_SCORE_REGISTRY`` that *is* its behaviour (no dispatch on names):
``magnitude`` (mean ``|W|``), ``fisher`` (the registered ``fisher`` weight score averaged per layer),
``lrp`` (relevance arriving at each layer's output; AttnLRP / CP-LRP for Llama-family LMs on token ids),
``gradient_activation`` (``sum |output * d loss / d output|``) and ``block_influence`` (ShortGPT's
``1 - cos(input, output)`` of the residual block holding each layer, so every layer of a block gets its
block's score; the blocks are any modules a regex names, measured with the same hooks as the per-block
``block_influence`` scorer of ``compress.score``, padding left out).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from whatmatters.compress.batches import as_batches, call_model
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.importance import Importance
from whatmatters.core.params import check_params
from whatmatters.core.registry import Registry, keyword_defaults
from whatmatters.core.state import hooks, preserved

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONTEXT = ("target", "batch_size")


@dataclass(frozen=True)
class LayerScore:
    """A registered layer score: ``fn(model, chosen, data, *, target, batch_size, **params)`` returns
    ``(values, names, params)`` (one value per layer name; the parameters it used)."""

    name: str
    fn: Callable[..., tuple[torch.Tensor, list[str], dict[str, Any]]]
    units: tuple[str, ...] = ("layer",)
    aliases: tuple[str, ...] = ()
    open_params: bool = False  # forwards other keywords to the method it wraps (fisher, lrp)

    @property
    def defaults(self) -> dict[str, Any]:
        return keyword_defaults(self.fn, skip=_CONTEXT)

    @property
    def header(self) -> str:
        return f"{self.name} (layer score for allocate_bits)"


LAYER_SCORE_REGISTRY = Registry(
    "layer score", listing="whatmatters.compress.layer_scoring.LAYER_SCORES lists them", show_names=True
)


def layer_score(name: str, *, open_params: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        LAYER_SCORE_REGISTRY.add(LayerScore(name, fn, open_params=open_params))
        return fn

    return register


def layer_scores(
    model: nn.Module,
    method: str,
    data: Any = None,
    layers: str | Sequence[str] | None = None,
    *,
    target: Any = None,
    batch_size: int = 32,
    **params: Any,
) -> Importance:
    """One score per layer (``Importance`` with ``unit="layer"``) for :func:`allocate_bits`.

    ``method`` is one of ``LAYER_SCORES``: ``"magnitude"`` (mean ``|W|``), ``"fisher"`` (mean
    empirical-Fisher saliency of the layer's weights, ``compress.score(model, "fisher", data)``; Linear
    layers only), ``"lrp"`` (relevance arriving at the layer's output, ``layer_relevance`` with ``|R|``
    summed, mean over ``data``; with ``attention="gradient"`` (default) the attention softmax passes the
    gradient, so relevance reaches the query and key projections, which the conservative rule
    (``attention="constant"``) leaves at zero; for Llama-family causal LMs and token-id ``data`` this is
    AttnLRP, resp. CP-LRP, of ``whatmatters.explain.lrp.lm_lrp`` for the predicted next token at the last
    position, or with ``target="next"`` for the actual next tokens at every position),
    ``"gradient_activation"`` (mean over batches of ``sum |output * d loss / d output|``, the first-order
    relevance of the layer's output, for models LRP does not support) and ``"block_influence"``
    (``1 - cos(input, output)`` of the residual block holding the layer, averaged over tokens: every layer
    of a block gets its block's score; ``blocks`` is a regex naming the blocks, default
    ``r"(blocks|layers|layer|h)\\.\\d+$"``).
    """
    from whatmatters.compress.quantize import quantizable_layers

    entry = LAYER_SCORE_REGISTRY.get(method)
    if not entry.open_params:
        params = check_params(entry.name, params, entry.defaults, fn=entry.fn)
    chosen = quantizable_layers(model, layers)
    values, names, used = entry.fn(model, chosen, data, target=target, batch_size=batch_size, **params)
    return Importance(
        values=values.float().cpu(), unit="layer", names=tuple(names), per_sample=False, method=entry.name, params=used
    )


@layer_score("magnitude")
def _magnitude(model: nn.Module, chosen: dict[str, nn.Module], data: Any, *, target: Any, batch_size: int):
    """Mean ``|W|`` of each layer."""
    values = torch.stack([m.weight.detach().abs().float().mean().cpu() for m in chosen.values()])
    return values, list(chosen), {}


@layer_score("fisher", open_params=True)
def _fisher(model: nn.Module, chosen: dict[str, nn.Module], data: Any, *, target: Any, batch_size: int, **params):
    """The ``fisher`` weight score (empirical Fisher saliency) averaged over each Linear layer."""
    from whatmatters.compress.api import score

    convs = [n for n, m in chosen.items() if isinstance(m, _CONVS)]
    if convs:
        raise InputError(
            f"fisher layer scores cover Linear layers only, and {convs[0]} is a convolution; "
            "select Linear layers with layers=r'regex'"
        )
    layers = [f"^{re.escape(n)}$" for n in chosen]
    imp = score(model, "fisher", data, layers=layers, batch_size=batch_size, **params)
    lay = imp.layer_importance("mean")
    return lay.values.float(), list(lay.names), params


@layer_score("lrp", open_params=True)
def _lrp(
    model: nn.Module,
    chosen: dict[str, nn.Module],
    data: Any,
    *,
    target: Any,
    batch_size: int,
    attention: str = "gradient",
    **params: Any,
):
    """Relevance arriving at each layer's output (AttnLRP / CP-LRP for Llama-family LMs on token ids)."""
    from whatmatters.explain.lrp import is_language_model, layer_relevance, lm_layer_relevance

    names = list(chosen)
    if not isinstance(data, torch.Tensor):
        raise InputError("lrp layer scores need data= an input tensor (n, ...)")
    if attention not in ("gradient", "constant"):
        raise MethodError(f"attention must be 'gradient' or 'constant', got {attention!r}")
    if not data.is_floating_point() and is_language_model(model):  # token ids: AttnLRP / CP-LRP
        variant = "attnlrp" if attention == "gradient" else "cp"
        lm_params = {k: params.pop(k) for k in ("epsilon",) if k in params}
        if params:
            raise MethodError(f"lrp layer scores of a language model take epsilon= only, not {sorted(params)}")
        rel = lm_layer_relevance(model, data, target, names, variant=variant, batch_size=batch_size, **lm_params)
        used = {"attention": attention, **lm_params}
    else:
        rules = dict(params.pop("rules", None) or {})
        if attention == "gradient":  # relevance also flows through the attention weights to q and k
            rules.update({n: _softmax_gradient_rule()() for n, m in model.named_modules() if isinstance(m, nn.Softmax)})
        rel = layer_relevance(model, data, target, names, batch_size=batch_size, rules=rules or None, **params)
        used = params
    return rel.aggregate("mean").values, names, used


@layer_score("gradient_activation")
def _gradient_activation_score(
    model: nn.Module, chosen: dict[str, nn.Module], data: Any, *, target: Any, batch_size: int
):
    """Mean over batches of ``sum |output * d loss / d output|`` per layer."""
    return _gradient_activation(model, chosen, data, batch_size), list(chosen), {}


@layer_score("block_influence")
def _block_influence_score(
    model: nn.Module,
    chosen: dict[str, nn.Module],
    data: Any,
    *,
    target: Any,
    batch_size: int,
    blocks: str | None = None,
):
    """ShortGPT's ``1 - cos(input, output)`` of the residual block that holds each layer."""
    return _block_influence(model, chosen, data, batch_size, blocks), list(chosen), {}


def _softmax_gradient_rule() -> type:
    from whatmatters.explain.lrp import Rule

    class SoftmaxGradient(Rule):
        """The softmax's own gradient (Jacobian-vector product) instead of treating it as a constant."""

        def backward(self, module: nn.Module, x: torch.Tensor, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            dim = module.dim if module.dim is not None else -1
            return z * (g - (g * z).sum(dim, keepdim=True))

    return SoftmaxGradient


def _gradient_activation(model: nn.Module, chosen: dict[str, nn.Module], data: Any, batch_size: int) -> torch.Tensor:
    from whatmatters.compress.batches import default_loss

    batches = as_batches(data, batch_size=batch_size)
    device = next(model.parameters()).device
    names = list(chosen)
    totals = torch.zeros(len(names), dtype=torch.float64)
    outputs: dict[int, torch.Tensor] = {}

    def keep(i: int, _m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        outputs[i] = out

    handles = [m.register_forward_hook(partial(keep, i)) for i, m in enumerate(chosen.values())]
    with preserved(model, weights=False), hooks(*handles), torch.enable_grad():
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for batch in batches:
            outputs.clear()
            batch = batch.to(device)
            inputs = batch.args[0] if batch.args and batch.args[0].is_floating_point() else None
            if inputs is not None:
                inputs = inputs.clone().requires_grad_(True)
                batch.args = (inputs, *batch.args[1:])
            else:  # token ids: gradients start at the embeddings, so outputs need grad through a hook
                emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
                if emb is None:
                    raise ModelError("gradient_activation needs float inputs or a model with get_input_embeddings()")
                handles.append(emb.register_forward_hook(lambda _m, _i, o: o.requires_grad_(True)))
            loss = default_loss(model, call_model(model, batch), batch)
            order = sorted(outputs)
            grads = torch.autograd.grad(loss, [outputs[i] for i in order], allow_unused=True)
            for i, g in zip(order, grads):
                if g is not None:
                    totals[i] += float((outputs[i].detach() * g).abs().sum())
            if inputs is None:
                handles.pop().remove()
    return totals / len(batches)


def _block_influence(
    model: nn.Module, chosen: dict[str, nn.Module], data: Any, batch_size: int, pattern: str | None
) -> torch.Tensor:
    from whatmatters.compress.structured import influence, influence_hooks

    regex = re.compile(pattern or r"(^|\.)(blocks|layers|layer|h)\.\d+$")
    blocks = {n: m for n, m in model.named_modules() if n and regex.search(n)}
    if not blocks:
        raise InputError("block_influence found no residual blocks; name them with blocks=r'regex'")
    owner = {}
    for name in chosen:
        parents = [b for b in blocks if name.startswith(b + ".")]
        if not parents:
            raise InputError(
                f"layer {name} is in no block matched by the blocks pattern; select layers inside blocks "
                "(layers=r'blocks') or name the blocks with blocks=r'regex'"
            )
        owner[name] = max(parents, key=len)
    used = list(dict.fromkeys(owner.values()))
    device = next(model.parameters()).device
    sums = torch.zeros(len(used), dtype=torch.float64, device=device)
    counts = torch.zeros_like(sums)
    state: dict[str, Any] = {"mask": None}
    handles = influence_hooks([blocks[n] for n in used], sums, counts, state)
    with preserved(model, weights=False), hooks(*handles), torch.no_grad():
        model.eval()
        for batch in as_batches(data, batch_size=batch_size):
            batch = batch.to(device)
            state["mask"] = batch.mask
            call_model(model, batch)
    per_block = influence(sums, counts, used).cpu()
    return per_block[[used.index(owner[n]) for n in chosen]]


LAYER_SCORES = tuple(LAYER_SCORE_REGISTRY.entries)

__all__ = ["LAYER_SCORES", "LAYER_SCORE_REGISTRY", "LayerScore", "layer_score", "layer_scores"]
