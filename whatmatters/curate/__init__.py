"""curate: see DESIGN in README."""

# DSIR: select the documents of a raw pool that resemble a target corpus (whatmatters.curate.dsir)
from whatmatters.curate.dsir import DSIRResult, dsir, dsir_weights, gumbel_topk, read_weights

__all__ = ["DSIRResult", "dsir", "dsir_weights", "gumbel_topk", "read_weights"]
