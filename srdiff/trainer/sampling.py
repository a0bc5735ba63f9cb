"""Sampling with the (EMA) UNet through diffusers' DDIM/DDPM schedulers, and export as a diffusers pipeline.

No FAM is needed at inference: the modulation is a training-time device, and outside
``srdiff.fam_context`` the FAM processors are plain attention.
"""

import contextlib
import os
from pathlib import Path

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
    """``n`` images (n, C, H, W) in [0, 1] from ``unet``, ``steps`` scheduler steps each.

    DDIM runs with eta=0, so image ``i`` is a function of ``image_seed(seed, first_index + i)`` alone.
    ``vae``: decode latents through this AutoencoderKL (latent mode). The model's train/eval mode is
    restored afterwards.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = next(unet.parameters()).device
    unet_config = unet.config
    shape = (unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
    was_training = unet.training
    unet.eval()
    out = []
    try:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
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
                    pred = unet(scheduler.scale_model_input(x, t), t).sample
                kwargs = {"eta": 0.0} if sampler == "ddim" else {"generator": gen}
                x = scheduler.step(pred.float(), t, x, **kwargs).prev_sample
            out.append(decode(x, vae))
    finally:
        unet.train(was_training)
    if not out:
        return torch.empty((0, vae.config.out_channels if vae is not None else shape[0], 0, 0))
    return torch.cat(out)


def decode(x: torch.Tensor, vae: nn.Module | None) -> torch.Tensor:
    """Model space -> images in [0, 1]: pixels in [-1, 1], or latents through the VAE decoder."""
    if vae is not None:
        x = vae.decode(x / vae.config.scaling_factor).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def plain_unet(unet: nn.Module) -> nn.Module:
    """A fresh diffusers UNet with ``unet``'s config and weights and the default attention processors
    (the FAM processors are a training-time device)."""
    from diffusers import UNet2DModel

    clean = UNet2DModel.from_config(unet.config)
    clean.load_state_dict(unet.state_dict())
    return clean


def export_pipeline(unet: nn.Module, config, out_dir: str | os.PathLike, vae: nn.Module | None = None) -> Path:
    """Write ``unet`` as a diffusers pipeline with ``save_pretrained``: ``DDPMPipeline`` (pixels; load with
    ``DDPMPipeline.from_pretrained`` or ``DDIMPipeline.from_pretrained``) or ``LDMPipeline`` (latents,
    with the VAE)."""
    from diffusers import DDPMPipeline, LDMPipeline

    out_dir = Path(out_dir)
    clean = plain_unet(unet).cpu()
    if vae is None:
        pipe = DDPMPipeline(unet=clean, scheduler=make_scheduler(config, "ddpm"))
    else:
        pipe = LDMPipeline(vqvae=vae.cpu(), unet=clean, scheduler=make_scheduler(config, "ddim"))
    pipe.save_pretrained(out_dir)
    return out_dir


def load_ema_unet(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """(EMA UNet with plain attention, its TrainConfig, the VAE or None) from a trainer checkpoint."""
    from srdiff.trainer import checkpoint
    from srdiff.trainer.config import TrainConfig
    from srdiff.trainer.dataset import latent_shape, load_vae
    from srdiff.trainer.model import build_unet

    device = torch.device(device)
    state = checkpoint.load(path, map_location=device)
    config = TrainConfig.from_dict(state["config"], where=f"checkpoint {str(path)!r}")
    vae = load_vae(config.vae, device, config.channels) if config.vae is not None else None
    channels, size = latent_shape(vae, config.image_size) if vae is not None else (config.channels, config.image_size)
    unet = build_unet(config, channels, size)
    unet.load_state_dict(state["ema"]["model"])
    return unet.to(device).eval().requires_grad_(False), config, vae
