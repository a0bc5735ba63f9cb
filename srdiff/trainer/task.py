"""The task seam: what differs between training an unconditional, a class-conditional, a text-to-image
and an inpainting denoiser, and nothing else.

A task owns: the :class:`~srdiff.trainer.backbones.base.DenoiserSpec` it needs (decided from the data once,
then saved in the checkpoint), building the denoiser through its backbone, the batch (model-space images
plus labels / caption embeddings / masks), the denoiser call, the loss, sampling (with classifier-free
guidance where it has a condition), the samples an mFAM refresh looks at, and export (to the diffusers
pipeline its backbone names, or folders). The training loop (``srdiff/trainer/trainer.py``) calls a task;
a task never imports the loop, and never asks which backbone it has.

Add a task: subclass :class:`DenoisingTask` in ``srdiff/trainer/tasks/<name>.py``, decorate it with
:func:`register_task`, and import the module in ``srdiff/trainer/tasks/__init__.py`` (which builds tasks:
``get_task(config)``); ``TrainConfig(task=...)`` accepts it from then on.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from srdiff._checks import check_guidance_scale
from srdiff.diffusion.denoiser import Predictor
from srdiff.diffusion.sampling import guide, sample_loop
from srdiff.diffusion.schedules import make_scheduler
from srdiff.noise import amplified_noise_loss
from srdiff.trainer.backbones.base import Condition, DenoiserSpec, get_backbone

TASKS: dict[str, type["DenoisingTask"]] = {}


def register_task(cls: type["DenoisingTask"]) -> type["DenoisingTask"]:
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls
    return cls


@dataclass
class Batch:
    """One micro-batch as a task hands it to the loop: ``x0`` (B, C, H, W) in model space (pixels in
    [-1, 1] or scaled latents), what it conditions on, and task-specific tensors (masks, ...)."""

    x0: torch.Tensor
    cond: Condition = field(default_factory=Condition)
    extras: dict = field(default_factory=dict)


class DenoisingTask:
    """Base class and protocol of a task; the unconditional task is this class with a name.

    Life cycle: ``task = get_task(config, device)``; for training ``task.setup(dataset)`` decides the
    spec from the data; for sampling a saved model ``task.load_state_dict(checkpoint["task"])``.
    """

    name: ClassVar[str]
    default_backbone: ClassVar[str] = "unet"
    #: the condition kind this task trains with ("class", "text") or None
    condition: ClassVar[str | None] = None

    def __init__(self, config, device: torch.device):
        self.config = config
        self.device = device
        self.backbone = get_backbone(self.backbone_name)
        self.spec: DenoiserSpec | None = None
        self.vae: nn.Module | None = None
        #: the :class:`~srdiff.trainer.dataset.Dataset` training reads (set by :meth:`setup`); a loaded
        #: model's task may be given one to draw sampling inputs from (inpainting: the images to fill)
        self.data = None

    @property
    def backbone_name(self) -> str:
        return self.default_backbone if self.config.backbone == "auto" else self.config.backbone

    # ------------------------------------------------------------------ spec and state
    def setup(self, data) -> None:
        """Decide the denoiser's spec from the training data (:class:`srdiff.trainer.dataset.Dataset`)."""
        self.data = data
        self.vae = data.vae
        channels, size = data.train_data.shape[1], data.train_data.shape[-1]
        self.spec = DenoiserSpec(in_channels=channels, out_channels=channels, sample_size=size)

    def state_dict(self) -> dict:
        """What sampling a saved model needs besides the weights and the config."""
        return {"spec": self.spec.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.spec = DenoiserSpec(**state["spec"])

    def build_denoiser(self) -> nn.Module:
        self.backbone.check_sample_size(self.config, self.spec.sample_size)
        return self.backbone.build(self.config, self.spec)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample in model space."""
        return self.spec.out_channels, self.spec.sample_size, self.spec.sample_size

    # ------------------------------------------------------------------ training
    def batch(self, indices: torch.Tensor, *, step: int, micro: int) -> Batch:
        """The micro-batch of training images ``indices`` at optimiser step ``step``, micro-batch
        ``micro`` (global index: random draws keyed by it do not depend on the rank)."""
        return Batch(x0=self.data.train_data[indices].to(self.device))

    def model_input(self, x_t: torch.Tensor, batch: Batch) -> torch.Tensor:
        """What the denoiser reads: the noisy sample, plus any channels the task concatenates."""
        return x_t

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.backbone.forward(model, self.model_input(x_t, batch), t, batch.cond)

    def loss(self, pred: torch.Tensor, batch: Batch, t: torch.Tensor, alphas_cumprod: torch.Tensor,
             fam: torch.Tensor | None, lam: float, *, seed: int, **options) -> torch.Tensor:
        """The denoising loss of one micro-batch (fused ε-loss; ε regenerated from ``seed``)."""
        return amplified_noise_loss(pred, batch.x0, t, alphas_cumprod, fam, lam, seed=seed, **options)

    # ------------------------------------------------------------------ sampling
    def sample_conditions(self, indices: torch.Tensor, seed: int) -> Condition | None:
        """The condition of each sampled image ``indices`` (image i's depends on (seed, i) only), or
        None for an unconditional task."""
        return None

    def null_condition(self, n: int) -> Condition:
        """The unconditional branch of classifier-free guidance (n rows)."""
        raise NotImplementedError(f"task {self.name!r} has no condition to guide")

    def guided_predict(self, model: nn.Module, guidance_scale: float):
        """A ``predict(x, t, cond)`` for the sampling loop: conditional, or classifier-free guided
        ``ε_u + s (ε_c - ε_u)`` in one batched call when ``guidance_scale != 1``."""

        def predict(x, t, cond):
            if cond is None or guidance_scale == 1.0:
                return self.predict(model, x, t, Batch(x0=x, cond=cond or Condition()))
            both = Batch(x0=torch.cat([x, x]), cond=cond.cat(self.null_condition(len(x))))
            eps_c, eps_u = self.predict(model, both.x0, t, both).chunk(2)
            return guide(eps_c, eps_u, guidance_scale)

        return predict

    def predictor(self, model: nn.Module, conditions: Condition | None, guidance_scale: float) -> Predictor:
        """The task's denoiser call as RePaint asks for it (:mod:`srdiff.diffusion.denoiser`):
        ``predictor(rows, images, masks)`` gives a batch's ``predict(x, t)``, :meth:`guided_predict` with
        image i conditioned on row i of ``conditions`` (None: unconditional)."""
        guided = self.guided_predict(model, guidance_scale)

        def predictor(rows, images, masks):
            cond = None if conditions is None else conditions.select(rows.to(self.device))
            return lambda x, t: guided(x, t, cond)

        return predictor

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, *, seed: int, steps: int, sampler: str = "ddim",
               first_index: int = 0, guidance_scale: float | None = None, conditions: Condition | None = None,
               batch_size: int = 256, autocast_dtype: torch.dtype | None = None, progress: bool = False
               ) -> torch.Tensor:
        """``n`` images (n, C, H, W) in [0, 1] (decoded through the VAE in latent mode). ``conditions``:
        one row per image (default: :meth:`sample_conditions`); ``guidance_scale`` defaults to the config's."""
        scale = self.config.guidance_scale if guidance_scale is None else check_guidance_scale(guidance_scale)
        indices = torch.arange(first_index, first_index + n)
        if conditions is None:
            conditions = self.sample_conditions(indices, seed)
        return sample_loop(
            self.guided_predict(model, scale), self.sample_shape, self.config, n, conditions=conditions,
            steps=steps, sampler=sampler, seed=seed, first_index=first_index, batch_size=batch_size,
            device=next(model.parameters()).device, vae=self.vae, autocast_dtype=autocast_dtype,
            progress=progress, model=model,
        )

    def refresh_samples(self, model: nn.Module, n: int, *, seed: int, first_index: int, **sample_kwargs
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The images an mFAM refresh looks at (``sample_kwargs`` go to :meth:`sample`), and per image a
        (H, W) weight of where its map counts (None: everywhere). Inpainting counts the holes only."""
        return self.sample(model, n, seed=seed, first_index=first_index, **sample_kwargs), None

    # ------------------------------------------------------------------ export
    def export(self, model: nn.Module, out_dir: str | os.PathLike) -> Path:
        """Write ``model`` (plain attention) as the diffusers pipeline its backbone names for this task
        (:meth:`~srdiff.trainer.backbones.base.Backbone.pipeline`: ``DDPMPipeline`` for a pixel
        ``UNet2DModel``, ``LDMPipeline`` with the VAE for a latent one), else (no diffusers pipeline samples
        a pixel DiT or U-ViT) as :meth:`export_folders`."""
        clean = self.backbone.plain_copy(model).cpu()
        vae = None if self.vae is None else self.vae.cpu()
        try:
            pipe = self.backbone.pipeline(clean, self.config, condition=self.condition, vae=vae)
            if pipe is None:
                return self.export_folders(model, out_dir, clean=clean)
            pipe.save_pretrained(out_dir)
        finally:
            if self.vae is not None:
                self.vae.to(self.device)
        return Path(out_dir)

    def export_folders(self, model: nn.Module, out_dir: str | os.PathLike, *, clean: nn.Module | None = None,
                       **info) -> Path:
        """``<denoiser>/`` (``save_pretrained`` into the backbone's folder: ``unet/`` or ``transformer/``),
        ``scheduler/``, ``vae/`` in latent mode, and ``srdiff_task.json`` (the task, its backbone and
        ``info``: how to call the model), for models no diffusers pipeline runs. Load with
        ``<ModelClass>.from_pretrained(out_dir, subfolder=...)``. ``clean``: ``model``'s plain copy, if made."""
        import json

        out_dir = Path(out_dir)
        clean = self.backbone.plain_copy(model).cpu() if clean is None else clean
        folder = self.backbone.folder
        clean.save_pretrained(out_dir / folder)
        make_scheduler(self.config, "ddim").save_pretrained(out_dir / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(out_dir / "vae")
        meta = {"task": self.name, "backbone": self.backbone_name, "model_class": type(clean).__name__,
                "subfolder": folder, **info}
        (out_dir / "srdiff_task.json").write_text(json.dumps(meta, indent=2) + "\n")
        return out_dir
