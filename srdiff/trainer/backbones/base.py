"""Denoiser backbones: how to build a model from a :class:`TrainConfig` and how to call it.

A backbone is one class in :data:`BACKBONES`. It knows its model class, which conditions it can take
(class labels, caption embeddings) and how to pass them; it knows nothing of tasks, data or the loop.
A task (``srdiff/trainer/tasks``) decides the :class:`DenoiserSpec` (channels, classes, text width) and
the :class:`Condition` of each batch; the backbone maps them onto its model's arguments.

Add a backbone: subclass :class:`Backbone`, implement ``build``, ``forward`` and ``size_multiple`` (the
sides it takes), decorate it with :func:`register_backbone`; ``TrainConfig(backbone=...)`` accepts it
from then on.
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
    """Builds and calls one kind of denoiser. ``conditions`` lists what it accepts: ``"class"``, ``"text"``."""

    name: ClassVar[str]
    conditions: ClassVar[frozenset[str]] = frozenset()

    def build(self, config, spec: DenoiserSpec) -> nn.Module:
        raise NotImplementedError

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


def _unet_kwargs(config, spec: DenoiserSpec, attention: str) -> dict:
    """What both diffusers U-Nets take from the config and the spec; ``{attention}DownBlock2D`` /
    ``{attention}UpBlock2D`` at the levels ``config.attention_levels`` marks, plain blocks elsewhere."""
    return dict(
        sample_size=spec.sample_size,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        block_out_channels=config.block_out_channels,
        down_block_types=tuple(f"{attention if a else ''}DownBlock2D" for a in config.attention_levels),
        up_block_types=tuple(f"{attention if a else ''}UpBlock2D" for a in reversed(config.attention_levels)),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        num_class_embeds=spec.num_classes + 1 if spec.num_classes else None,
    )


def _halvings(config) -> tuple[int, str]:
    """``UNet2DModel`` halves the side at every level but the last and adds each skip back at its size."""
    levels = len(config.block_out_channels)
    return 2 ** (levels - 1), (f"its {levels} levels (block_out_channels {tuple(config.block_out_channels)}) "
                               f"halve the side {levels - 1} times")


@register_backbone
class UNet(Backbone):
    """diffusers ``UNet2DModel``: self-attention at the levels ``config.attention_levels`` marks; class
    labels through its ``num_class_embeds`` table (one extra row: the null class)."""

    name = "unet"
    conditions = frozenset({"class"})

    def build(self, config, spec: DenoiserSpec) -> nn.Module:
        from diffusers import UNet2DModel

        self.check(spec)
        return UNet2DModel(**_unet_kwargs(config, spec, "Attn"), attention_head_dim=config.attention_head_dim)

    def size_multiple(self, config) -> tuple[int, str]:
        return _halvings(config)

    def forward(self, model, x, t, cond):
        if cond.class_labels is None:
            return model(x, t).sample
        return model(x, t, class_labels=cond.class_labels).sample


@register_backbone
class ConditionUNet(Backbone):
    """diffusers ``UNet2DConditionModel``: self- and cross-attention (``CrossAttn*Block2D``) at the marked
    levels. Text: caption embeddings as cross-attention keys. Class labels: its ``num_class_embeds``
    table; without a caption the cross-attention attends to one zero token."""

    name = "unet-cond"
    conditions = frozenset({"class", "text"})

    def build(self, config, spec: DenoiserSpec) -> nn.Module:
        from diffusers import UNet2DConditionModel

        self.check(spec)
        head_dim = config.attention_head_dim
        return UNet2DConditionModel(
            **_unet_kwargs(config, spec, "CrossAttn"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            attention_head_dim=tuple(c // head_dim for c in config.block_out_channels),  # diffusers: heads
            cross_attention_dim=spec.cross_attention_dim or head_dim,
        )

    def size_multiple(self, config) -> tuple[int, str]:
        return 1, "its up blocks upsample to each skip's own size"

    def forward(self, model, x, t, cond):
        context = cond.encoder_hidden_states
        if context is None:
            context = x.new_zeros(x.shape[0], 1, model.config.cross_attention_dim)
        return model(x, t, encoder_hidden_states=context, class_labels=cond.class_labels).sample


def _patches(config) -> tuple[int, str]:
    """Patch-token transformers cut the input into ``patch_size`` x ``patch_size`` patches."""
    return config.patch_size, f"it cuts the input into patches of patch_size {config.patch_size}"


def _heads(config) -> int:
    if config.hidden_size % config.attention_head_dim:
        raise ValueError(f"hidden_size {config.hidden_size} must be a multiple of attention_head_dim "
                         f"{config.attention_head_dim} (heads = hidden_size / attention_head_dim)")
    return config.hidden_size // config.attention_head_dim


@register_backbone
class DiT(Backbone):
    """diffusers ``DiTTransformer2DModel`` (Peebles & Xie 2023): patch tokens (``patch_size``), ``depth``
    blocks of width ``hidden_size``, adaLN-Zero conditioning on timestep and class.

    DiT always takes a class: an unconditional task trains it with one class (label 0). Its label
    embedding's own dropout (10 %, drawn from the global RNG in train mode) is switched off, because the
    class task drops labels itself, keyed by (seed, step): the embedding table keeps its null row, which
    is the null class ``num_classes``.
    """

    name = "dit"
    conditions = frozenset({"class"})

    def build(self, config, spec: DenoiserSpec) -> nn.Module:
        from diffusers import DiTTransformer2DModel

        self.check(spec)
        model = DiTTransformer2DModel(
            num_attention_heads=_heads(config),
            attention_head_dim=config.attention_head_dim,
            in_channels=spec.in_channels,
            out_channels=spec.out_channels,
            num_layers=config.depth,
            sample_size=spec.sample_size,
            patch_size=config.patch_size,
            num_embeds_ada_norm=spec.num_classes or 1,
            norm_num_groups=1,
        )
        return _without_label_dropout(model)

    def size_multiple(self, config) -> tuple[int, str]:
        return _patches(config)

    def forward(self, model, x, t, cond):
        labels = cond.class_labels
        if labels is None:
            labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return model(x, timestep=_batched(t, x), class_labels=labels).sample

    def plain_copy(self, model: nn.Module) -> nn.Module:
        return _without_label_dropout(super().plain_copy(model))


def _without_label_dropout(model: nn.Module) -> nn.Module:
    """``model`` with its diffusers ``LabelEmbedding`` dropout off (its table keeps the null row)."""
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0
    return model


@register_backbone
class SD3(Backbone):
    """diffusers ``SD3Transformer2DModel`` (MM-DiT, Esser et al. 2024): joint attention over caption and
    patch tokens. Only the patch tokens carry the map (the joint FAM processor gives the caption tokens
    0). SD3 reads a pooled caption embedding too; where the task's text encoder gives none, the mean of
    the caption tokens serves (srdiff's choice for tiny CLIP encoders, not SD3's CLIP-L + CLIP-G pool)."""

    name = "sd3"
    conditions = frozenset({"text"})

    def build(self, config, spec: DenoiserSpec) -> nn.Module:
        from diffusers import SD3Transformer2DModel

        self.check(spec)
        if not spec.cross_attention_dim:
            raise ValueError("backbone 'sd3' needs caption embeddings: use it with task 'text'")
        return SD3Transformer2DModel(
            sample_size=spec.sample_size,
            patch_size=config.patch_size,
            in_channels=spec.in_channels,
            out_channels=spec.out_channels,
            num_layers=config.depth,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=_heads(config),
            joint_attention_dim=spec.cross_attention_dim,
            caption_projection_dim=config.hidden_size,
            pooled_projection_dim=spec.cross_attention_dim,
            pos_embed_max_size=spec.sample_size // config.patch_size,
        )

    def size_multiple(self, config) -> tuple[int, str]:
        return _patches(config)

    def forward(self, model, x, t, cond):
        context = cond.encoder_hidden_states
        pooled = cond.pooled if cond.pooled is not None else context.mean(dim=1)
        return model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                     timestep=_batched(t, x)).sample


def _batched(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as a (B,) tensor (the samplers pass one scalar for the whole batch)."""
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


@register_backbone
class UViT(Backbone):
    """:class:`srdiff.UViT` (Bao et al. 2023, "All are Worth Words"): time (and class) as tokens, long
    skips between in- and out-blocks, patch embedding; ``depth`` (even) blocks besides the middle one,
    width ``hidden_size``. Its in- and out-blocks are modulated, the middle block not, the leading
    tokens get 0, as in the authors' code."""

    name = "uvit"
    conditions = frozenset({"class"})

    def build(self, config, spec: DenoiserSpec) -> nn.Module:
        from srdiff.models.uvit import UViT as UViTModel

        self.check(spec)
        return UViTModel(sample_size=spec.sample_size, in_channels=spec.in_channels, out_channels=spec.out_channels,
                         patch_size=config.patch_size, width=config.hidden_size, depth=config.depth,
                         heads=_heads(config), num_classes=spec.num_classes or 0, lam=config.lam_r)

    def size_multiple(self, config) -> tuple[int, str]:
        return _patches(config)

    def forward(self, model, x, t, cond):
        return model(x, _batched(t, x), class_labels=cond.class_labels).sample
