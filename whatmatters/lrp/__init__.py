"""Layer-wise relevance propagation: rules, composites, canonizers, layer relevance, and AttnLRP for LMs.

Kept outside ``whatmatters.explain`` so these modules are not discovered as method modules; the
``lrp`` scorers live in ``whatmatters/explain/lrp.py``.
"""

from whatmatters.lrp.canonizers import merge_batchnorm
from whatmatters.lrp.composites import COMPOSITES, Composite, get_composite, register_composite
from whatmatters.lrp.core import attached, constant_softmax, lrp
from whatmatters.lrp.layers import layer_relevance
from whatmatters.lrp.lm import LMRelevance, lm_lrp, token_relevance
from whatmatters.lrp.rules import RULES, Rule

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
