"""Tiny text models whose important token is known: only token ``KEY`` moves the target."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput

KEY, TARGET, VOCAB = 7, 3, 20


class _KeyCounter(nn.Module):
    """Embeddings whose first dimension is 1 for ``KEY`` and 0 for every other token."""

    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        with torch.no_grad():
            self.emb.weight.zero_()
            self.emb.weight[:, 1:] = torch.randn(vocab, 3, generator=torch.Generator().manual_seed(0))
            self.emb.weight[KEY, 0] = 1.0

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def _key_mass(self, input_ids, attention_mask, inputs_embeds) -> torch.Tensor:
        e = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        mask = torch.ones(e.shape[:2], device=e.device) if attention_mask is None else attention_mask
        return e[..., 0] * mask


class KeyClassifier(_KeyCounter):
    """Two classes; class 1's logit grows by 3 for each ``KEY`` token."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None):
        z = self._key_mass(input_ids, attention_mask, inputs_embeds).sum(1)
        return SequenceClassifierOutput(logits=torch.stack([torch.zeros_like(z), 3 * z - 1], 1))


class KeyLM(_KeyCounter):
    """A causal LM over ``VOCAB`` tokens: the next token is ``TARGET`` more likely once a ``KEY`` came before."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None):
        z = self._key_mass(input_ids, attention_mask, inputs_embeds).cumsum(1)
        logits = torch.zeros(*z.shape, self.emb.num_embeddings, device=z.device)
        logits[..., TARGET] = 4 * z - 1
        return CausalLMOutput(logits=logits)


def key_rows(n: int = 6, length: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows without ``KEY``/``TARGET`` except one ``KEY`` per row, and the key's positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (n, length), generator=gen)
    where = torch.randint(0, length, (n,), generator=gen)
    ids[torch.arange(n), where] = KEY
    return ids, where
