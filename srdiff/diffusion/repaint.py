"""RePaint (Lugmayr et al. 2022): inpainting with any unconditional epsilon-prediction pixel model, no
inpainting training. Each reverse step denoises the unknown region and replaces the known one by the
original image noised to the same level; ``resamplings`` times per ``jump_length`` steps it jumps back up
the chain (re-noising) so the fill harmonises with the known pixels. The authors' self-refining route:
250 steps, jump length 10, 10 resamplings, DDPM (eta = 1). diffusers' ``RePaintScheduler`` does the
step arithmetic; this module runs it over batches, seeded per image as :mod:`srdiff.trainer.sampling`."""

import torch

from srdiff.trainer.sampling import image_seed, initial_noise
from srdiff.trainer.task import Batch


def make_repaint_scheduler(config, steps: int, jump_length: int, resamplings: int):
    from diffusers import RePaintScheduler

    for name, value in (("steps", steps), ("jump_length", jump_length), ("resamplings", resamplings)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if config.prediction_type != "epsilon":
        raise ValueError(f"RePaint needs an epsilon-prediction model; this one predicts {config.prediction_type!r}")
    if config.vae is not None:
        raise ValueError("RePaint pastes known pixels at every step, so it needs a pixel-space model; this one "
                         f"is a latent model (vae {config.vae!r}): train task 'inpaint' instead")
    scheduler = RePaintScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                                 eta=1.0, clip_sample=True)
    scheduler.set_timesteps(steps, jump_length=jump_length, jump_n_sample=resamplings)
    return scheduler


@torch.no_grad()
def repaint(predict, images: torch.Tensor, masks: torch.Tensor, config, *, steps: int = 250, jump_length: int = 10,
            resamplings: int = 10, seed: int = 0, first_index: int = 0, batch_size: int = 64,
            progress: bool = False) -> torch.Tensor:
    """Inpaint ``images`` (N, C, H, W) in [0, 1] where ``masks`` (N, 1, H, W) is 1; returns (N, C, H, W)
    in [0, 1] equal to ``images`` outside the holes. ``predict(x, t)``: the model's ε for ``x`` at ``t``.
    The starting noise of image i is ``image_seed(seed, first_index + i)``'s (as in sampling); the noise of
    the steps and jumps is drawn per batch, so a result depends on ``seed`` and ``batch_size``."""
    device = images.device
    out = []
    for start in range(0, len(images), batch_size):
        known = images[start:start + batch_size] * 2 - 1
        keep = 1.0 - masks[start:start + batch_size].to(known)
        scheduler = make_repaint_scheduler(config, steps, jump_length, resamplings)
        gen = torch.Generator(device=device).manual_seed(image_seed(seed, first_index + start))
        x = initial_noise(tuple(known.shape), seed, first_index + start, device)
        timesteps = scheduler.timesteps
        if progress:
            from tqdm.auto import tqdm

            timesteps = tqdm(timesteps, desc=f"RePaint {start + len(known)}/{len(images)}", leave=False)
        t_last = int(scheduler.timesteps[0]) + 1
        for t in timesteps:
            t = int(t)
            if t < t_last:
                x = scheduler.step(predict(x, torch.tensor(t, device=device)).float(), t, x, known, keep,
                                   generator=gen).prev_sample
            else:
                x = scheduler.undo_step(x, t_last, generator=gen)
            t_last = t
        out.append(keep * known + (1 - keep) * x)
    return ((torch.cat(out) + 1) / 2).clamp(0, 1) if out else images.clone()


def inpaint(trained, images: torch.Tensor, masks: torch.Tensor, *, steps: int, jump_length: int = 10,
            resamplings: int = 10, seed: int = 0, sampler: str = "ddim", batch_size: int = 64,
            progress: bool = False) -> torch.Tensor:
    """Fill ``masks``' holes (1 = hole) of ``images`` (N, C, H, W) in [0, 1] with a trained model
    (:func:`srdiff.trainer.trained.load_trained`): an ``inpaint`` checkpoint through its mask-conditioned
    sampler (``steps`` of ``sampler``), an unconditional one through :func:`repaint`."""
    from srdiff.trainer.masks import check_masks

    masks = check_masks(masks, images)
    task = trained.task
    if task.name == "inpaint":
        return task.sample(trained.model, len(images), seed=seed, steps=steps, sampler=sampler, images=images,
                           masks=masks, batch_size=batch_size, progress=progress)
    if task.condition is not None:
        raise ValueError(f"RePaint needs an unconditional model or an 'inpaint' one; this checkpoint is task "
                         f"{task.name!r}")
    model = trained.model

    def predict(x, t):
        return task.predict(model, x, t, Batch(x0=x))

    return repaint(predict, images.to(next(model.parameters()).device), masks, trained.config, steps=steps,
                   jump_length=jump_length, resamplings=resamplings, seed=seed, batch_size=batch_size,
                   progress=progress)
