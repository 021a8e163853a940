"""curate: see DESIGN in README."""

from whatmatters.curate.examples import score
from whatmatters.curate.selection import Selection, describe_strategy, select, strategies
from whatmatters.curate.training import Checkpoint, ForgettingRecorder, TrainingRun, train_models

__all__ = [
    "Checkpoint",
    "ForgettingRecorder",
    "Selection",
    "TrainingRun",
    "describe_strategy",
    "score",
    "select",
    "strategies",
    "train_models",
]
