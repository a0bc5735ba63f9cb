"""Inpainting with a mask-conditioned denoiser (the Stable Diffusion inpainting recipe): the model reads
``in_channels = 2 C + 1`` channels, the noisy sample, the hole mask and the masked image (holes set to 0;
in latent mode the masked image's VAE latents and the mask resized to the latent grid), and is trained on
random thick holes (:mod:`srdiff.diffusion.masks`) with the loss over the whole image or the hole only
(``config.loss_region``).

Forward amplification touches the noised channels only: the loop noises ``Batch.x0`` alone and
:meth:`Inpainting.model_input` concatenates the mask and the masked image afterwards. The mFAM of a
refresh is the mean of the inpainted samples' FAMs over their holes (per pixel, weighted by how many
holes cover it): outside its hole a sample is the known image, and its map there says nothing about the
fill. RePaint, the other route (any unconditional model, no inpainting training), is
:meth:`srdiff.trainer.trained.TrainedModel.inpaint` (:mod:`srdiff.diffusion.repaint` at ``strength=1``).
"""

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from srdiff.diffusion.masks import check_masks, holes, random_masks
from srdiff.diffusion.sampling import sample_loop
from srdiff.diffusion.seeding import MASKS, key, per_image_choice
from srdiff.noise import amplified_noise_loss
from srdiff.trainer.backbones.base import Condition, DenoiserSpec
from srdiff.trainer.task import Batch, DenoisingTask, register_task


