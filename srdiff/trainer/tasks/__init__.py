"""The built-in tasks; importing this package registers them in :data:`srdiff.trainer.task.TASKS`."""

from srdiff.trainer.tasks import class_conditional, inpaint, text, unconditional

__all__ = ["class_conditional", "inpaint", "text", "unconditional"]
