"""A text classifier from a sentence encoder: mean pooling and a linear head (e.g. MiniLM + a head).

:class:`PooledClassifier` is an ``nn.Module`` with the Hugging Face classifier interface token attribution
reads (``input_ids`` / ``attention_mask`` in, ``.logits`` out, ``get_input_embeddings()``, ``config``).
:func:`fit_head` fits the head in closed form (ridge regression on one-hot labels) from labelled texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import InputError
from whatmatters.text.pretrained import embed, mean_pool


class PooledClassifier(nn.Module):
    """``head(normalize(mean_pool(encoder(ids))))``: logits ``(n, n_classes)`` of a sentence encoder's embedding.

    ``input_ids`` or ``inputs_embeds`` in (other keyword arguments, e.g. ``output_attentions``, go to the
    encoder), a ``SequenceClassifierOutput`` out (``.logits``, and the encoder's ``.attentions`` when asked).
    ``config`` is the encoder's with ``num_labels`` / ``id2label`` set.
    """

    main_input_name = "input_ids"

    def __init__(self, encoder: nn.Module, n_classes: int = 2, *, labels: Sequence[str] | None = None) -> None:
        super().__init__()
        self.labels = list(labels) if labels is not None else [str(i) for i in range(n_classes)]
        if len(self.labels) != n_classes:
            raise InputError(f"labels has {len(self.labels)} names for {n_classes} classes; give one per class")
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), n_classes)
        self.config = encoder.config.__class__.from_dict(
            {**encoder.config.to_dict(), "num_labels": n_classes, "id2label": dict(enumerate(self.labels))}
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def pooled(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, Any]:
        """The normalised mean-pooled embedding ``(n, hidden)`` and the encoder's output."""
        ref = input_ids if input_ids is not None else kwargs["inputs_embeds"][..., 0]
        mask = torch.ones(ref.shape, dtype=torch.long, device=ref.device) if attention_mask is None else attention_mask
        out = self.encoder(input_ids=input_ids, attention_mask=mask, **kwargs)
        return nn.functional.normalize(mean_pool(out.last_hidden_state, mask), dim=-1), out

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        pooled, out = self.pooled(input_ids, attention_mask, **kwargs)
        return SequenceClassifierOutput(logits=self.head(pooled), attentions=getattr(out, "attentions", None))


def fit_head(
    model: PooledClassifier, tokenizer: Any, texts: Sequence[str], labels: Sequence[int], *, ridge: float = 1e-2
) -> PooledClassifier:
    """Set the head to the ridge-regression fit of one-hot ``labels`` on the texts' embeddings; returns ``model``."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if len(texts) != len(y) or len(y) == 0:
        raise InputError(f"fit_head needs one label per text, got {len(texts)} texts and {len(y)} labels")
    x = embed(model.encoder, tokenizer, list(texts)).float()
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    onehot = nn.functional.one_hot(y, model.head.out_features).float() * 2 - 1
    gram = x.T @ x + ridge * torch.eye(x.shape[1])
    w = torch.linalg.solve(gram, x.T @ onehot)  # (d + 1, classes)
    with torch.no_grad():
        model.head.weight.copy_(w[:-1].T)
        model.head.bias.copy_(w[-1])
    return model
