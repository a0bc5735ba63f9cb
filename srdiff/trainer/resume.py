"""A resumed run's config, and how far it may differ from the run it continues.

``srdiff train --resume`` starts from the run's stored ``config.json`` (its checkpoint's config where that
file is gone), not from the defaults: ``--config FILE`` values and flags override it, each change printed,
so a run is resumed without retyping its flags. The trainer then refuses changes that alter the trajectory
(:data:`srdiff.trainer.trainer.RESUMABLE_CHANGES` lists those it accepts) and checks the schedule
(:func:`check_schedule`).

``steps`` may grow; the base phase keeps its length, so the added steps refine, and ``ratio`` is rewritten
as ``"<base steps>:<refinement steps>"`` to say so (``--steps 3000`` on a 2000-step ``1:1`` run: ratio
``"1000:2000"``). A run without a refinement phase (ratio ``"N:0"``) stays all base. While a run has not
reached its phase switch, an explicit ``--ratio`` may move the switch to any step still ahead of it. Steps
never shrink, and a cosine learning-rate schedule, which decays over ``steps``, cannot grow: the learning
rate would jump back up mid-run.
"""

import os
from pathlib import Path

from srdiff.run_dir import CHECKPOINT
from srdiff.trainer import checkpoint
from srdiff.trainer.config import TrainConfig

CONFIG_FILE = "config.json"
# What the schedule rule (check_schedule) decides instead of an equality test.
SCHEDULE_FIELDS = ("steps", "ratio")


def stored_config(out_dir: str | os.PathLike) -> TrainConfig | None:
    """The config of the run in ``out_dir`` (``config.json``, else its checkpoint's), or None where
    ``out_dir`` holds no run (no ``checkpoints/last.pt``: nothing to resume)."""
    out = Path(out_dir)
    if not (out / CHECKPOINT).is_file():
        return None
    if (out / CONFIG_FILE).is_file():
        return TrainConfig.from_file(out / CONFIG_FILE)
    return TrainConfig.from_dict(checkpoint.load(out / CHECKPOINT)["config"], where=str(out / CHECKPOINT))


def resumed_config(stored: TrainConfig, overrides: dict) -> tuple[TrainConfig, list[str]]:
    """``stored`` with ``overrides`` (field -> value: a config file's and the flags given) applied, and one
    ``"field: old -> new"`` line per field that changed. Growing ``steps`` without a ``ratio`` keeps the
    base phase (see the module docstring)."""
    changes = dict(overrides)
    if changes.get("steps", stored.steps) > stored.steps and "ratio" not in changes and stored.base_steps < stored.steps:
        changes["ratio"] = f"{stored.base_steps}:{changes['steps'] - stored.base_steps}"
    config = stored.replace(**changes)
    old, new = stored.to_dict(), config.to_dict()
    return config, [f"{key}: {old[key]!r} -> {new[key]!r}" for key in new if new[key] != old[key]]


def check_schedule(saved: TrainConfig, config: TrainConfig, step: int, what: str) -> None:
    """Raise ``ValueError`` (``"cannot <what>: ..."``) unless ``config``'s ``steps`` and ``ratio`` may continue
    ``saved``'s run, now at ``step``: steps grow or stay, not under a cosine schedule, and the phase switch
    moves only while both the old and the new one are still ahead."""
    if (config.steps, config.base_steps) == (saved.steps, saved.base_steps):
        return
    if config.steps < saved.steps:
        raise ValueError(f"cannot {what}: steps may grow but not shrink ({saved.steps} -> {config.steps})")
    if config.steps != saved.steps and config.lr_schedule == "cosine":
        raise ValueError(f"cannot {what}: lr_schedule 'cosine' decays over steps ({saved.steps}); growing them to "
                         f"{config.steps} would raise the learning rate mid-run: start a new run instead")
    if config.base_steps != saved.base_steps and step >= min(config.base_steps, saved.base_steps):
        raise ValueError(f"cannot {what}: the base phase would end at step {config.base_steps} instead of "
                         f"{saved.base_steps} (ratio {saved.ratio!r} -> {config.ratio!r}), but the run is at step "
                         f"{step}; growing steps keeps the base phase: ratio '{saved.base_steps}:"
                         f"{config.steps - saved.base_steps}' (what --resume sets when --ratio is left out)")
