"""LRP for decoder-only language models of the Llama family (Llama, Mistral, Qwen2, Qwen3), AttnLRP rules.

Gradient x input with modified backward passes (Achtibat et al., ICML 2024), applied with forward hooks
that are removed on exit; the model's attention implementation (sdpa, eager, ...) is used as it is:

* RMSNorm and the MLP activation: identity rule (``R_in = R_out``; the gradient becomes ``z / x``, so
  the normaliser is a constant).
* Element-wise gate x up product of the MLP: uniform rule (half of the relevance to each factor: the
  gradient of the product is halved).
* Attention (``variant="attnlrp"``): the softmax passes its own gradient (AttnLRP's softmax rule, a
  Taylor decomposition that absorbs part of the relevance), and both matrix products split relevance
  uniformly, so the gradient reaching the values is halved and that reaching queries and keys is
  quartered. Rotary embeddings, head reshapes and the key/value repetition of grouped-query attention
  are linear and pass the plain gradient.
* ``variant="cp"`` (CP-LRP, Ali et al. 2022, with LXT's treatment of gated MLPs): attention weights and
  the MLP gate are constants, so relevance flows through values and up projections only.
* Linear layers: LRP-epsilon (``epsilon=0``: LRP-0, the plain gradient; biases absorb relevance).

What is conserved: with ``variant="cp"``, ``epsilon=0`` and bias-free Linear layers (Llama, Mistral,
Qwen3; Qwen2's q/k/v biases absorb relevance) the token relevance sums to the target logit, and so
does the relevance reaching the residual stream after every decoder layer. AttnLRP's softmax rule is
not conservative, so there the sum differs from the logit by what the softmax layers absorb.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from whatmatters.core import hf
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.fractions import whole
from whatmatters.core.importance import Importance
from whatmatters.core.state import Tally, autograd_on, find_module, hooks, preserved
from whatmatters.core.task import as_indices
from whatmatters.explain._lrp.rules import damped

Tensor = torch.Tensor

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
VARIANTS = ("attnlrp", "cp")
_UNSUPPORTED_HINT = (
    "Use whatmatters.compress.layer_scores(model, 'gradient_activation', ...) for layer scores, or a gradient "
    "explainer for token attributions"
)


class _Scaled(torch.autograd.Function):
    """Forward: ``z`` (a copy). Backward: ``g * factor`` to ``x`` (``x`` is the tensor the gradient should reach)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, z: Tensor, factor: Tensor | float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return z.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return g * ctx.factor, None, None


