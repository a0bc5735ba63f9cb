"""Unconditional generation: plain DDPM on the images (or their latents); the base class does it all."""

from srdiff.trainer.task import DenoisingTask, register_task


@register_task
class Unconditional(DenoisingTask):
    """``UNet2DModel`` (default) on images or VAE latents; exports as ``DDPMPipeline`` / ``LDMPipeline``."""

    name = "unconditional"
