"""The sampling loop: any denoiser through diffusers' DDIM/DDPM schedulers, seeded per image.

No FAM is needed at inference: the modulation is a training-time device, and outside
``srdiff.fam_context`` the FAM processors are plain attention.
"""

import contextlib

import torch
from torch import nn

SAMPLERS = ("ddim", "ddpm")


def make_scheduler(config, kind: str = "ddpm"):
    """The diffusers scheduler (DDPM for training and ancestral sampling, DDIM for fast sampling)."""
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


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s starting noise: sampling does not depend on how images are batched
    or spread over ranks."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


def initial_noise(shape, seed: int, first_index: int, device) -> torch.Tensor:
    """(n, C, H, W) standard normals, row i drawn from its own generator (``image_seed(seed, first_index + i)``)."""
    rows = [
        torch.randn(shape[1:], generator=torch.Generator().manual_seed(image_seed(seed, first_index + i)))
        for i in range(shape[0])
    ]
    return torch.stack(rows).to(device)


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
    ``conditions``, a :class:`~srdiff.trainer.backbones.Condition` with one row per image, or None).

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


def sample(
    unet: nn.Module,
    config,
    n: int,
    *,
    steps: int = 50,
    sampler: str = "ddim",
    seed: int = 0,
    first_index: int = 0,
    batch_size: int = 256,
    vae: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``n`` images (n, C, H, W) in [0, 1] from an unconditional diffusers ``UNet2DModel`` (see
    :func:`sample_loop`; conditional models sample through their task: ``load_trained(...).sample``)."""
    shape = (unet.config.out_channels, unet.config.sample_size, unet.config.sample_size)
    return sample_loop(lambda x, t, cond: unet(x, t).sample, shape, config, n, steps=steps, sampler=sampler,
                       seed=seed, first_index=first_index, batch_size=batch_size,
                       device=next(unet.parameters()).device, vae=vae, autocast_dtype=autocast_dtype,
                       progress=progress, model=unet)


def decode(x: torch.Tensor, vae: nn.Module | None) -> torch.Tensor:
    """Model space -> images in [0, 1]: pixels in [-1, 1], or latents through the VAE decoder."""
    if vae is not None:
        x = vae.decode(x / vae.config.scaling_factor).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
