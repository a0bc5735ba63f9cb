"""A diffusers-shaped front for flaw repair: a pipeline's UNet, scheduler and VAE plus a highlighter."""

from dataclasses import dataclass

import numpy as np
import torch

from srdiff.diffusion.denoiser import gives_denoiser


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
    """Generate with a trained srdiff model or a diffusers pipeline, find flaws with a
    :class:`srdiff.FlawHighlighter`, repair them.

    Args:
        pipeline: a trained srdiff model (``srdiff.load_trained(path)``: every task and backbone the trainer
            makes, generating and re-denoising through its task, with the class labels or prompts it needs),
            or a ``DDPMPipeline``, ``DDIMPipeline`` or ``LDMPipeline`` (its ``unet``, ``scheduler`` and
            ``vqvae``/``vae`` are used; the trainer's exported ``pipeline/`` folders load as these), or any
            object with ``unet`` and ``scheduler`` attributes whose UNet needs no further inputs.
        highlighter: for the model's image channels.

    Example::

        >>> pipe = FlawRepairPipeline(DDIMPipeline.from_pretrained("runs/demo/pipeline"),
        ...                           FlawHighlighter.load("runs/demo/highlighter.pt"))
        >>> out = pipe(batch_size=16, num_inference_steps=30, seed=0, strength=0.5, steps=30)
        >>> out.images, out.masks, out.report["summary"]
        >>> pipe(my_images, strength=0.4)          # repair images you have
        >>> sevens = FlawRepairPipeline(load_trained("runs/class/checkpoints/last.pt"), hl)
        >>> sevens(batch_size=4, class_labels=[7] * 4, guidance_scale=2.0)
    """

    def __init__(self, pipeline, highlighter):
        #: a trained srdiff model (it gives its own Denoiser), not a diffusers pipeline
        self.trained = gives_denoiser(pipeline)
        if not self.trained:
            for name in ("unet", "scheduler"):
                if getattr(pipeline, name, None) is None:
                    raise TypeError(f"pipeline must be a trained srdiff model (srdiff.load_trained) or have a "
                                    f"{name!r} (a diffusers DDPMPipeline, DDIMPipeline or LDMPipeline), got "
                                    f"{type(pipeline).__name__}")
        self.pipeline, self.highlighter = pipeline, highlighter
        self.vae = pipeline.vae if self.trained else (getattr(pipeline, "vqvae", None)
                                                      or getattr(pipeline, "vae", None))

    def _refuse(self, **given) -> None:
        for name, value in given.items():
            if value is not None:
                raise ValueError(f"{name} needs a trained srdiff model (srdiff.load_trained), whose task builds "
                                 f"the condition; the wrapped {type(self.pipeline).__name__} takes none here")

    def generate(self, batch_size: int, num_inference_steps: int = 50, seed: int = 0, *, class_labels=None,
                 prompts: list[str] | None = None, guidance_scale: float | None = None) -> torch.Tensor:
        """(batch_size, C, H, W) images in [0, 1] from the wrapped model (seeded ``seed``): a trained model's
        task samples image i with ``class_labels[i]`` or ``prompts[i]`` where given, guided at
        ``guidance_scale`` (default the run's); a diffusers pipeline takes none of them."""
        if self.trained:
            return self.pipeline.sample(batch_size, seed=seed, steps=num_inference_steps,
                                        class_labels=class_labels, prompts=prompts, guidance_scale=guidance_scale)
        self._refuse(class_labels=class_labels, prompts=prompts, guidance_scale=guidance_scale)
        result = self.pipeline(batch_size=batch_size, num_inference_steps=num_inference_steps,
                               generator=torch.Generator().manual_seed(seed), output_type="np")
        array = np.asarray(result.images, dtype=np.float32)  # (B, H, W, C)
        images = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
        if self.highlighter is not None and images.shape[1] == 3 and self.highlighter.in_channels == 1:
            images = images.mean(dim=1, keepdim=True)  # grey images come back as RGB from some pipelines
        return images.clamp(0, 1)

    def __call__(self, images: torch.Tensor | None = None, *, batch_size: int = 16, num_inference_steps: int = 50,
                 seed: int = 0, class_labels=None, prompts: list[str] | None = None,
                 guidance_scale: float | None = None, **repair_kwargs) -> FlawRepairOutput:
        """Repair ``images`` (B, C, H, W) in [0, 1], or ``batch_size`` fresh samples when ``images`` is None.

        ``class_labels`` / ``prompts`` (one per image) and ``guidance_scale`` condition a trained model's
        generation and repair alike (a class or text model needs them; ``ValueError`` naming the one missing,
        before anything runs); a diffusers pipeline's UNet takes ``class_labels`` for the repair only.
        ``repair_kwargs`` go to :func:`srdiff.repair_flaws` (``strength``, ``steps``, ``threshold``, ...);
        ``seed`` seeds both the samples and the repair noise.
        """
        from srdiff.repair import repair_flaws

        conditions = dict(class_labels=class_labels, prompts=prompts, guidance_scale=guidance_scale)
        if self.trained:
            model = self.pipeline.denoiser(**conditions)
        else:
            self._refuse(prompts=prompts, guidance_scale=guidance_scale)
            model = self.pipeline.unet
            repair_kwargs = dict(scheduler=self.pipeline.scheduler, vae=self.vae, class_labels=class_labels,
                                 **repair_kwargs)
        if images is None:
            images = self.generate(batch_size, num_inference_steps, seed, **conditions)
        repaired, masks, report = repair_flaws(images, model, self.highlighter, seed=seed, **repair_kwargs)
        return FlawRepairOutput(images=repaired, originals=images, masks=masks, report=report)
