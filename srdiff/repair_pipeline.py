"""A diffusers-shaped front for flaw repair: a pipeline's UNet, scheduler and VAE plus a highlighter."""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FlawRepairOutput:
    """What :class:`FlawRepairPipeline` returns: ``images`` (B, C, H, W) repaired, in [0, 1];
    ``originals`` the images before repair; ``masks`` (B, 1, H, W) in [0, 1]; ``report`` as
    :func:`srdiff.repair_flaws` gives it."""

    images: torch.Tensor
    originals: torch.Tensor
    masks: torch.Tensor
    report: dict


class FlawRepairPipeline:
    """Generate with a diffusers pipeline, find flaws with a :class:`srdiff.FlawHighlighter`, repair them.

    Args:
        pipeline: a ``DDPMPipeline``, ``DDIMPipeline`` or ``LDMPipeline`` (its ``unet``, ``scheduler``
            and ``vqvae``/``vae`` are used; the trainer's exported ``pipeline/`` folders load as these),
            or any object with ``unet`` and ``scheduler`` attributes whose UNet needs no further inputs.
        highlighter: for the pipeline's image channels.

    Example::

        >>> pipe = FlawRepairPipeline(DDIMPipeline.from_pretrained("runs/demo/pipeline"),
        ...                           FlawHighlighter.load("runs/demo/highlighter.pt"))
        >>> out = pipe(batch_size=16, num_inference_steps=30, seed=0, strength=0.5, steps=30)
        >>> out.images, out.masks, out.report["summary"]
        >>> pipe(my_images, strength=0.4)          # repair images you have
    """

    def __init__(self, pipeline, highlighter):
        for name in ("unet", "scheduler"):
            if getattr(pipeline, name, None) is None:
                raise TypeError(f"pipeline must have a {name!r} (a diffusers DDPMPipeline, DDIMPipeline or "
                                f"LDMPipeline), got {type(pipeline).__name__}")
        self.pipeline, self.highlighter = pipeline, highlighter
        self.vae = getattr(pipeline, "vqvae", None) or getattr(pipeline, "vae", None)

    def generate(self, batch_size: int, num_inference_steps: int = 50, seed: int = 0) -> torch.Tensor:
        """(batch_size, C, H, W) images in [0, 1] from the wrapped pipeline (CPU generator seeded ``seed``)."""
        result = self.pipeline(batch_size=batch_size, num_inference_steps=num_inference_steps,
                               generator=torch.Generator().manual_seed(seed), output_type="np")
        array = np.asarray(result.images, dtype=np.float32)  # (B, H, W, C)
        images = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
        if self.highlighter is not None and images.shape[1] == 3 and self.highlighter.in_channels == 1:
            images = images.mean(dim=1, keepdim=True)  # grey images come back as RGB from some pipelines
        return images.clamp(0, 1)

    def __call__(self, images: torch.Tensor | None = None, *, batch_size: int = 16, num_inference_steps: int = 50,
                 seed: int = 0, **repair_kwargs) -> FlawRepairOutput:
        """Repair ``images`` (B, C, H, W) in [0, 1], or ``batch_size`` fresh samples when ``images`` is None.

        ``repair_kwargs`` go to :func:`srdiff.repair_flaws` (``strength``, ``steps``, ``threshold``, ...);
        ``seed`` seeds both the samples and the repair noise.
        """
        from srdiff.repair import repair_flaws

        if images is None:
            images = self.generate(batch_size, num_inference_steps, seed)
        repaired, masks, report = repair_flaws(images, self.pipeline.unet, self.highlighter,
                                               scheduler=self.pipeline.scheduler, vae=self.vae, seed=seed,
                                               **repair_kwargs)
        return FlawRepairOutput(images=repaired, originals=images, masks=masks, report=report)
