"""What every denoiser backbone shares: the spec a task asks of it, the condition of a batch, the
:class:`Backbone` protocol and the registry.

A backbone is one class in its own module (``srdiff/trainer/backbones/<name>.py``), registered in
:data:`BACKBONES`. It owns its model class, its options (the ``TrainConfig`` keys it reads, checked by
it), which conditions it can take (class labels, caption embeddings) and how to pass them, and its
export (the diffusers pipeline that samples it, or the folder its weights go to); it knows nothing of
tasks, data or the loop. A task (``srdiff/trainer/tasks``) decides the :class:`DenoiserSpec` (channels,
classes, text width) and the :class:`Condition` of each batch; the backbone maps them onto its model.

Add a backbone: subclass :class:`Backbone` in a new module, implement ``build``, ``forward`` and
``size_multiple`` (the sides it takes), list its ``options``, decorate it with :func:`register_backbone`
and import the module in ``srdiff/trainer/backbones/__init__.py``; ``TrainConfig(backbone=...)`` accepts
it from then on.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class DenoiserSpec:
    """What a task needs of its denoiser.

    ``in_channels``: channels the model reads (the noisy sample plus any channels a task concatenates,
    e.g. inpainting's mask and masked image); ``out_channels``: channels it predicts; ``sample_size``:
    the square side in model space (pixels or latents); ``num_classes``: class-conditional with this
    many classes (the backbone adds a null class for classifier-free guidance); ``cross_attention_dim``:
    the width of the caption embeddings of a text-conditioned model.
    """

    in_channels: int
    out_channels: int
    sample_size: int
    num_classes: int | None = None
    cross_attention_dim: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Condition:
    """What a batch conditions on, one row per sample; ``None`` where the task has no such condition.

    ``class_labels``: (B,) int64, the null class (``num_classes``) for the unconditional branch;
    ``encoder_hidden_states``: (B, L, cross_attention_dim) caption embeddings; ``pooled``: (B, P) pooled
    caption embeddings (joint-attention transformers).
    """

    class_labels: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    def cat(self, other: "Condition") -> "Condition":
        """Row-wise concatenation (the conditional and unconditional halves of a guided batch)."""
        def join(a, b):
            return None if a is None else torch.cat([a, b])

        return Condition(join(self.class_labels, other.class_labels),
                         join(self.encoder_hidden_states, other.encoder_hidden_states),
                         join(self.pooled, other.pooled))

    def select(self, index) -> "Condition":
        return Condition(*(None if v is None else v[index]
                           for v in (self.class_labels, self.encoder_hidden_states, self.pooled)))


class Backbone:
    """Builds, calls and exports one kind of denoiser. ``conditions`` lists what it accepts: ``"class"``,
    ``"text"``; ``options`` the ``TrainConfig`` keys (``[model]`` section) it reads, which
    :meth:`check_options` validates when the config is made; ``folder`` the diffusers subfolder its
    model is saved to."""

    name: ClassVar[str]
    conditions: ClassVar[frozenset[str]] = frozenset()
    options: ClassVar[tuple[str, ...]] = ()
    folder: ClassVar[str] = "transformer"
    #: the model's blocks (attributes: a module or a ModuleList of them) FSDP shards one by one
    blocks: ClassVar[tuple[str, ...]] = ("transformer_blocks",)

    def check_options(self, config) -> None:
        """Raise ``ValueError`` naming an option of ``config`` this backbone cannot build with."""

    def build(self, config, spec: DenoiserSpec) -> nn.Module:
        raise NotImplementedError

    def from_pretrained(self, folder) -> nn.Module:
        """This backbone's model from a diffusers folder (a local Stable Diffusion ``unet/``)."""
        raise ValueError(f"a pretrained Stable Diffusion UNet needs backbone 'unet-cond', got {self.name!r}")

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The model's prediction (same shape as the noisy sample it denoises)."""
        raise NotImplementedError

    def size_multiple(self, config) -> tuple[int, str]:
        """``(m, why)``: the side of the square input this backbone builds from ``config`` (pixels, or
        latents in latent mode) must be a multiple of ``m``, because ``why``. Each backbone states its own."""
        raise NotImplementedError(f"backbone {self.name!r} states no size rule: implement size_multiple()")

    def check_sample_size(self, config, side: int) -> None:
        """Raise ``ValueError`` unless an input side of ``side`` (``config.image_size``, or the latent side
        the VAE makes of it) fits :meth:`size_multiple`, naming the image sizes around it that do: checked
        before any data loads or any file is written."""
        multiple, why = self.size_multiple(config)
        if side % multiple == 0:
            return
        scale = config.image_size // side  # the VAE's downsampling, 1 for pixel models
        below = side - side % multiple
        sizes = [s * scale for s in (below, below + multiple) if s * scale >= 8]
        latents = f" ({side}x{side} latents)" if scale > 1 else ""
        raise ValueError(f"image_size {config.image_size}{latents} does not fit backbone {self.name!r}: {why}, so "
                         f"the {'latent' if scale > 1 else 'image'} side must be a multiple of {multiple}; "
                         f"image_size {' or '.join(map(str, sizes))} would")

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The modules of ``model`` that ``parallel = "fsdp"`` shards one by one (:attr:`blocks`, a ModuleList
        giving each of its entries); ``ValueError`` where it has none."""
        units = []
        for name in self.blocks:
            part = getattr(model, name, None)
            units += list(part) if isinstance(part, nn.ModuleList) else [part] if isinstance(part, nn.Module) else []
        if not units:
            raise ValueError(f"parallel 'fsdp' shards the denoiser block by block, but {type(model).__name__} "
                             f"(backbone {self.name!r}) has none of the blocks {list(self.blocks)}: use parallel "
                             "'ddp', or name its blocks in the backbone's `blocks`")
        return units

    def check(self, spec: DenoiserSpec) -> None:
        """Raise if the task asks for a condition this backbone cannot take."""
        asked = {"class"} if spec.num_classes else set()
        asked |= {"text"} if spec.cross_attention_dim else set()
        missing = asked - self.conditions
        if missing:
            raise ValueError(f"backbone {self.name!r} cannot take {sorted(missing)} conditions; it takes "
                             f"{sorted(self.conditions) or 'none'}")

    def plain_copy(self, model: nn.Module) -> nn.Module:
        """A fresh model with ``model``'s config and weights and the library's default attention
        processors (the FAM processors are a training-time device), for export. Learned mFAM
        projections are dropped: sampling needs no map."""
        clean = type(model).from_config(model.config)
        state = {k: v for k, v in model.state_dict().items() if "fam_projection" not in k}
        clean.load_state_dict(state)
        return clean

    def pipeline(self, clean: nn.Module, config, *, condition: str | None = None, vae: nn.Module | None = None,
                 text_encoder: nn.Module | None = None, tokenizer=None):
        """The diffusers pipeline that samples ``clean`` (a :meth:`plain_copy`) trained with ``condition``
        (None, ``"class"``, ``"text"``) in pixel space or on ``vae``'s latents, or None where diffusers
        has none: the task then exports folders (``<folder>/``, ``scheduler/``, ...)."""
        return None


BACKBONES: dict[str, type[Backbone]] = {}


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    if cls.name in BACKBONES:
        raise ValueError(f"backbone {cls.name!r} is registered twice")
    BACKBONES[cls.name] = cls
    return cls


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r}")
    return BACKBONES[name]()


def batched(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as a (B,) tensor (the samplers pass one scalar for the whole batch)."""
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def transformer_heads(config) -> int:
    """Attention heads of a transformer backbone: ``hidden_size / attention_head_dim``."""
    if config.hidden_size % config.attention_head_dim:
        raise ValueError(f"hidden_size {config.hidden_size} must be a multiple of attention_head_dim "
                         f"{config.attention_head_dim} (heads = hidden_size / attention_head_dim)")
    return config.hidden_size // config.attention_head_dim


class TransformerBackbone(Backbone):
    """What the patch-token transformers (dit, sd3, uvit) share: their options, their check and their size
    rule (the side a multiple of ``patch_size``)."""

    options = ("patch_size", "depth", "hidden_size", "attention_head_dim")

    def check_options(self, config) -> None:
        transformer_heads(config)

    def size_multiple(self, config) -> tuple[int, str]:
        return config.patch_size, f"it cuts the input into patches of patch_size {config.patch_size}"
