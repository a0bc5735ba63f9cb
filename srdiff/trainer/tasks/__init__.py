"""The built-in tasks (importing this package registers them in :data:`srdiff.trainer.task.TASKS`) and
the task factory the loop and the loaders use."""

import torch

from srdiff.trainer.task import TASKS, DenoisingTask
from srdiff.trainer.tasks import class_conditional, inpaint, text, unconditional

__all__ = ["class_conditional", "get_task", "inpaint", "task_names", "text", "unconditional"]


def task_names() -> tuple[str, ...]:
    """The registered tasks' names."""
    return tuple(sorted(TASKS))


def get_task(config, device: torch.device | str = "cpu") -> DenoisingTask:
    """The task ``config.task`` names, for ``config`` on ``device``."""
    if config.task not in TASKS:
        raise ValueError(f"task must be one of {task_names()}, got {config.task!r}")
    return TASKS[config.task](config, torch.device(device))
