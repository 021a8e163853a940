"""Prefill token pruning for decoder-only LMs (FastV, SpAtten-style cascade, random): later layers see fewer tokens.

``with pruning_tokens(lm, keep=0.5, at_layers=2): lm(ids)`` (or ``lm.generate(...)``) installs hooks on the
user's model for the duration of the block. At the prefill (a forward pass on an empty cache), the first
``K`` decoder layers run on every prompt token; the attention of layer ``K - 1`` scores the tokens (attention
each one receives, averaged over query heads and over the queries that see it: FastV's "average attention
received"), and layers ``K`` to the end run on the ``keep`` share of tokens with the highest scores. ``K = 2``
is FastV's "after layer 2". The first and the last real token of every row are always kept: the last one
carries the next-token prediction, the first one is the attention sink that later layers park their attention
on (dropping it changes every later attention distribution; StreamingLLM). The forward really carries fewer
tokens: the hidden states are gathered, and so are the RoPE ``cos`` / ``sin`` and the 4-D attention mask, so
each kept token keeps its original position (never renumbered) and padding stays masked.

``method``:

* ``"fastv"``: prune at each layer of ``at_layers`` by that layer's attention (one layer: FastV);
* ``"cascade"``: SpAtten-style progressive pruning at several layers by *cumulative* importance: the scores of
  every scoring layer so far are summed and travel with the kept tokens. Simplified: SpAtten accumulates
  over every layer (in hardware); here attention is rebuilt only at the layers before a pruning step, which
  keeps the scoring cost at one extra ``q k^T`` per step;
* ``"random"``: the same budgets, uniformly random tokens (the baseline; no attention is computed);
* ``"cls"`` (VLMs): the image tokens ranked by the vision tower's CLS attention (FasterVLM, "[CLS] token tells
  everything"; :mod:`whatmatters.compress.tokens_vlm`), so ``at_layers=0`` prunes before the language model.

Several layers keep ``keep ** (1 / steps)`` of the tokens at each step, so ``keep`` of the prompt reaches the
last layer. The returned logits have one row per kept token (``report.kept_positions`` maps them back); the
last row is the next-token prediction. The KV cache of a pruned layer holds only its kept tokens, so the
decoding after the prefill is cheaper too: later forward calls on that cache get masks that line up with
it. Padded batches: every row keeps ``round(keep x its real tokens)``; rows with fewer real tokens keep
padding positions (still masked) so that the batch stays rectangular.

Attention is rebuilt from the queries and keys of the attention module's input (the plumbing of
:mod:`whatmatters.compress.kvcache.layout`), so it works with sdpa and grouped-query attention. After every
prefill the hooks check that they ran and that the pruned layers received the pruned number of tokens.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from whatmatters.compress.kvcache.layout import AttentionLayout, attention_layout, rotated_queries
from whatmatters.compress.tokens import _check_sliding, received_attention
from whatmatters.compress.tokens_vlm import ClsScores, cls_site
from whatmatters.core import hf
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.fractions import kept_share, whole
from whatmatters.core.state import hooks, preserved

FEATURE = "pruning_tokens"
METHODS = ("fastv", "cascade", "random", "cls")
TOKENS = ("auto", "image", "all")


@dataclass
class PrefillReport:
    """What :func:`pruning_tokens` does, and the token counts of the latest prefill."""

    method: str
    keep: float
    layers: list[int]  # pruning steps: layer K is the first layer that runs on fewer tokens
    n_layers: int
    tokens: str = "all"  # "image": only a VLM's image tokens are pruned (text tokens always carried)
    prefills: int = 0
    last_forward: list[tuple[int, int]] = field(default_factory=list)  # (decoder layer, tokens in)
    kept_positions: torch.Tensor | None = None  # (batch, kept) original positions that reached the last layer

    @property
    def kept_share(self) -> float:
        """Tokens into the last layer / tokens into the first one, in the latest prefill (nan before one)."""
        if not self.last_forward:
            return math.nan
        return self.last_forward[-1][1] / self.last_forward[0][1]

    @property
    def layer_tokens(self) -> float:
        """Share of the unpruned model's (layer x token) work done in the latest prefill (nan before one)."""
        if not self.last_forward:
            return math.nan
        return sum(t for _, t in self.last_forward) / (self.last_forward[0][1] * len(self.last_forward))


