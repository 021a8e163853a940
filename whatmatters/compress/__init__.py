"""compress: which parts of a model matter, and actions that make the model smaller.

``score(model, method, data=...)`` scores weights (``ModelImportance``: one ``Importance`` per layer) or
other model parts (heads, neurons, layers, experts, tokens, KV entries). Actions return a new model:
``prune`` zeroes the least important weights (unstructured, N:M); ``prune_structured`` removes heads,
neurons or layers of transformers, ``prune_channels`` conv / linear channels of plain PyTorch models
(traced with torch.fx) and ``prune_experts`` MoE experts; ``allocate_bits`` + ``quantize`` give a
fake-quantized mixed-precision copy; ``gptq`` real packed low-bit weights (``QuantLinear``,
``save_quantized`` / ``load_quantized``; with config and tokenizer in a folder: ``save_quantized_folder`` /
``load_quantized_folder``), ``rsq`` the same after folded Hadamard rotations (``rotate``) with
importance-weighted calibration tokens; ``sparsegpt`` second-order one-shot pruning; ``merge`` one model
from several fine-tunes (PCB, TIES, task arithmetic); ``unlearn`` forgets a text by updating only the
weights attributed to it (WAGLE); ``evicting_kv``
evicts KV-cache entries during ``generate``; ``prune_tokens`` / ``merge_tokens`` give a ViT whose forward
drops or merges patch tokens; ``pruning_tokens`` prunes an LM's prompt tokens during the prefill (FastV,
cascade, random) and ``compress_prompt`` drops its least surprising prompt tokens (LLMLingua-style).
``calibrate(model, data)`` computes activation / gradient statistics once for several scores. Every
module in this package is imported on first use of the registry.
"""

from whatmatters.compress.api import ModelImportance, score
from whatmatters.compress.batches import lm_windows
from whatmatters.compress.calibrate import Calibration, calibrate
from whatmatters.compress.channels import ChannelPruned, ChannelReport, channels_by_layer, prune_channels
from whatmatters.compress.checkpoint import load_quantized_folder, save_quantized_folder
from whatmatters.compress.experts import prune_experts
from whatmatters.compress.gptq import GPTQReport, gptq
from whatmatters.compress.kvcache import evict_scores, evicting_kv, kv_eviction
from whatmatters.compress.layer_scoring import layer_scores
from whatmatters.compress.merge import MergeReport, merge
from whatmatters.compress.packed import QuantLinear, load_quantized, save_quantized
from whatmatters.compress.prune import Pruned, PruneReport, measure, prune
from whatmatters.compress.quantize import Quantized, QuantizeReport, allocate_bits, average_bits, quantize
from whatmatters.compress.remove import StructuredPruned, StructuredReport, load_pruned, prune_structured
from whatmatters.compress.rotation import rotate
from whatmatters.compress.rsq import rsq
from whatmatters.compress.sparsegpt import sparsegpt
from whatmatters.compress.token_pruning import TokenReport, merge_tokens, prune_tokens
from whatmatters.compress.tokens_prefill import PrefillReport, pruning_tokens
from whatmatters.compress.tokens_prompt import CompressedPrompt, compress_prompt
from whatmatters.compress.unlearn import UnlearnReport, unlearn

__all__ = [
    "Calibration",
    "ChannelPruned",
    "ChannelReport",
    "CompressedPrompt",
    "GPTQReport",
    "MergeReport",
    "ModelImportance",
    "PrefillReport",
    "PruneReport",
    "Pruned",
    "QuantLinear",
    "QuantizeReport",
    "Quantized",
    "StructuredPruned",
    "StructuredReport",
    "TokenReport",
    "UnlearnReport",
    "allocate_bits",
    "average_bits",
    "calibrate",
    "channels_by_layer",
    "compress_prompt",
    "evict_scores",
    "evicting_kv",
    "gptq",
    "kv_eviction",
    "layer_scores",
    "lm_windows",
    "load_pruned",
    "load_quantized",
    "load_quantized_folder",
    "measure",
    "merge",
    "merge_tokens",
    "prune",
    "prune_channels",
    "prune_experts",
    "prune_structured",
    "prune_tokens",
    "pruning_tokens",
    "quantize",
    "rotate",
    "rsq",
    "save_quantized",
    "save_quantized_folder",
    "score",
    "sparsegpt",
    "unlearn",
]
