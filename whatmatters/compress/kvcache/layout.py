"""Where a decoder LM's attention modules are and how to recompute their queries and causal attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from whatmatters.core.errors import ModelError

if TYPE_CHECKING:
    pass


# --------------------------------------------------------------------------------------------- model
@dataclass
class AttentionLayout:
    """Where the attention modules are and how to recompute their queries."""

    kind: str  # "rope" (Llama, Qwen2, Mistral, Qwen3, ...) or "gpt2"
    modules: list[nn.Module]
    n_heads: int
    n_kv_heads: int
    head_dim: int


def attention_layout(model: nn.Module) -> AttentionLayout:
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError("evicting_kv needs a Hugging Face transformers model (it has no .config)")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"evicting_kv supports decoder-only LMs; {type(model).__name__} is an encoder-decoder")
    get_text = getattr(config, "get_text_config", None)
    config = get_text() if callable(get_text) else config  # a VLM (LLaVA): its language model's config
    base = getattr(model, "model", None)
    if base is not None and hasattr(base, "language_model"):
        base = base.language_model
    layers = getattr(base, "layers", None)
    if layers is not None and all(hasattr(getattr(lay, "self_attn", None), "q_proj") for lay in layers):
        attn = [lay.self_attn for lay in layers]
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        return AttentionLayout("rope", attn, n_heads, n_kv, attn[0].head_dim)
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is not None and all(hasattr(getattr(b, "attn", None), "c_attn") for b in blocks):
        attn = [b.attn for b in blocks]
        return AttentionLayout("gpt2", attn, attn[0].num_heads, attn[0].num_heads, attn[0].head_dim)
    raise ModelError(
        f"evicting_kv does not support {type(model).__name__}: it needs a decoder-only transformers LM whose "
        "layers are model.model.layers[i].self_attn with q_proj (Llama, Qwen2, Qwen3, Mistral, ...) or "
        "model.transformer.h[i].attn with c_attn (GPT-2)"
    )


def rotated_queries(
    arch: AttentionLayout, module: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    """The queries the module used, ``(batch, n_heads, q_len, head_dim)``, rotated as the model rotates them."""
    b, q_len, _ = hidden.shape
    if arch.kind == "gpt2":
        q = module.c_attn(hidden)[..., : module.embed_dim]
        return q.view(b, q_len, -1, arch.head_dim).transpose(1, 2)
    q = module.q_proj(hidden).view(b, q_len, -1, arch.head_dim)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    q = q.transpose(1, 2)
    position_embeddings = kwargs.get("position_embeddings")
    if position_embeddings is None:
        raise ModelError(
            f"{type(module).__name__} got no position_embeddings; evicting_kv needs the RoPE cos/sin the model "
            "passes to its attention layers (transformers >= 4.48)"
        )
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = q.shape[-1] // 2
    rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return q * cos + rotated * sin


def causal_attention(q: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal softmax attention of the last ``q_len`` positions over ``keys``: ``(b, n_kv, group, q_len, k_len)``.

    The queries are the last ``q_len`` positions of the cache; the KV heads are never repeated (GQA).
    """
    b, n_heads, q_len, d = q.shape
    n_kv, k_len = keys.shape[1], keys.shape[2]
    qg = q.reshape(b, n_kv, n_heads // n_kv, q_len, d).float()
    logits = torch.matmul(qg, keys.float().unsqueeze(2).transpose(-1, -2)) * scaling
    q_pos = torch.arange(k_len - q_len, k_len, device=q.device)
    future = torch.arange(k_len, device=q.device)[None, :] > q_pos[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


# ------------------------------------------------------------------------------------------ policies
