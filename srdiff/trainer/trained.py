"""A trained model back from its checkpoint: the EMA denoiser with plain attention, its config and task,
ready to sample, evaluate or export (``srdiff sample|eval|repair`` and Python users)."""

import os
from dataclasses import dataclass

import torch
from torch import nn

from srdiff._checks import check_guidance_scale
from srdiff._device import resolve_device
from srdiff._io import follow_umask
from srdiff.diffusion.denoiser import Denoiser
from srdiff.diffusion.masks import check_masks, holes
from srdiff.diffusion.repaint import repaint_images
from srdiff.diffusion.schedules import make_scheduler
from srdiff.trainer import checkpoint
from srdiff.trainer.backbones.base import Condition, DenoiserSpec
from srdiff.trainer.config import TrainConfig
from srdiff.trainer.dataset import latent_shape, load_vae
from srdiff.trainer.task import DenoisingTask
from srdiff.trainer.tasks import get_task


#: how :class:`TrainedModel` names its condition arguments in errors (the CLI passes its flags instead)
ARGUMENTS = {"class_labels": "class_labels", "prompts": "prompts", "guidance_scale": "guidance_scale"}
#: the argument that carries each kind of condition a task can train with
CONDITION_ARGUMENTS = {"class": "class_labels", "text": "prompts"}
_TAKES = {None: "no condition", "class": "a class label per image", "text": "a prompt per image"}


