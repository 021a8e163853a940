"""Deprecated: the text-model and corpus loaders moved to ``whatmatters.text.pretrained``."""

from whatmatters.core.moved import moved

moved("whatmatters.models", "whatmatters.text.pretrained")
