"""The sampling loop: any denoiser through diffusers' DDIM/DDPM schedulers, seeded per image, with
classifier-free guidance for conditional models.

No FAM is needed at inference: the modulation is a training-time device, and outside
``srdiff.fam_context`` the FAM processors are plain attention.
"""

import contextlib

import torch
from torch import nn

from srdiff.diffusion.schedules import make_scheduler
from srdiff.diffusion.seeding import image_seed, initial_noise


def guide(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``ε_u + s (ε_c - ε_u)``; s = 1 is the conditional
    prediction alone."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


@torch.no_grad()
def sample_loop(
    predict,
    shape: tuple[int, int, int],
    config,
    n: int,
    *,
    conditions=None,
    steps: int = 50,
    sampler: str = "ddim",
    seed: int = 0,
    first_index: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    vae: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """``n`` images (n, C, H, W) in [0, 1]: ``steps`` scheduler steps of ``predict(x, t, cond)`` (the
    model's output for the scaled sample ``x`` at timestep ``t``; ``cond``: those images' rows of
    ``conditions``, anything with ``select(rows)``, e.g. the trainer's
    :class:`~srdiff.trainer.backbones.base.Condition` with one row per image, or None).

    ``shape``: (C, H, W) of one sample in model space. DDIM runs with eta=0, so image ``i`` is a function
    of ``image_seed(seed, first_index + i)`` (and its condition) alone. ``vae``: decode latents through
    this AutoencoderKL. ``model``: put in eval mode meanwhile, its train/eval mode restored afterwards.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    out = []
    try:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            cond = conditions.select(slice(start, start + count)) if conditions is not None else None
            scheduler = make_scheduler(config, sampler)
            scheduler.set_timesteps(steps)
            x = initial_noise((count, *shape), seed, first_index + start, device) * scheduler.init_noise_sigma
            gen = torch.Generator(device=device).manual_seed(image_seed(seed, first_index + start))
            timesteps = scheduler.timesteps
            if progress:
                from tqdm.auto import tqdm

                timesteps = tqdm(timesteps, desc=f"sampling {start + count}/{n}", leave=False)
            for t in timesteps:
                with _autocast(device, autocast_dtype):
                    pred = predict(scheduler.scale_model_input(x, t), t, cond)
                kwargs = {"eta": 0.0} if sampler == "ddim" else {"generator": gen}
                x = scheduler.step(pred.float(), t, x, **kwargs).prev_sample
            out.append(decode(x, vae))
    finally:
        if model is not None:
            model.train(was_training)
    if not out:
        return torch.empty((0, vae.config.out_channels if vae is not None else shape[0], 0, 0))
    return torch.cat(out)


def encode(images: torch.Tensor, vae: nn.Module | None) -> torch.Tensor:
    """Images in [0, 1] -> model space: pixels in [-1, 1], or the VAE's latents (``latent_dist.mode()``,
    or a ``VQModel``'s ``latents``) times its ``scaling_factor``, in float32."""
    x = images * 2 - 1
    if vae is None:
        return x
    encoded = vae.encode(x.to(next(vae.parameters()).dtype))
    latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
    return latents.float() * vae.config.scaling_factor


def decode(x: torch.Tensor, vae: nn.Module | None) -> torch.Tensor:
    """Model space -> images in [0, 1]: pixels in [-1, 1], or latents through the VAE decoder (in its dtype)."""
    if vae is not None:
        x = vae.decode((x / vae.config.scaling_factor).to(next(vae.parameters()).dtype)).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