@dataclass
class TrainedModel:
    """A checkpoint's EMA denoiser with what samples and re-denoises with it: :meth:`sample`, :meth:`denoiser`
    (flaw repair), :meth:`inpaint`, :meth:`export`. The class labels or prompts a conditional task takes are
    checked once, here (:meth:`conditions`, :meth:`guidance`), for the Python API and the CLI alike."""

    model: nn.Module  # the EMA denoiser, eval mode, no gradients
    config: TrainConfig
    task: DenoisingTask
    vae: nn.Module | None
    path: str | None = None  # the checkpoint it came from

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def scheduler(self, sampler: str = "ddim"):
        """The diffusers scheduler of the run's noise schedule (``sampler``: ``"ddim"`` or ``"ddpm"``)."""
        return make_scheduler(self.config, sampler)

    def _describe(self) -> str:
        name = f"checkpoint {self.path}" if self.path else "this model"
        return (f"{name} is task {self.task.name!r} (backbone {self.task.backbone_name!r}), which takes "
                f"{_TAKES[self.task.condition]}")

    def conditions(self, *, class_labels=None, prompts=None, n: int | None = None,
                   names: dict = ARGUMENTS) -> Condition | None:
        """The condition of one image per entry of ``class_labels`` ((n,) ints) or ``prompts`` (n strings), or
        None where neither is given. ``ValueError`` naming the argument (``names`` maps it to what the caller
        calls it) where this model takes no such condition, a label is out of range, or (``n`` given) the
        count is not ``n``."""
        for kind, value in (("class", class_labels), ("text", prompts)):
            if value is not None and self.task.condition != kind:
                raise ValueError(f"{names[CONDITION_ARGUMENTS[kind]]} needs a {kind}-conditional checkpoint; "
                                 f"{self._describe()}")
        if class_labels is None and prompts is None:
            return None
        if class_labels is not None:
            condition, count = self.task.labels_condition(class_labels), len(class_labels)
        else:
            condition, count = self.task.prompt_condition(prompts), len(prompts)
        if n is not None and count != n:
            raise ValueError(f"{names[CONDITION_ARGUMENTS[self.task.condition]]} must hold one entry per image "
                             f"({n}), got {count}")
        return condition

    def guidance(self, guidance_scale: float | None = None, names: dict = ARGUMENTS) -> float:
        """The classifier-free guidance scale: the run's (``config.guidance_scale``) or ``guidance_scale``,
        finite and >= 0, which a model without a condition to guide refuses (``ValueError``)."""
        if guidance_scale is None:
            return self.config.guidance_scale
        name = names["guidance_scale"]
        if self.task.condition is None:
            raise ValueError(f"{name} needs a conditional checkpoint (task 'class' or 'text'); "
                             f"{self._describe()}, so there is nothing to guide")
        return check_guidance_scale(guidance_scale, name)

    def sample(self, n: int, *, class_labels=None, prompts=None, guidance_scale: float | None = None,
               names: dict = ARGUMENTS, **kwargs) -> torch.Tensor:
        """``n`` images in [0, 1], image i of class ``class_labels[i]`` or prompt ``prompts[i]`` where given
        (else the task draws them), guided at ``guidance_scale`` (default: the run's), errors naming the
        arguments as ``names`` calls them (:meth:`conditions`); other keywords as
        :meth:`srdiff.trainer.task.DenoisingTask.sample`."""
        conditions = self.conditions(class_labels=class_labels, prompts=prompts, n=n, names=names)
        if conditions is not None:
            kwargs["conditions"] = conditions
        if guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance(guidance_scale, names)
        return self.task.sample(self.model, n, **kwargs)

    def denoiser(self, *, class_labels=None, prompts=None, guidance_scale: float | None = None,
                 sampler: str = "ddim", names: dict = ARGUMENTS) -> Denoiser:
        """This model as RePaint calls it (:func:`srdiff.repair_flaws`, ``srdiff repair``): the task's own
        denoiser call (:meth:`srdiff.trainer.task.DenoisingTask.predictor`: classifier-free guided at
        ``guidance_scale``, default the run's, where the task has a condition; an inpainting model reads the
        known pixels and the holes), with the run's noise schedule (``sampler`` ``"ddim"`` or ``"ddpm"``) and
        VAE. Image i is conditioned on ``class_labels[i]`` (a class model needs them) or ``prompts[i]`` (a
        text model needs them); a missing condition, or one this model cannot take, raises ``ValueError``
        naming the argument (as ``names`` calls it: :meth:`conditions`)."""
        conditions = self.conditions(class_labels=class_labels, prompts=prompts, names=names)
        kind = self.task.condition
        if kind is not None and conditions is None:
            raise ValueError(f"{names[CONDITION_ARGUMENTS[kind]]} is needed to re-denoise with it: "
                             f"{self._describe()}")
        count = None if conditions is None else len(class_labels if kind == "class" else prompts)
        return Denoiser(self.task.predictor(self.model, conditions, self.guidance(guidance_scale, names)),
                        self.device, self.scheduler(sampler), self.vae, count)

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
        denoiser = self.denoiser(sampler="ddpm")
        return repaint_images(images.to(self.device).float(), masks.to(self.device), denoiser.predictor,
                              denoiser.scheduler, strength=1.0, steps=steps, seed=seed, resample=resample,
                              jump=jump, vae=self.vae, batch_size=batch_size, progress=progress, desc="RePaint")

    def export(self, out_dir: str | os.PathLike):
        """The task's diffusers pipeline (or folders) under ``out_dir``, its files following the umask."""
        return follow_umask(self.task.export(self.model, out_dir))


def load_trained(path: str | os.PathLike, device: torch.device | str = "cpu") -> TrainedModel:
    """The EMA model of a trainer checkpoint (``checkpoints/last.pt``) on ``device``; a sharded one's (parallel
    'fsdp') is gathered from its shards, in this one process."""
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
    if "sharded" in state:
        from srdiff.trainer.fsdp import consolidate

        model.load_state_dict(consolidate(state["sharded"], "ema", model.state_dict()))
    else:
        model.load_state_dict(state["ema"]["model"])
    return TrainedModel(model.to(device).eval().requires_grad_(False), config, task, vae, str(path))


def load_ema_unet(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """(EMA denoiser with plain attention, its TrainConfig, the VAE or None) from a trainer checkpoint;
    :func:`load_trained` also returns the task (conditions, export)."""
    trained = load_trained(path, device)
    return trained.model, trained.config, trained.vae
