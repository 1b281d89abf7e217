"""Training as a library: typed config, the loop, sweeps, experiment logging."""

from jax_sae.training.config import TrainConfig
from jax_sae.training.trainer import ONE_LINE_ERRORS, FinishedRun, Trainer

__all__ = ["ONE_LINE_ERRORS", "FinishedRun", "TrainConfig", "Trainer"]
