"""Deprecated: LRP moved to ``whatmatters.explain.lrp`` (public API) and ``whatmatters.explain._lrp`` (rules)."""

from whatmatters.core.moved import moved

moved("whatmatters.lrp", "whatmatters.explain._lrp", ("canonizers", "composites", "core", "layers", "lm", "rules"))
