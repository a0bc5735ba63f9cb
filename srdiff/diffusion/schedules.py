"""Noise schedules and timesteps: the diffusers scheduler a config trains and samples with, and the
timesteps a partial re-denoising of ``strength`` runs (img2img, SDEdit, flaw repair, RePaint)."""

from srdiff._checks import check_int

SAMPLERS = ("ddim", "ddpm")


def make_scheduler(config, kind: str = "ddpm"):
    """The diffusers scheduler (DDPM for training and ancestral sampling, DDIM for fast sampling).

    ``config``: anything with ``num_train_timesteps``, ``beta_schedule``, ``prediction_type`` and ``vae``
    (a :class:`srdiff.TrainConfig`); predicted x0 is clipped to [-1, 1] in pixel space (``vae`` None)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {kind!r}")
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    return cls(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=config.vae is None,
    )


def fresh_scheduler(scheduler):
    """A copy of a diffusers ``scheduler`` (its timesteps are set per call; the caller's stays as it was)."""
    for name in ("add_noise", "set_timesteps", "step"):
        if not callable(getattr(scheduler, name, None)):
            raise TypeError(f"scheduler must be a diffusers scheduler with add_noise, set_timesteps and step, "
                            f"got {type(scheduler).__name__} (no {name})")
    return type(scheduler).from_config(scheduler.config)


def check_strength(strength) -> None:
    if not isinstance(strength, (int, float)) or isinstance(strength, bool):
        raise TypeError(f"strength must be a number in (0, 1], got {strength!r} ({type(strength).__name__})")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")


def run_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` denoising steps a re-denoising of ``strength`` runs: ``int(steps * strength)``, at least 1."""
    return max(1, min(steps, int(steps * strength)))


def strength_timesteps(scheduler, strength: float, steps: int):
    """The timesteps a re-denoising of ``strength`` runs, as diffusers' img2img pipelines pick them.

    ``scheduler.set_timesteps(steps)`` spaces ``steps`` timesteps over the schedule; the last
    ``int(steps * strength)`` of them (at least one) are run, so ``strength=1`` starts
    from the noisiest timestep and ``strength=0.5`` from the middle one. Sets the scheduler's timesteps
    (and its begin index, where it has one).
    """
    check_strength(strength)
    check_int("steps", steps, 1)
    scheduler.set_timesteps(steps)
    run = run_steps(steps, strength)
    start = (steps - run) * getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]
