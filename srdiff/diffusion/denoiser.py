"""A denoiser as RePaint calls it: the seam through which any model, a plain diffusers one or a trained
srdiff model of any task and backbone, reaches the one re-denoising loop without that loop (or the flaw
repair above it) knowing what the model is.

RePaint works on batches of images. For each batch it asks the denoiser's ``predictor(rows, images,
masks)`` for a ``predict(x, t)``: ``rows`` are the images' positions in the caller's whole set (to pick
their class labels or captions), ``images`` (B, C, H, W) in [0, 1] and ``masks`` (B, 1, H, W) in [0, 1]
what is being re-denoised (a mask-conditioned inpainting model reads the known pixels and the holes).
``predict(x, t)`` returns the model's output, what the scheduler expects, for the scaled state ``x`` at the
0-dim timestep ``t``. A trained srdiff model gives its :class:`Denoiser` through
:meth:`srdiff.trainer.trained.TrainedModel.denoiser` (the task's own denoiser call, classifier-free guided
where the task has a condition); :meth:`Denoiser.from_model` wraps a plain model.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``predictor(rows, images, masks) -> predict(x, t)``
Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Predict]


@dataclass(frozen=True)
class Denoiser:
    """A model with everything RePaint needs to re-denoise with it.

    ``predictor``: see the module docstring. ``device``: where the model runs (the images are moved
    there). ``scheduler``: the diffusers scheduler of the model's noise schedule, or None (the caller
    then names one). ``vae``: a latent model's ``AutoencoderKL`` / ``VQModel``, None for pixel models.
    ``count``: how many images the conditions it carries cover (image i is conditioned on its row i),
    None where it carries none and takes any number of images.
    """

    predictor: Predictor
    device: torch.device
    scheduler: object | None = None
    vae: nn.Module | None = None
    count: int | None = None

    @classmethod
    def from_model(cls, model, *, device: torch.device, scheduler=None, vae: nn.Module | None = None,
                   class_labels: torch.Tensor | None = None, model_kwargs: dict | None = None) -> "Denoiser":
        """A plain model called ``model(x, t, **model_kwargs)`` with the rows' ``class_labels`` (N,) passed
        as ``class_labels=``; a diffusers output's ``.sample`` (or a tuple's first entry) is the prediction.
        ``device``: the model's (its parameters', for an ``nn.Module``)."""

        def predictor(rows, images, masks):
            kwargs = dict(model_kwargs or {})
            if class_labels is not None:
                kwargs["class_labels"] = class_labels[rows.to(class_labels.device)]

            def predict(x, t):
                out = model(x, t, **kwargs)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                return getattr(out, "sample", out)

            return predict

        count = None if class_labels is None else len(class_labels)
        return cls(predictor, torch.device(device), scheduler, vae, count)


def gives_denoiser(model) -> bool:
    """Whether ``model`` makes its own :class:`Denoiser` for the conditions it is given: a trained srdiff
    model (``srdiff.load_trained(path)``, whose ``denoiser(class_labels=..., prompts=...,
    guidance_scale=...)`` and ``sample(n, ...)`` run its task), rather than a plain model or pipeline."""
    return callable(getattr(model, "denoiser", None))
