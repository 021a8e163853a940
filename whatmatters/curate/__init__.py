"""curate: see DESIGN in README."""

from whatmatters.curate.augment import TabEBM, augment
from whatmatters.curate.dsir import DSIRResult, dsir, dsir_weights, gumbel_topk, read_weights
from whatmatters.curate.examples import score
from whatmatters.curate.graph import exact_knn, lsh_knn
from whatmatters.curate.mixture import DomainSampler, domain_sampler, domain_weights, doremi
from whatmatters.curate.selection import Selection, describe_strategy, select, strategies
from whatmatters.curate.training import Checkpoint, ForgettingRecorder, TrainingRun, train_models
from whatmatters.curate.weights import sample_weights, weighted_sampler

__all__ = [
    "Checkpoint",
    "DSIRResult",
    "DomainSampler",
    "ForgettingRecorder",
    "Selection",
    "TabEBM",
    "TrainingRun",
    "augment",
    "describe_strategy",
    "domain_sampler",
    "domain_weights",
    "doremi",
    "dsir",
    "dsir_weights",
    "exact_knn",
    "gumbel_topk",
    "lsh_knn",
    "read_weights",
    "sample_weights",
    "score",
    "select",
    "strategies",
    "train_models",
    "weighted_sampler",
]
