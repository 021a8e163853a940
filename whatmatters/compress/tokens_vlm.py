"""CLS attention of a VLM's vision tower as the importance of its image tokens ("[CLS] token tells everything").

FasterVLM (Zhang et al., 2024) ranks a LLaVA model's image tokens by the attention the vision encoder's CLS
token pays to each patch in the layer whose output becomes the image features, and drops the lowest before
the language model sees them. :func:`cls_site` finds that attention module in a ``LlavaForConditionalGeneration``
with a CLIP-style tower; :class:`ClsScores` is a forward hook on it that keeps ``(images, features)`` scores,
in the order in which LLaVA scatters the features onto the image tokens of ``input_ids``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import ModelError

FEATURE = "pruning_tokens(method='cls')"


@dataclass
class ClsSite:
    attention: nn.Module  # the vision encoder layer's self-attention whose layer output is the image feature
    with_cls: bool  # the features keep the CLS token (vision_feature_select_strategy="full")


def cls_site(model: nn.Module) -> ClsSite:
    """The vision attention whose CLS row scores the image features of ``model`` (a LLaVA-style VLM)."""
    config = getattr(model, "config", None)
    tower = getattr(getattr(model, "model", model), "vision_tower", None)
    body = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps it in older transformers releases
    layers = getattr(getattr(body, "encoder", None), "layers", None)
    layer = getattr(config, "vision_feature_layer", None)
    strategy = getattr(config, "vision_feature_select_strategy", None)
    if layers is None or not all(hasattr(getattr(lay, "self_attn", None), "k_proj") for lay in layers):
        raise ModelError(
            f"{FEATURE} needs a LLaVA-style VLM with a CLIP-style vision tower "
            "(model.model.vision_tower.encoder.layers[i].self_attn); use method='fastv'"
        )
    if not isinstance(layer, int) or strategy not in ("default", "full"):
        raise ModelError(
            f"{FEATURE} supports one vision_feature_layer (an int) and strategy 'default' or 'full'; this model "
            f"has {layer!r} / {strategy!r}: use method='fastv'"
        )
    index = layer % (len(layers) + 1) - 1  # hidden_states[0] is the embedding, [i + 1] layer i's output
    if index < 0:
        raise ModelError(f"{FEATURE}: the image features are the patch embeddings (no attention); use 'fastv'")
    return ClsSite(layers[index].self_attn, strategy == "full")


class ClsScores:
    """Forward hook on the CLS site: ``scores`` ``(images, features)`` of the latest vision forward."""

    def __init__(self, site: ClsSite) -> None:
        self.site, self.scores = site, None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], _output: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        b, t, _ = hidden.shape
        heads = module.num_heads
        q = module.q_proj(hidden[:, :1]).view(b, 1, heads, -1).transpose(1, 2)
        k = module.k_proj(hidden).view(b, t, heads, -1).transpose(1, 2)
        scale = getattr(module, "scale", 1 / math.sqrt(q.shape[-1]))
        attention = (q.float() @ k.float().transpose(-1, -2) * scale).softmax(-1).mean(1)[:, 0]  # (b, t)
        patches = attention[:, 1:]
        if self.site.with_cls:  # the CLS feature is an image token too; it is kept
            patches = torch.cat([torch.full_like(attention[:, :1], math.inf), patches], 1)
        self.scores = patches.detach()

    def for_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """``(b, L)`` scores of the prompt's positions: the features' scores at the image tokens, 0 elsewhere."""
        if self.scores is None:
            raise ModelError(f"{FEATURE}: the vision tower did not run in this forward; pass pixel_values")
        flat = self.scores.reshape(-1).to(image.device)
        if int(image.sum()) != flat.numel():
            raise ModelError(
                f"{FEATURE}: {int(image.sum())} image tokens in input_ids but {flat.numel()} image features; "
                "this VLM lays its features out differently (e.g. several crops per image): use method='fastv'"
            )
        out = torch.zeros(image.shape, dtype=flat.dtype, device=image.device)
        out[image] = flat
        return out
