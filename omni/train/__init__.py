"""Training: the accelerate loop and its checkpoints."""

from omni.train.loop import TrainingError, TrainResult, train

__all__ = ["TrainResult", "TrainingError", "train"]
