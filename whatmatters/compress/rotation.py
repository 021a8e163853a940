"""Rotations folded into a Llama-style model's weights (QuaRot, Ashkboos et al. 2024): same function, fewer outliers.

:func:`rotate` returns a copy of a causal LM whose residual stream is multiplied by a random orthogonal
matrix ``Q`` (a random Hadamard matrix ``H diag(±1) / √d`` where one of order ``d`` is built here, else a
random orthogonal matrix): the RMSNorm scales are folded into the linear layers that read them (norm weights
set to 1; RMSNorm without a scale commutes with ``Q``), the embedding and the residual writers (``o_proj``,
``down_proj``) get ``Qᵀ`` on their outputs, the readers (``q/k/v``, ``gate/up``, ``lm_head``) ``Q`` on their
inputs; each attention head's values and the matching ``o_proj`` columns get a per-head Hadamard rotation.
Rotated weights have flatter distributions, so round-to-nearest and GPTQ lose less. The ``down_proj`` input
(which QuaRot rotates online, at run time) is left as is: every rotation here is folded, the forward is the
stock one. A tied ``lm_head`` is untied (it now differs from the embedding).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from whatmatters.core.errors import ModelError


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % k for k in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q_ij = χ(j - i)`` with χ the quadratic character modulo the prime ``q``."""
    squares = torch.zeros(q, dtype=torch.float64)
    squares[(torch.arange(1, q) ** 2) % q] = 1
    chi = 2 * squares - 1
    chi[0] = 0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of ``order`` by Paley's constructions I (``q + 1``) or II (``2(q + 1)``), or None."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return s + torch.eye(order, dtype=torch.float64)
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A ``±1`` Hadamard matrix of order ``n`` (``H Hᵀ = n I``, float64) as ``Paley ⊗ Sylvester``, or None."""
    for base in range(1, n + 1):
        if n % base or (n // base) & (n // base - 1):
            continue  # n / base must be a power of two
        h = torch.ones(1, 1, dtype=torch.float64) if base == 1 else _paley(base)
        if h is None and base == 2:
            h = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        if h is None:
            continue
        two = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        for _ in range((n // base).bit_length() - 1):
            h = torch.kron(h, two)
        return h
    return None


def random_orthogonal(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """A random Hadamard matrix ``H diag(±1) / √n`` (float64), or a Haar-random orthogonal one where no
    Hadamard matrix of order ``n`` is built here; and which one it is."""
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
        return h * signs / math.sqrt(n), "hadamard"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)), "orthogonal"


def _llama_parts(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    needed = ("embed_tokens", "norm")
    if layers is None or not all(hasattr(inner, n) for n in needed) or getattr(model, "lm_head", None) is None:
        raise ModelError(
            f"rotate needs a Llama-style causal LM (model.model.embed_tokens / layers / norm and lm_head: "
            f"Llama, Mistral, Qwen2, SmolLM2), got {type(model).__name__}; quantize it without rotation"
        )
    for block in layers:
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        parts = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
        if not (all(hasattr(attn, p) for p in parts[0]) and all(hasattr(mlp, p) for p in parts[1])):
            raise ModelError(f"block {type(block).__name__} lacks Llama's q/k/v/o and gate/up/down projections")
    return inner, list(layers)


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    scale = norm.weight.detach().float()
    for layer in readers:
        layer.weight.data = (layer.weight.float() * scale).to(layer.weight.dtype)
    norm.weight.data.fill_(1.0)


def _right(layer: nn.Module, q: torch.Tensor) -> None:  # inputs rotated: W <- W Q
    layer.weight.data = (layer.weight.float() @ q).to(layer.weight.dtype)


def _left(layer: nn.Linear, q: torch.Tensor) -> None:  # outputs rotated: W <- Qᵀ W, b <- Qᵀ b
    layer.weight.data = (q.T @ layer.weight.float()).to(layer.weight.dtype)
    if layer.bias is not None:
        layer.bias.data = (q.T @ layer.bias.float()).to(layer.bias.dtype)


def _rotate_values(attn: nn.Module, head: torch.Tensor, head_dim: int) -> None:
    """Each value head's outputs and the ``o_proj`` columns that read them by the same ``head`` rotation."""
    v, o = attn.v_proj, attn.o_proj
    w = v.weight.float().reshape(-1, head_dim, v.weight.shape[1])
    v.weight.data = (head.T @ w).reshape(v.weight.shape).to(v.weight.dtype)
    if v.bias is not None:
        v.bias.data = (v.bias.float().reshape(-1, head_dim) @ head).reshape(-1).to(v.bias.dtype)
    w = o.weight.float().reshape(o.weight.shape[0], -1, head_dim)
    o.weight.data = (w @ head).reshape(o.weight.shape).to(o.weight.dtype)


def rotate(model: nn.Module, *, seed: int = 0) -> tuple[nn.Module, dict[str, str]]:
    """A copy of a Llama-style causal LM with the rotations of the module docstring folded in (``model`` is
    untouched); its logits equal the original's up to float rounding. Returns the copy and which kind of
    matrix rotated the residual stream and the heads (``"hadamard"`` or ``"orthogonal"``)."""
    _llama_parts(model)
    new = copy.deepcopy(model)
    inner, blocks = _llama_parts(new)
    g = torch.Generator().manual_seed(seed)
    hidden = inner.embed_tokens.weight.shape[1]
    q, kind = random_orthogonal(hidden, g)
    q = q.to(inner.embed_tokens.weight.device, torch.float32)  # float32: logits within ~1e-5 relative
    head_dim = blocks[0].self_attn.o_proj.weight.shape[1] // new.config.num_attention_heads
    head, head_kind = random_orthogonal(head_dim, g)
    head = head.to(q.device, torch.float32)
    if new.lm_head.weight is inner.embed_tokens.weight:
        new.lm_head.weight = nn.Parameter(inner.embed_tokens.weight.detach().clone())
        new.config.tie_word_embeddings = False
    with torch.no_grad():
        emb = inner.embed_tokens.weight
        emb.data = (emb.float() @ q).to(emb.dtype)
        for block in blocks:
            attn, mlp = block.self_attn, block.mlp
            _fold_norm(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
            _fold_norm(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
            for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _right(reader, q)
            _left(attn.o_proj, q)
            _left(mlp.down_proj, q)
            _rotate_values(attn, head, head_dim)
        _fold_norm(inner.norm, [new.lm_head])
        _right(new.lm_head, q)
    return new, {"residual": kind, "heads": head_kind}
