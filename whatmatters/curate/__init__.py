"""curate: see DESIGN in README."""

from whatmatters.curate.examples import score
from whatmatters.curate.training import Checkpoint, ForgettingRecorder, TrainingRun, train_models

__all__ = ["Checkpoint", "ForgettingRecorder", "TrainingRun", "score", "train_models"]
