"""Evaluation of any Importance: faithfulness, ground truth, agreement, benchmark table.

Metrics are registered by name (``metrics()`` lists them) and every module in this package is
imported on first use of the registry, so a new metric family is one new module with ``@metric``
functions.
"""

from whatmatters.evaluate.agreement import rank_agreement
from whatmatters.evaluate.benchmark import BenchmarkResult, benchmark, compare
from whatmatters.evaluate.faithfulness import (
    auc,
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
)
from whatmatters.evaluate.ground_truth import pointing_game, precision_at_k, relevance_mass
from whatmatters.evaluate.metrics import (
    MetricResult,
    describe_metric,
    get_metric,
    measure,
    metric,
    metrics,
)
from whatmatters.evaluate.rashomon import rashomon
from whatmatters.evaluate.rashomon_cloud import RashomonCloud
from whatmatters.evaluate.road import noisy_linear_imputation, road_curves, road_lerf, road_morf
from whatmatters.evaluate.robustness import cascade_layers, gradient_noise, max_sensitivity, randomization

__all__ = [
    "BenchmarkResult",
    "MetricResult",
    "RashomonCloud",
    "auc",
    "benchmark",
    "cascade_layers",
    "compare",
    "deletion_auc",
    "deletion_curve",
    "describe_metric",
    "get_metric",
    "gradient_noise",
    "insertion_auc",
    "insertion_curve",
    "max_sensitivity",
    "measure",
    "metric",
    "metrics",
    "noisy_linear_imputation",
    "pointing_game",
    "precision_at_k",
    "randomization",
    "rank_agreement",
    "rashomon",
    "relevance_mass",
    "road_curves",
    "road_lerf",
    "road_morf",
]