def _identity_rule(_m: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
    """Identity rule for an element-wise layer: ``g_in = g_out * z / x`` (0 where ``x = 0``)."""
    x = inputs[0]
    if not isinstance(out, Tensor) or out.shape != x.shape:
        raise MethodError(f"the identity rule needs an element-wise layer; {type(_m).__name__} changes the shape")
    if not x.requires_grad:
        return out
    with torch.no_grad():
        ratio = torch.where(x != 0, out / torch.where(x != 0, x, 1), 0).to(out.dtype)
    return _Scaled.apply(x, out, ratio)


def _constant(_m: nn.Module, _inputs: tuple, out: Tensor) -> Tensor:
    return out.detach()


def _scale_output(factor: float) -> Any:
    def hook(_m: nn.Module, _inputs: tuple, out: Tensor) -> Tensor:
        return _Scaled.apply(out, out, factor) if out.requires_grad else out

    return hook


def _scale_input(factor: float) -> Any:
    def hook(_m: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0]
        return (_Scaled.apply(x, x, factor), *inputs[1:]) if x.requires_grad else inputs

    return hook


def _epsilon_rule(epsilon: float) -> Any:
    def hook(_m: nn.Module, _inputs: tuple, out: Tensor) -> Tensor:
        if not out.requires_grad:
            return out
        with torch.no_grad():
            factor = damped(out, epsilon)
        return _Scaled.apply(out, out, factor)

    return hook


@dataclass
class _Parts:
    """The modules the rules go on."""

    embedding: nn.Module
    norms: list[nn.Module]
    activations: list[nn.Module]
    down: list[nn.Module]
    queries: list[nn.Module]  # the last module before rotary embedding (q_norm if present, else q_proj)
    keys: list[nn.Module]
    values: list[nn.Module]
    linears: list[nn.Module]


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def is_language_model(model: Any) -> bool:
    """Whether ``model`` looks like a Hugging Face model with token inputs (has ``config`` and input embeddings)."""
    return (
        isinstance(model, nn.Module)
        and _model_type(model) is not None
        and callable(getattr(model, "get_input_embeddings", None))
    )


def _unsupported(model: nn.Module, why: str) -> ModelError:
    return ModelError(
        f"LRP for language models supports decoder-only {', '.join(SUPPORTED)} models (RMSNorm, rotary q/k/v/o "
        f"attention, gated MLP); {type(model).__name__} (model_type {_model_type(model)!r}) {why}. {_UNSUPPORTED_HINT}"
    )


def parts(model: nn.Module) -> _Parts:
    """The modules AttnLRP's rules attach to; ``ModelError`` naming the supported families otherwise."""
    if not is_language_model(model):
        raise ModelError(
            f"LRP for language models needs a Hugging Face causal LM ({', '.join(SUPPORTED)}); "
            f"got {type(model).__name__}"
        )
    if _model_type(model) not in SUPPORTED:
        raise _unsupported(model, "is not one of them")
    layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]
    if not layers:
        raise _unsupported(model, "has no decoder layers with self_attn and mlp")
    if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
        raise _unsupported(model, "has no language-model head (load it with AutoModelForCausalLM)")
    p = _Parts(model.get_input_embeddings(), [], [], [], [], [], [], [])
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for owner, names in (
            (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (mlp, ("gate_proj", "up_proj", "down_proj")),
        ):
            for name in names:
                if not isinstance(getattr(owner, name, None), nn.Linear):
                    raise _unsupported(model, f"has no Linear {name} in {type(owner).__name__}")
        if not isinstance(getattr(mlp, "act_fn", None), nn.Module):
            raise _unsupported(model, f"has no activation module act_fn in {type(mlp).__name__}")
        p.activations.append(mlp.act_fn)
        p.down.append(mlp.down_proj)
        p.queries.append(attn.q_norm if getattr(attn, "q_norm", None) is not None else attn.q_proj)
        p.keys.append(attn.k_norm if getattr(attn, "k_norm", None) is not None else attn.k_proj)
        p.values.append(attn.v_proj)
    for name, m in model.named_modules():
        if next(m.children(), None) is not None or not any(True for _ in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.Linear):
            p.linears.append(m)
        elif "RMSNorm" in type(m).__name__:
            p.norms.append(m)
        elif m is not p.embedding:
            raise _unsupported(model, f"has a layer {name!r} ({type(m).__name__}) that no LRP rule covers")
    return p


@dataclass(frozen=True)
class LMRelevance:
    """Result of :func:`lm_lrp`: token relevance ``(n, T)``, per-layer relevance ``{name: (n,)}``, targets."""

    tokens: Tensor
    layers: dict[str, Tensor]
    target: Tensor  # token ids (n,); (n, seq_len - 1) for target="next"
    logit: Tensor  # the target logit (n,), summed over positions for target="next": what the relevance explains


@contextmanager
def attached(
    model: nn.Module, variant: str = "attnlrp", epsilon: float = 0.0, capture: dict[str, nn.Module] | None = None
) -> Iterator[dict[str, Tensor]]:
    """Attach AttnLRP (or CP-LRP) hooks to a supported LM; yields ``{"embedding": leaf, name: output}`` after forward.

    Hook order matters: rules first, then the captures (they see the tensor the rest of the model uses),
    then the attention splits (so a captured q/k/v projection sees the gradient after the split).
    """
    if variant not in VARIANTS:
        raise MethodError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not isinstance(epsilon, (int, float)) or epsilon < 0:
        raise MethodError(f"epsilon must be a number >= 0, got {epsilon!r}")
    p = parts(model)
    store: dict[str, Tensor] = {}
    names = {m: n for n, m in model.named_modules()}
    tally = Tally()
    handles = []

    def on(modules: list[nn.Module], rule: Any, pre: bool = False) -> None:
        for m in modules:
            fn = tally.hook(names[m] or type(m).__name__, rule)
            handles.append(m.register_forward_pre_hook(fn) if pre else m.register_forward_hook(fn))

    def leaf(_m: nn.Module, _i: tuple, out: Tensor) -> Tensor:
        store["embedding"] = out.detach().requires_grad_(True)
        return store["embedding"]

    on([p.embedding], leaf)
    on(p.norms, _identity_rule)
    if variant == "attnlrp":
        on(p.activations, _identity_rule)
        on(p.down, _scale_input(0.5), pre=True)
    else:
        on(p.activations, _constant)
    if epsilon > 0:
        on(p.linears, _epsilon_rule(float(epsilon)))

    def keep(name: str) -> Any:
        def hook(_m: nn.Module, _i: tuple, out: Any) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(t, Tensor):
                raise MethodError(f"layer {name!r} does not return a tensor; choose another layer")
            store[name] = t

        return hook

    handles += [m.register_forward_hook(keep(n)) for n, m in (capture or {}).items()]
    if variant == "attnlrp":
        on(p.queries + p.keys, _scale_output(0.25))
        on(p.values, _scale_output(0.5))
    else:
        on(p.queries + p.keys, _constant)
    with hooks(*handles):
        yield store
    missed = tally.missed()
    if missed:  # a module the rules rely on was not called: the relevance would be silently wrong
        raise hf.incompatible(
            "AttnLRP", f"{len(missed)} rule hooks did not run in the forward pass, e.g. {', '.join(missed[:3])}"
        )


def _as_ids(target: Any) -> Tensor:
    """Target token ids as a flat LongTensor; ``InputError`` for non-integers and overflowing values."""
    return as_indices(target, InputError).reshape(-1)


def _targets(target: Any, n: int, logits: Tensor) -> Tensor:
    if target is None:
        return logits.detach().argmax(1)
    t = _as_ids(target).to(logits.device)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n or t.min() < 0 or t.max() >= logits.shape[1]:
        raise InputError(
            f"target must be one token id (or one per sequence) in [0, {logits.shape[1]}); got {target!r}. "
            "None explains the predicted next token"
        )
    return t


def lm_lrp(
    model: nn.Module,
    input_ids: Tensor,
    target: Any = None,
    *,
    layers: Sequence[str] | None = None,
    variant: str = "attnlrp",
    epsilon: float = 0.0,
    attention_mask: Tensor | None = None,
    reduce: str = "abs",
) -> LMRelevance:
    """Relevance for the logit of ``target`` (token id; None: the predicted one) at the last position.

    ``target="next"`` explains the sum over positions of the logits of the actual next tokens (teacher
    forcing; by linearity of the modified backward pass, the sum of the per-position relevances; padded
    positions of ``attention_mask`` are left out). Otherwise pad on the left, so that the last position is
    a real token.

    Token relevance is the relevance at the input embeddings summed over the hidden dimension, shape
    ``(n, seq_len)``. ``layers`` (module names) also returns the relevance reaching each module's output,
    reduced over positions and channels by ``reduce`` (``"abs"``: sum of ``|R|``; ``"sum"``: sum of ``R``).
    The model is not changed: hooks are removed and mode, ``requires_grad`` and weights restored on exit.
    """
    ids = hf.token_ids(input_ids, model)
    if reduce not in ("abs", "sum"):
        raise InputError(f"reduce must be 'abs' or 'sum', got {reduce!r}")
    capture = {name: find_module(model, name) for name in (layers or [])}
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"use_cache": False}
    next_tokens = isinstance(target, str) and target == "next"
    if isinstance(target, str) and not next_tokens:
        raise InputError(f"target must be a token id, ids, None or 'next', got {target!r}")
    if next_tokens and ids.shape[1] < 2:
        raise InputError("target='next' needs sequences of at least 2 tokens")
    if "logits_to_keep" in inspect.signature(model.forward).parameters and not next_tokens:
        kwargs["logits_to_keep"] = 1
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    with ExitStack() as stack:
        stack.enter_context(preserved(model, weights=False))
        stack.enter_context(autograd_on())
        model.eval()
        for q in model.parameters():
            q.requires_grad_(False)
        store = stack.enter_context(attached(model, variant, epsilon, capture))
        out = model(input_ids=ids.to(device), **kwargs)
        logits = getattr(out, "logits", None)
        if not isinstance(logits, Tensor) or logits.ndim != 3:
            raise _unsupported(model, "returned no (n, seq_len, vocab) logits")
        if next_tokens:  # teacher forcing: the logits of the actual next tokens, summed over positions
            t = ids[:, 1:].to(logits.device)
            picked = logits[:, :-1].gather(2, t.unsqueeze(2)).squeeze(2)
            if attention_mask is not None:  # padding is not a next token
                picked = picked * kwargs["attention_mask"][:, 1:].to(picked.dtype)
            chosen = picked.sum(1)
        else:
            t = _targets(target, len(ids), logits[:, -1, :])
            chosen = logits[:, -1, :].gather(1, t.unsqueeze(1)).squeeze(1)
        names = [n for n in capture if n in store and store[n].requires_grad]
        tensors = [store["embedding"], *(store[n] for n in names)]
        grads = torch.autograd.grad(chosen.sum(), tensors, allow_unused=True)
        emb = store["embedding"].detach()
        g0 = grads[0] if grads[0] is not None else torch.zeros_like(emb)
        tokens = (emb * g0).sum(-1).float()
        per_layer = {}
        for name, t_out, g in zip(names, tensors[1:], grads[1:]):
            if g is None:
                continue
            r = (t_out.detach() * g).flatten(1)
            per_layer[name] = (r.abs() if reduce == "abs" else r).sum(1).float()
        zeros = torch.zeros(len(ids), device=tokens.device)
        layer_rel = {n: per_layer.get(n, zeros).cpu() for n in capture}
    return LMRelevance(tokens.detach().cpu(), layer_rel, t.cpu(), chosen.detach().float().cpu())