@dataclass
class _Prefill:
    """The bookkeeping of one pruned prefill; later calls on its cache use ``kept`` to line up their masks."""

    cache: Any  # weakref to the cache, or None (a forward without one)
    length: int
    valid: torch.Tensor  # (b, L) bool, False for padding
    kept: torch.Tensor  # (b, k) original positions of the tokens now carried
    protected: torch.Tensor | None = None  # (b, L) bool: tokens never pruned (a VLM's text tokens)
    scores: torch.Tensor | None = None  # (b, k) importance of the carried tokens (cumulative for cascade)
    gathered: dict[str, Any] = field(default_factory=dict)  # mask / position_embeddings / position_ids
    by_layer: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept positions it cached
    scored: set[int] = field(default_factory=set)
    generator: torch.Generator | None = None


def _decoder_layers(model: nn.Module, arch: AttentionLayout) -> list[nn.Module]:
    base = getattr(model, "model", None)
    base = getattr(base, "language_model", base)
    layers = list(getattr(base, "layers", None) or [])
    if arch.kind != "rope" or len(layers) != len(arch.modules):
        raise ModelError(
            f"pruning_tokens does not support {type(model).__name__}: it needs a decoder-only transformers LM with "
            "rotary positions whose layers are model.model.layers[i].self_attn (Llama, Qwen2, Qwen3, Mistral, ...)"
        )
    return layers


def _layout(model: nn.Module) -> tuple[AttentionLayout, list[nn.Module]]:
    try:
        arch = attention_layout(model)
    except ModelError as e:
        raise ModelError(str(e).replace("evicting_kv", FEATURE)) from e
    _check_sliding(model)
    return arch, _decoder_layers(model, arch)


