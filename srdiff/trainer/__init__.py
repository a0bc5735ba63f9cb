"""Self-refining diffusion training: :class:`SelfRefiningTrainer` driven by a :class:`TrainConfig`, plus
sampling/export, metrics, DDP plumbing, the ablation and the ``srdiff train|sample|eval|ablate|demo``
commands. See ``docs/trainer.md``."""

from srdiff.trainer.config import TrainConfig
from srdiff.trainer.trainer import NonFiniteLossError, SelfRefiningTrainer

__all__ = ["NonFiniteLossError", "SelfRefiningTrainer", "TrainConfig"]
