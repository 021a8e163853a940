"""compress: which parts of a model matter, and actions that make the model smaller.

``score(model, method, data=...)`` scores weights (``ModelImportance``: one ``Importance`` per layer) or
other model parts; ``prune(model, importance, sparsity=..., pattern=...)`` zeroes the least important
weights of a copy; ``prune_structured(model, importance, amount)`` removes heads, neurons or layers
of a copy; ``allocate_bits(scores, budget)`` + ``quantize(model, bits)`` give a fake-quantized copy with
mixed precision; ``calibrate(model, data)`` computes activation / gradient statistics once for several
scores. Every module in this package is imported on first use of the registry.
"""

from whatmatters.compress.api import ModelImportance, score
from whatmatters.compress.calibrate import Calibration, calibrate, lm_windows
from whatmatters.compress.kvcache import evict_scores, kv_eviction
from whatmatters.compress.prune import Pruned, PruneReport, measure, prune
from whatmatters.compress.quantize import Quantized, QuantizeReport, allocate_bits, average_bits, layer_scores, quantize
from whatmatters.compress.remove import StructuredPruned, StructuredReport, load_pruned, prune_structured

__all__ = [
    "Calibration",
    "ModelImportance",
    "PruneReport",
    "Pruned",
    "QuantizeReport",
    "Quantized",
    "StructuredPruned",
    "StructuredReport",
    "allocate_bits",
    "average_bits",
    "calibrate",
    "evict_scores",
    "kv_eviction",
    "layer_scores",
    "lm_windows",
    "load_pruned",
    "measure",
    "prune",
    "prune_structured",
    "quantize",
    "score",
]