@register_task
class Inpainting(DenoisingTask):
    """``UNet2DModel`` (default) or ``UNet2DConditionModel`` with ``2 C + 1`` input channels; exports as
    folders (no diffusers pipeline runs a mask-conditioned model without a text encoder)."""

    name = "inpaint"

    def setup(self, data) -> None:
        super().setup(data)
        c = self.spec.out_channels
        self.spec = DenoiserSpec(**{**self.spec.to_dict(), "in_channels": 2 * c + 1})

    # ------------------------------------------------------------------ the conditioning channels
    def conditioning(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``mask`` and ``masked`` channels (model space) for ``images`` (B, C, H, W) in [0, 1] and
        ``masks`` (B, 1, H, W), 1 = hole."""
        images, masks = images.to(self.device), masks.to(self.device)
        masked = (images * 2 - 1) * (1 - masks)
        if self.vae is not None:
            with torch.no_grad():
                masked = self.vae.encode(masked).latent_dist.mode() * self.vae.config.scaling_factor
            masks = F.interpolate(masks, size=masked.shape[-2:], mode="nearest")
        return {"mask": masks, "masked": masked}

    def model_input(self, x_t: torch.Tensor, batch: Batch) -> torch.Tensor:
        extras = batch.extras
        return torch.cat([x_t, extras["mask"].to(x_t.dtype), extras["masked"].to(x_t.dtype)], dim=1)

    def filling(self, model, images: torch.Tensor, masks: torch.Tensor):
        """``predict(x, t, cond=None)``: the model's prediction for the noisy sample ``x`` at ``t``, given the
        known ``images`` (B, C, H, W) in [0, 1] and their binary holes ``masks`` (B, 1, H, W)."""
        extras = self.conditioning(images, masks)

        def predict(x, t, cond=None):
            return self.predict(model, x, t, Batch(x0=x, extras=extras))

        return predict

    # ------------------------------------------------------------------ training
    def batch(self, indices: torch.Tensor, *, step: int, micro: int) -> Batch:
        """Images ``indices`` with random holes of ``config.mask_kind`` keyed by (seed, step, micro)."""
        c = self.config
        masks = random_masks(len(indices), c.image_size, seed=key(MASKS, c.seed, step, micro), kind=c.mask_kind)
        return Batch(x0=self.data.train_data[indices].to(self.device),
                     extras=self.conditioning(self.data.train_images[indices], masks))

    def loss(self, pred, batch, t, alphas_cumprod, fam, lam, *, seed, **options):
        """The ε-loss over the whole image (``loss_region='image'``) or the mean over the hole pixels."""
        if self.config.loss_region == "image":
            return super().loss(pred, batch, t, alphas_cumprod, fam, lam, seed=seed, **options)
        per_pixel = amplified_noise_loss(pred, batch.x0, t, alphas_cumprod, fam, lam, seed=seed,
                                                reduction="none", **options)
        hole = batch.extras["mask"].to(per_pixel)
        return (per_pixel * hole).sum() / (hole.sum() * per_pixel.shape[1]).clamp_min(1.0)

    # ------------------------------------------------------------------ sampling
    def draw(self, indices: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, masks) to inpaint for sample ``indices``: a training image and a random hole each,
        image i's drawn from (seed, i) alone."""
        c = self.config
        picks = per_image_choice(len(self.data.train_images), indices, seed)
        masks = [random_masks(1, c.image_size, seed=key(MASKS, seed, int(i)), kind=c.mask_kind) for i in indices]
        return self.data.train_images[picks], torch.cat(masks)

    @torch.no_grad()
    def sample(self, model, n: int, *, seed: int, steps: int, sampler: str = "ddim", first_index: int = 0,
               guidance_scale: float | None = None, conditions: Condition | None = None, batch_size: int = 256,
               autocast_dtype: torch.dtype | None = None, progress: bool = False,
               images: torch.Tensor | None = None, masks: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` inpainted images (n, C, H, W) in [0, 1], the known pixels pasted back. ``images`` (n, C, H, W)
        in [0, 1] and ``masks`` (n or 1, 1, H, W), 1 = hole; default: :meth:`draw` (training images)."""
        if conditions is not None or (guidance_scale is not None and guidance_scale != 1.0):
            raise ValueError("task 'inpaint' has no condition to guide: pass images= and masks=, not conditions= "
                             "or guidance_scale=")
        if images is None:
            if self.data is None:
                raise ValueError("images= and masks= are needed to inpaint with a loaded model (no training data)")
            images, masks = self.draw(torch.arange(first_index, first_index + n), seed)
        elif masks is None:
            raise ValueError("masks= must come with images=")
        if len(images) != n:
            raise ValueError(f"images must hold n={n} images, got {len(images)}")
        masks = holes(check_masks(masks, images))
        out = []
        for start in range(0, n, batch_size):
            part_images, part_masks = images[start:start + batch_size], masks[start:start + batch_size]
            filled = sample_loop(
                self.filling(model, part_images, part_masks), self.sample_shape, self.config, len(part_images),
                steps=steps, sampler=sampler, seed=seed, first_index=first_index + start,
                batch_size=len(part_images), device=next(model.parameters()).device, vae=self.vae,
                autocast_dtype=autocast_dtype, progress=progress, model=model)
            hole = part_masks.to(filled)
            out.append(hole * filled + (1 - hole) * part_images.to(filled))
        return torch.cat(out) if out else images[:0].clone()

    def predictor(self, model, conditions, guidance_scale):
        """RePaint with this model (flaw repair): each batch's images are the known pixels and its masks the
        holes, where > 0.5 (:func:`srdiff.diffusion.masks.holes`: the model was trained on binary holes), read
        as the model's extra channels. The task has no condition to guide: ``conditions`` is None."""
        return lambda rows, images, masks: self.filling(model, images, holes(masks))

    def refresh_samples(self, model, n: int, *, seed: int, first_index: int, **sample_kwargs):
        """Inpainted training images and their holes (n, H, W) as the weights of the mFAM mean."""
        images, masks = self.draw(torch.arange(first_index, first_index + n), seed)
        filled = self.sample(model, n, seed=seed, first_index=first_index, images=images, masks=masks, **sample_kwargs)
        return filled, masks[:, 0]

    # ------------------------------------------------------------------ export
    def export(self, model, out_dir: str | os.PathLike) -> Path:
        """:meth:`export_folders` with the input channel order ([noisy sample, mask, masked image]) and the mask
        convention (1 = hole) in ``srdiff_task.json``: diffusers' ``StableDiffusionInpaintPipeline`` needs a
        text encoder, which this task has not. Load with ``UNet2DModel.from_pretrained(out_dir, subfolder="unet")``
        (or ``UNet2DConditionModel``)."""
        return self.export_folders(model, out_dir, input_channels=["noisy sample", "mask", "masked image"],
                                   mask="1 = hole (to fill), 0 = known",
                                   masked_image="image in [-1, 1] with the holes set to 0",
                                   loss_region=self.config.loss_region)
