"""A trained model back from its checkpoint: the EMA denoiser with plain attention, its config and task,
ready to sample, evaluate or export (``srdiff sample|eval|repair`` and Python users)."""

import os
from dataclasses import dataclass

import torch
from torch import nn

from srdiff._device import resolve_device
from srdiff._io import follow_umask
from srdiff.diffusion.masks import check_masks, holes
from srdiff.diffusion.repaint import repaint_images
from srdiff.diffusion.schedules import make_scheduler
from srdiff.trainer import checkpoint
from srdiff.trainer.backbones.base import DenoiserSpec
from srdiff.trainer.config import TrainConfig
from srdiff.trainer.dataset import latent_shape, load_vae
from srdiff.trainer.task import Batch, DenoisingTask
from srdiff.trainer.tasks import get_task


@dataclass
class TrainedModel:
    model: nn.Module  # the EMA denoiser, eval mode, no gradients
    config: TrainConfig
    task: DenoisingTask
    vae: nn.Module | None

    def sample(self, n: int, **kwargs) -> torch.Tensor:
        """``n`` images in [0, 1]; keywords as :meth:`srdiff.trainer.task.DenoisingTask.sample`."""
        return self.task.sample(self.model, n, **kwargs)

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor, *, steps: int, jump: int = 10, resample: int = 10,
                seed: int = 0, sampler: str = "ddim", batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Fill the holes of ``images`` (N, C, H, W) in [0, 1]; ``masks`` (N or 1, 1, H, W) or (N, H, W) in
        [0, 1], a hole where > 0.5 (:func:`srdiff.diffusion.masks.holes`). Returns (N, C, H, W) in [0, 1],
        equal to ``images`` outside the holes.

        An ``inpaint`` checkpoint fills them through its mask-conditioned sampler (``steps`` of ``sampler``);
        an unconditional one through RePaint at ``strength=1``
        (:func:`srdiff.diffusion.repaint.repaint_images`: DDPM steps, ``jump`` and ``resample`` as RePaint's
        jump length and resamplings; image i's noise keyed by (seed, 0, i), as in flaw repair).
        """
        masks = holes(check_masks(masks, images))
        task = self.task
        if task.name == "inpaint":
            return task.sample(self.model, len(images), seed=seed, steps=steps, sampler=sampler, images=images,
                               masks=masks, batch_size=batch_size, progress=progress)
        if task.condition is not None:
            raise ValueError(f"RePaint needs an unconditional model or an 'inpaint' one; this checkpoint is task "
                             f"{task.name!r}")
        device = next(self.model.parameters()).device

        def predict(x, t, rows):
            return task.predict(self.model, x, t, Batch(x0=x))

        return repaint_images(images.to(device).float(), masks.to(device), predict, make_scheduler(self.config, "ddpm"),
                              strength=1.0, steps=steps, seed=seed, resample=resample, jump=jump, vae=self.vae,
                              batch_size=batch_size, progress=progress, desc="RePaint")

    def export(self, out_dir: str | os.PathLike):
        """The task's diffusers pipeline (or folders) under ``out_dir``, its files following the umask."""
        return follow_umask(self.task.export(self.model, out_dir))


def load_trained(path: str | os.PathLike, device: torch.device | str = "cpu") -> TrainedModel:
    """The EMA model of a trainer checkpoint (``checkpoints/last.pt``) on ``device``."""
    device = resolve_device(device)
    state = checkpoint.load(path, map_location=device)
    config = TrainConfig.from_dict(state["config"], where=f"checkpoint {str(path)!r}")
    vae = load_vae(config.vae, device, config.channels) if config.vae is not None else None
    task = get_task(config, device)
    if "task" in state:
        task.load_state_dict(state["task"])
    else:  # written before the task seam: an unconditional UNet2DModel
        channels, size = latent_shape(vae, config.image_size) if vae is not None else (config.channels, config.image_size)
        task.spec = DenoiserSpec(in_channels=channels, out_channels=channels, sample_size=size)
    task.vae = vae
    model = task.build_denoiser()
    model.load_state_dict(state["ema"]["model"])
    return TrainedModel(model.to(device).eval().requires_grad_(False), config, task, vae)


def load_ema_unet(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """(EMA denoiser with plain attention, its TrainConfig, the VAE or None) from a trainer checkpoint;
    :func:`load_trained` also returns the task (conditions, export)."""
    trained = load_trained(path, device)
    return trained.model, trained.config, trained.vae
