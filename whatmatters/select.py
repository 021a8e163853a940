"""Deprecated: feature selection moved to ``whatmatters.explain.select``."""

from whatmatters.core.moved import moved

moved("whatmatters.select", "whatmatters.explain.select")
