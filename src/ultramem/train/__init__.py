"""Training: config, trainer, optimizer groups, sparse value updates, checkpoints, distributed."""

from ultramem.train.checkpoint import load_model
from ultramem.train.config import TrainConfig

__all__ = ["TrainConfig", "load_model"]