def _steps(n: int, at_layers: int | Sequence[int] | None, method: str) -> list[int]:
    if at_layers is None:
        at_layers = sorted({max(1, n // 15), max(1, n // 3), max(1, 2 * n // 3)}) if method == "cascade" else 2
    layers = [at_layers] if isinstance(at_layers, int) and not isinstance(at_layers, bool) else at_layers
    if not isinstance(layers, Sequence) or not layers or not all(isinstance(i, int) for i in layers):
        raise InputError(f"at_layers must be a layer index or a sequence of them (ints), got {at_layers!r}")
    first = 0 if method == "cls" else 1  # the vision tower's scores exist before the first layer
    bad = [i for i in layers if isinstance(i, bool) or not first <= i < n]
    if bad:
        raise InputError(
            f"at_layers {list(layers)!r} out of range: layer K is the first layer that runs on fewer tokens, "
            f"so K must be in {first}..{n - 1} for this model's {n} decoder layers (K=2: FastV's 'after layer 2')"
        )
    if list(layers) != sorted(set(layers)):
        raise InputError(f"at_layers must be increasing without repeats, got {list(layers)!r}")
    if method == "cascade" and len(layers) < 2:
        raise InputError(f"method='cascade' prunes at several layers; got at_layers={list(layers)!r}")
    return list(layers)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` indexed along ``dim`` by the per-row positions ``idx`` ``(b, k)`` (a batch of 1 is broadcast)."""
    b = idx.shape[0]
    x = x.expand(b, *x.shape[1:])
    shape = [b] + [1] * (x.ndim - 1)
    shape[dim] = idx.shape[1]
    index = idx.reshape(shape).expand(*[s if d != dim else idx.shape[1] for d, s in enumerate(x.shape)])
    return x.gather(dim, index)


def select(scores: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Indices ``(b, k)`` (sorted) of each row's ``budget`` best real tokens, ``k = budget.max()``.

    The first and last real token of every row rank first; rows with a smaller budget fill up with padding
    positions (they stay masked), and only where a row has too little padding with its next-best tokens.
    """
    n = scores.shape[1]
    pos = torch.arange(n, device=scores.device)
    first = torch.where(valid, pos, n).amin(1, keepdim=True)
    last = torch.where(valid, pos, -1).amax(1, keepdim=True)
    s = scores.float().masked_fill(~valid, -math.inf)
    s = s.masked_fill((pos == first) | (pos == last), math.inf)
    rank = s.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    chosen = rank < budget[:, None]
    priority = chosen * 2.0 + (~valid) * 1.0 - rank / (2.0 * n)  # chosen > padding > the rest, by score
    k = int(budget.max())
    return priority.topk(k, dim=1).indices.sort(dim=1).values


class _Pruner:
    """The hooks of one ``pruning_tokens`` block and the state of the current prefill."""

    def __init__(
        self, arch: AttentionLayout, layers: list[nn.Module], report: PrefillReport, seed: int, image_id: int | None
    ) -> None:
        self.arch, self.layers, self.report, self.seed, self.image_id = arch, layers, report, seed, image_id
        self.steps = report.layers
        self.state: _Prefill | None = None
        self.prefill = False
        self.mask2d: torch.Tensor | None = None
        self.text: torch.Tensor | None = None  # (b, L) bool: the prompt's non-image tokens (tokens="image")
        self.cls: ClsScores | None = None  # method="cls": the vision tower's hook

    # ----------------------------------------------------------------------------------- model hooks
    def model_pre(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        cache = hf.find_cache(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim != 2:
            raise InputError(
                f"{FEATURE} needs a 2-D attention_mask (batch, seq_len) of 1s and 0s, got shape {tuple(mask.shape)}"
            )
        self.prefill = cache is None or cache.get_seq_length() == 0
        if self.prefill:
            if isinstance(ids, torch.Tensor):
                hf.token_ids(ids, _module)
            if ref is None:
                raise InputError(f"{FEATURE} needs input_ids or inputs_embeds")
            if isinstance(mask, torch.Tensor) and mask.shape != ref.shape[:2]:
                raise InputError(
                    f"attention_mask of shape {tuple(mask.shape)} does not match the prompt {tuple(ref.shape[:2])}"
                )
            self.mask2d = mask
            self.text = self._text_tokens(ids)
            if self.cls is not None:
                self.cls.scores = None
            self.state = None
            self.report.last_forward = []
            return
        if self.state is None or self.state.cache is None or self.state.cache() is not cache:
            raise InputError(
                f"{FEATURE} prunes the prompt at the prefill: this forward continues a cache that was not filled "
                "inside the block. Run the prompt (or model.generate) inside `with pruning_tokens(...)`"
            )

    def model_post(self, _module: nn.Module, _args: tuple, _kwargs: dict[str, Any], _output: Any) -> None:
        if not self.prefill:
            return
        st, counts = self.state, dict(self.report.last_forward)
        if st is None or len(counts) != len(self.layers):
            raise hf.incompatible(FEATURE, f"the hooks saw {len(counts)} of {len(self.layers)} decoder layers")
        if self.report.method in ("fastv", "cascade") and st.scored != {k - 1 for k in self.steps}:
            missed = sorted({k - 1 for k in self.steps} - st.scored)
            raise hf.incompatible(FEATURE, f"the attention hooks of layers {missed} did not run")
        carried = st.kept.shape[1]
        if counts[len(self.layers) - 1] != carried:
            raise hf.incompatible(FEATURE, f"the last layer got {counts[len(self.layers) - 1]} tokens, not {carried}")
        self.report.kept_positions = st.kept
        self.report.prefills += 1

    def _text_tokens(self, ids: Any) -> torch.Tensor | None:
        if self.report.tokens != "image":
            return None
        if not isinstance(ids, torch.Tensor):
            raise InputError(f"{FEATURE}(tokens='image') finds the image tokens in input_ids: pass input_ids")
        image = ids == self.image_id
        if not bool(image.any(1).all()):
            raise InputError(
                f"{FEATURE}(tokens='image'): a prompt has no image token (id {self.image_id}); give each prompt its "
                "image placeholder (the processor inserts it) and pixel_values, or prune every token: tokens='all'"
            )
        return ~image

    # ------------------------------------------------------------------------------- layer hooks
    def score_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], _output: Any) -> None:
            st = self.state
            if not self.prefill or st is None:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            q = rotated_queries(self.arch, module, hidden, kwargs)
            k = rotated_queries(self.arch, _Keys(module), hidden, kwargs)  # the keys, rotated the same way
            valid = st.valid.gather(1, st.kept)
            total = received_attention(q, k, float(module.scaling), valid)
            seen_by = valid.flip(-1).cumsum(-1).flip(-1) * valid
            mean = total / (seen_by.clamp_min(1) * q.shape[1])
            cumulative = self.report.method == "cascade" and st.scores is not None
            st.scores = st.scores + mean if cumulative else mean
            st.scored.add(index)

        return hook

    def layer_pre(self, index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.prefill:
                if self.state is None:
                    self._start(hidden, kwargs)
                if index in self.steps:
                    hidden = self._prune(hidden, kwargs, self.steps.index(index))
                self.report.last_forward.append((index, hidden.shape[1]))
                if index >= self.steps[0]:
                    self.state.by_layer[index] = self.state.kept
                    kwargs = {**kwargs, **self.state.gathered}
            elif index >= self.steps[0]:
                kwargs = self._decode_kwargs(index, kwargs)
            else:
                return None
            args = (hidden, *args[1:]) if args else args
            if not args:
                kwargs = {**kwargs, "hidden_states": hidden}
            return args, kwargs

        return hook

    # ---------------------------------------------------------------------------------- the work
    def _start(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        b, n = hidden.shape[:2]
        mask = self.mask2d
        valid = mask.to(hidden.device).bool() if mask is not None else torch.ones(b, n, dtype=torch.bool)
        valid = valid.to(hidden.device)
        if not bool(valid.any(1).all()):
            raise InputError(f"{FEATURE}: a row of the attention_mask has no real token (all zeros); remove it")
        cache = hf.find_cache(kwargs)
        kept = torch.arange(n, device=hidden.device).expand(b, n)
        gen = torch.Generator(device=hidden.device).manual_seed(self.seed)
        protected = None if self.text is None else self.text.to(hidden.device) & valid
        if protected is not None and protected.shape != valid.shape:
            raise hf.incompatible(FEATURE, f"the decoder got {n} tokens for prompts of {protected.shape[1]}")
        ref = weakref.ref(cache) if cache is not None else None
        self.state = _Prefill(ref, n, valid, kept, protected=protected, generator=gen)

    def _prune(self, hidden: torch.Tensor, kwargs: dict[str, Any], step: int) -> torch.Tensor:
        st = self.state
        valid = st.valid.gather(1, st.kept)
        if self.report.method == "random":
            st.scores = torch.rand(valid.shape, generator=st.generator, device=valid.device)
        elif self.cls is not None:
            st.scores = self.cls.for_tokens(~self.text.to(valid.device)).gather(1, st.kept)
        elif self.steps[step] - 1 not in st.scored:
            raise hf.incompatible(FEATURE, f"the attention hooks of layers [{self.steps[step] - 1}] did not run")
        share = self.report.keep ** ((step + 1) / len(self.steps))
        scores, n_real, fixed = st.scores, st.valid.sum(1), 0
        if st.protected is not None:  # text tokens always carried; the budget is a share of the image tokens
            scores = scores.masked_fill(st.protected.gather(1, st.kept), math.inf)
            fixed = st.protected.sum(1)
            n_real = n_real - fixed
        budget = torch.minimum((fixed + n_real * share).round().long().clamp_min(2), valid.sum(1))
        local = select(scores, valid, budget)
        st.kept = st.kept.gather(1, local)
        st.scores = st.scores.gather(1, local)
        st.gathered = self._gathered(kwargs)
        return _gather_rows(hidden, local, 1)

    def _gathered(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The layer arguments of the full prompt, indexed at the kept positions."""
        kept, out = self.state.kept, {}
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            out["attention_mask"] = _gather_rows(_gather_rows(mask, kept, 2), kept, 3)
        elif mask is not None:
            raise ModelError(f"{FEATURE} cannot index an attention mask of type {type(mask).__name__}; use sdpa/eager")
        emb = kwargs.get("position_embeddings")
        if emb is None:
            raise hf.incompatible(FEATURE, "the decoder layers got no position_embeddings (RoPE cos / sin)")
        out["position_embeddings"] = tuple(_gather_rows(t, kept, 1) for t in emb)
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.ndim == 2:
            out["position_ids"] = _gather_rows(pos, kept, 1)
        return out

    def _decode_kwargs(self, index: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A later call on a pruned cache: mask columns of the prompt at this layer's kept positions."""
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor):
            return kwargs  # no mask: every cached key is visible, which is what the pruned cache needs
        st = self.state
        kept = st.by_layer[index]
        new = torch.arange(st.length, mask.shape[-1], device=mask.device).expand(kept.shape[0], -1)
        return {**kwargs, "attention_mask": _gather_rows(mask, torch.cat([kept, new], 1), 3)}


class _Keys:
    """The attention module seen through its key projection (and key norm), for ``rotated_queries``."""

    def __init__(self, module: nn.Module) -> None:
        self.q_proj = module.k_proj
        if hasattr(module, "k_norm"):
            self.q_norm = module.k_norm


def _pruned_tokens(model: nn.Module, tokens: str) -> tuple[str, int | None]:
    if tokens not in TOKENS:
        raise MethodError(f"tokens must be one of {', '.join(TOKENS)}, got {tokens!r}")
    config = getattr(model, "config", None)
    image_id = getattr(config, "image_token_id", None)
    image_id = getattr(config, "image_token_index", None) if image_id is None else image_id
    if tokens == "auto":
        tokens = "all" if image_id is None else "image"
    if tokens == "image" and not isinstance(image_id, int):
        raise ModelError(
            f"{FEATURE}(tokens='image') needs a VLM whose config has image_token_id (LLaVA); "
            f"{type(model).__name__} has none: use tokens='all'"
        )
    return tokens, image_id


@contextmanager
def pruning_tokens(
    model: nn.Module,
    keep: float = 0.5,
    *,
    method: str = "fastv",
    at_layers: int | Sequence[int] | None = None,
    tokens: str = "auto",
    seed: int = 0,
) -> Iterator[PrefillReport]:
    """Prune the prompt's tokens during the prefill while the block runs ``model(...)`` or ``model.generate``.

    Args:
        model: a decoder-only transformers LM with rotary positions (Llama, Qwen2, Qwen3, Mistral; grouped-query
            attention supported). Its weights are never changed; the hooks are removed on exit, even on error.
        keep: share of the prompt's (real) tokens that reach the last layer, in ``(0, 1]``; the first and last
            token of every row are always kept, so at least 2.
        method: ``"fastv"`` (attention received at the layer before each step), ``"cascade"`` (SpAtten-style:
            cumulative attention over the steps), ``"random"`` (equal budget) or, for a LLaVA-style VLM with a
            CLIP-style tower, ``"cls"`` (the vision CLS token's attention to each patch; ``at_layers=0`` drops
            image tokens before the language model, as FasterVLM).
        at_layers: ``K`` or increasing ``[K1, K2, ...]``: the first layer that runs on fewer tokens, in
            ``1 .. n_layers - 1`` (``0 ..`` for ``"cls"``; default 2, FastV's; cascade: about ``n/15, n/3, 2n/3``).
        tokens: which prompt tokens may be pruned: ``"image"`` (a LLaVA-style VLM's image tokens, found in
            ``input_ids`` by the config's ``image_token_id``; every text token is carried and ``keep`` is the
            share of image tokens kept, FastV's setting), ``"all"``, or ``"auto"`` (default: ``"image"`` for a
            model whose config has an image token id, else ``"all"``).
        seed: seed of ``random`` (re-seeded at every prefill).

    Yields:
        a :class:`PrefillReport`: ``last_forward`` (tokens per layer), ``kept_positions``, ``kept_share``.
    """
    if method not in METHODS:
        raise MethodError(f"unknown prefill pruning method {method!r}; choose one of {', '.join(METHODS)}")
    keep = kept_share(keep, "keep", of="prompt tokens")
    seed = whole(seed, "seed", minimum=0)
    arch, layers = _layout(model)
    steps = _steps(len(layers), at_layers, method)
    tokens, image_id = _pruned_tokens(model, tokens)
    report = PrefillReport(method, keep, steps, len(layers), tokens=tokens)
    pruner = _Pruner(arch, layers, report, seed, image_id)
    if method == "cls":
        if image_id is None:
            raise ModelError(f"method='cls' ranks a VLM's image tokens; {type(model).__name__} has no image token")
        if tokens != "image":
            raise MethodError("method='cls' ranks a VLM's image tokens: it needs tokens='image' (or 'auto')")
        pruner.cls = ClsScores(cls_site(model))
    handles = [model.register_forward_pre_hook(pruner.model_pre, with_kwargs=True)]
    handles += [lay.register_forward_pre_hook(pruner.layer_pre(i), with_kwargs=True) for i, lay in enumerate(layers)]
    if pruner.cls is not None:
        handles.append(pruner.cls.site.attention.register_forward_hook(pruner.cls, with_kwargs=True))
    elif method != "random":
        handles += [
            arch.modules[k - 1].register_forward_hook(pruner.score_hook(k - 1), with_kwargs=True) for k in steps
        ]
    handles.append(model.register_forward_hook(pruner.model_post, with_kwargs=True))
    with preserved(model), hooks(*handles):
        yield report


__all__ = ["METHODS", "PrefillReport", "pruning_tokens", "select"]
