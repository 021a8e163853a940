"""Layer-wise relevance propagation: rules, composites, canonizers, layer relevance, and AttnLRP for LMs.

Private to ``explain`` (the leading underscore keeps these modules out of method discovery); users import
from :mod:`whatmatters.explain.lrp`, which also holds the ``lrp`` scorers.
"""

from whatmatters.explain._lrp.canonizers import merge_batchnorm
from whatmatters.explain._lrp.composites import COMPOSITES, Composite, get_composite, register_composite
from whatmatters.explain._lrp.core import attached, constant_softmax, lrp
from whatmatters.explain._lrp.layers import layer_relevance
from whatmatters.explain._lrp.lm import LMRelevance, lm_lrp, token_relevance
from whatmatters.explain._lrp.rules import RULES, Rule

__all__ = [
    "COMPOSITES",
    "RULES",
    "Composite",
    "LMRelevance",
    "Rule",
    "attached",
    "constant_softmax",
    "get_composite",
    "layer_relevance",
    "lm_lrp",
    "lrp",
    "merge_batchnorm",
    "register_composite",
    "token_relevance",
]