def _batch_targets(target: Any, n: int) -> Any:
    """``fn(start, stop)``: the target of a batch (None and 'next' pass through; ids: one or one per sequence)."""
    if target is None or isinstance(target, str):
        if target not in (None, "next"):
            raise InputError(f"target must be a token id, ids, None or 'next', got {target!r}")
        return lambda _s, _e: target
    t = _as_ids(target)
    if t.numel() not in (1, n):
        raise InputError(f"target must be one token id or one per sequence ({n}), got {t.numel()} ids")
    return lambda s, e: t if t.numel() == 1 else t[s:e]


def layer_relevance(
    model: nn.Module,
    input_ids: Tensor,
    target: Any = None,
    layers: Sequence[str] | None = None,
    *,
    variant: str = "attnlrp",
    epsilon: float = 0.0,
    reduce: str = "abs",
    batch_size: int = 8,
) -> Importance:
    """Relevance reaching each named layer's output per sequence (unit ``layer``; ``layers`` default: all Linear)."""
    ids = hf.token_ids(input_ids, model)
    batch_size = whole(batch_size, "batch_size")
    if layers is None:
        layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = list(layers)
    if not layers:
        raise InputError("no layers to score; name them with layers=[...]")
    start = time.perf_counter()
    batch_target = _batch_targets(target, len(ids))
    rows, targets = [], []
    for s in range(0, len(ids), batch_size):
        t = batch_target(s, s + batch_size)
        res = lm_lrp(model, ids[s : s + batch_size], t, layers=layers, variant=variant, epsilon=epsilon, reduce=reduce)
        rows.append(torch.stack([res.layers[n] for n in layers], 1))
        targets.append(res.target)
    return Importance(
        values=torch.cat(rows),
        unit="layer",
        names=tuple(layers),
        per_sample=True,
        method="lrp_layer_relevance",
        params={"variant": variant, "epsilon": epsilon, "reduce": reduce},
        target="next" if isinstance(target, str) else torch.cat(targets).tolist(),
        seconds=time.perf_counter() - start,
    )


def token_relevance(
    model: nn.Module,
    input_ids: Tensor,
    target: Any = None,
    *,
    variant: str = "attnlrp",
    epsilon: float = 0.0,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
) -> Importance:
    """Relevance of every input token for the next-token logit of ``target``: unit ``token``, ``(n, seq_len)``."""
    ids = hf.token_ids(input_ids, model)
    batch_size = whole(batch_size, "batch_size")
    start = time.perf_counter()
    batch_target = _batch_targets(target, len(ids))
    rows, targets = [], []
    for s in range(0, len(ids), batch_size):
        t = batch_target(s, s + batch_size)
        mask = None if attention_mask is None else attention_mask[s : s + batch_size]
        res = lm_lrp(model, ids[s : s + batch_size], t, variant=variant, epsilon=epsilon, attention_mask=mask)
        rows.append(res.tokens)
        targets.append(res.target)
    return Importance(
        values=torch.cat(rows),
        unit="token",
        per_sample=True,
        method="lrp",
        params={"variant": variant, "epsilon": epsilon},
        target="next" if isinstance(target, str) else torch.cat(targets).tolist(),
        seconds=time.perf_counter() - start,
    )
